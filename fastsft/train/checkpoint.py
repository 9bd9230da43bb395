"""Checkpoints of a run: written atomically, found again for resume, pruned to the last K (plus the best).

Sits at the end of each save interval in the trainer (`fastsft.train.trainer`) and at the start of a resumed run.
One checkpoint is a directory OUT/checkpoint-<step, 8 digits>/ holding everything needed to continue exactly:

    model.pt            model state dict (one process)      | dcp/  torch.distributed.checkpoint of model + optimizer
    optimizer.pt        optimizer state dict (one process)  |       (sharded runs, one file per rank)
    state-rank<R>.pt    per rank: scheduler, loader position, RNG states (python, numpy, torch, cuda)
    trainer_state.json  step, epoch, best val loss, early-stopping counter, metric history (human readable)
    config.yaml         the resolved run config
    config.json + tokenizer files   so `fastsft export` / `fastsft generate` can rebuild the model from this directory

Atomicity: every file is written into OUT/.tmp-checkpoint-<step>-<pid>/, fsync'ed, then the directory is fsync'ed and
renamed to its final name (rename is atomic on POSIX), then OUT is fsync'ed. A crash (even kill -9) mid-save leaves
only a .tmp directory, which is ignored when looking for checkpoints and deleted at the next start; the previous
checkpoint is untouched. Checkpoint files are trusted (written by this run): loading uses torch.load(weights_only=False).

Test hook: FASTSFT_TEST_SAVE_SLEEP=<seconds> sleeps inside a save after the model file is written, so a test can kill
the process mid-save (FASTSFT_TEST_SAVE_SLEEP_STEP=<step> limits it to that step's save; FASTSFT_TEST_SAVE_SLEEP_MARKER
names a file written when the sleep starts).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fastsft._fsutil import replace_dir

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_JSON = "trainer_state.json"
SAVE_SLEEP_ENV = "FASTSFT_TEST_SAVE_SLEEP"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in out_dir as (step, path), oldest first. Temporary (crashed) saves are not listed."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = []
    for path in out_dir.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_dir() and (path / STATE_JSON).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def remove_stale_temporaries(out_dir: str | Path) -> list[Path]:
    """Delete .tmp-checkpoint-* directories left by a save that crashed; returns what was removed."""
    out_dir = Path(out_dir)
    removed = []
    if out_dir.is_dir():
        for path in out_dir.iterdir():
            # ours, and what replace_dir sets aside while swapping in a re-saved step (.checkpoint-N.old-*)
            if path.name.startswith(TMP_PREFIX) or (path.name.startswith("." + PREFIX) and ".old-" in path.name):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


# ---------------------------------------------------------------------------------------------------------------------
# Durable writes (fsync + atomic rename: the shared helpers in fastsft._fsutil)


def save_pause_hook(step: int) -> None:
    """FASTSFT_TEST_SAVE_SLEEP: pause mid-save so a test can kill the process with a half-written checkpoint."""
    seconds = os.environ.get(SAVE_SLEEP_ENV)
    only_step = os.environ.get(SAVE_SLEEP_ENV + "_STEP")
    if seconds and (not only_step or int(only_step) == step):
        marker = os.environ.get(SAVE_SLEEP_ENV + "_MARKER")
        if marker:  # tells the test the save has started
            Path(marker).write_text("saving\n")
        time.sleep(float(seconds))


def begin_save(out_dir: str | Path, step: int) -> Path:
    """Create the temporary directory a checkpoint is written into."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f"{TMP_PREFIX}{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit_save(tmp: Path, step: int) -> Path:
    """fsync everything in tmp, then atomically rename it to checkpoint-<step> (an existing checkpoint of the same
    step, a re-save after resume, is replaced: renamed aside first, removed once the new one is in place)."""
    return replace_dir(tmp, tmp.parent / checkpoint_name(step))


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_trainer_state(checkpoint: str | Path) -> dict:
    path = Path(checkpoint) / STATE_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a fastsft checkpoint: {STATE_JSON} is missing")
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------------------------------
# RNG states


def capture_rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(_to_tuple(state["python"]))
    np.random.set_state(_numpy_state_from_plain(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _numpy_state_to_plain(state) -> list:
    name, keys, pos, has_gauss, cached = state
    return [name, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)]


def _numpy_state_from_plain(plain) -> tuple:
    name, keys, pos, has_gauss, cached = plain
    return (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)


def _to_tuple(value):
    return tuple(_to_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# ---------------------------------------------------------------------------------------------------------------------
# Whole checkpoints (one process). Sharded runs save model + optimizer through fastsft.train.distributed instead.


def save_local(
    out_dir: str | Path,
    step: int,
    *,
    model_state: dict,
    optimizer_state: dict,
    rank_state: dict,
    trainer_state: dict,
    config_yaml: str,
    write_extras: Callable[[Path], None] | None = None,
) -> Path:
    """Write one complete checkpoint atomically and return its final path."""
    tmp = begin_save(out_dir, step)
    torch.save(model_state, tmp / "model.pt")
    save_pause_hook(step)
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(rank_state, tmp / "state-rank0.pt")
    (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
    if write_extras is not None:
        write_extras(tmp)
    write_json(tmp / STATE_JSON, {**trainer_state, "step": step})  # written last: its presence marks completeness
    return commit_save(tmp, step)


def load_local(checkpoint: str | Path, rank: int = 0) -> tuple[dict, dict, dict, dict]:
    """(model_state, optimizer_state, rank_state, trainer_state) of a one-process checkpoint."""
    checkpoint = Path(checkpoint)
    trainer_state = read_trainer_state(checkpoint)
    model_state = torch.load(checkpoint / "model.pt", map_location="cpu", weights_only=True)
    optimizer_state = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=False)
    rank_state = load_rank_state(checkpoint, rank)
    return model_state, optimizer_state, rank_state, trainer_state


def load_rank_state(checkpoint: str | Path, rank: int) -> dict:
    path = Path(checkpoint) / f"state-rank{rank}.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: this checkpoint was written by a run with fewer ranks; resume with the same number of "
            "processes (the loader position and RNG states are per rank)"
        )
    return torch.load(path, map_location="cpu", weights_only=False)


def prune_checkpoints(out_dir: str | Path, keep_last: int, keep: tuple[Path, ...] = ()) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints, never deleting those in `keep` (the best one)."""
    found = list_checkpoints(out_dir)
    protected = {Path(p).resolve() for p in keep if p is not None}
    removed = []
    for _step, path in found[:-keep_last] if keep_last > 0 else found:
        if path.resolve() in protected:
            continue
        # Rename first so a crash mid-delete never leaves a half-deleted directory that looks like a checkpoint.
        doomed = path.parent / f"{TMP_PREFIX}delete-{path.name}"
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(path)
    return removed
