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
