"""Durable, atomic writes of files and whole directories: one implementation for shards, prepared datasets,
model directories and checkpoints.

A directory is built under a temporary name, every file and directory in it is fsynced, then it is renamed onto its
final name (rename is atomic on POSIX) and its parent fsynced. A crash, even kill -9, at any point leaves either the
old directory or the new one under the final name, never a half-written one.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make a directory's entries (new files, renames) durable. A no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fsync_file(Path(dirpath) / name)
        fsync_dir(dirpath)


def replace_dir(staging: str | Path, final: str | Path) -> Path:
    """fsync everything in `staging`, then atomically put it in place of `final` (which may exist: it is renamed
    aside first and removed only once the new directory is in place)."""
    staging, final = Path(staging), Path(final)
    fsync_tree(staging)
    aside = None
    if final.exists():
        aside = final.parent / f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(final, aside)
    os.rename(staging, final)
    fsync_dir(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return final


class DirectoryLock:
    """An exclusive lock on `path` (a file inside the directory it guards): one process at a time, e.g. one
    `fastsft train` per output directory. It is an flock(2), which the kernel drops when its process exits, however it
    exits (kill -9 included), so a crashed run never leaves it stuck; the file keeps the holder's pid for the message.
    """

    def __init__(self, path: str | Path, what: str = "directory"):
        self.path = Path(path)
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise BlockingIOError naming the directory and the pid that holds it."""
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise BlockingIOError(f"{self.path.parent} ({self.what}) is in use by another process (pid {holder}); "
                                  f"wait for it to finish or use another {self.what}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
