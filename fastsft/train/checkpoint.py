"""Checkpoints of a run: the only code that saves and loads training state, one format for one process and for many.

Sits at the end of each save interval in the trainer (`fastsft.train.trainer`), at the start of a resumed run, and
under `fastsft export` / `fastsft generate` (which read a checkpoint's weights through `load_model_state`). One
checkpoint is a directory OUT/checkpoint-<step, 8 digits>/:

    model-rank<R>.safetensors   rank R's model tensors (the whole tensors in one process, FSDP2 shards under torchrun)
    state-rank<R>.safetensors   rank R's optimizer state tensors ("optim/<param>/<key>") and torch/CUDA RNG states
    state-rank<R>.json          rank R's optimizer hyper-parameters, schedule, loader position, Python/numpy RNG
    model-index.json            every model tensor's global shape and dtype, and along which dim it is sharded
    trainer_state.json          step, epoch, best val loss, early-stopping counter, metric history (human readable)
    config.yaml                 the resolved run config
    config.json + tokenizer     so `fastsft export` / `fastsft generate` can rebuild the model from this directory
    checksums.json              format, world size and the SHA-256 of every file above; written last

Nothing here executes code from a checkpoint: tensors are read with safetensors, everything else is JSON or YAML
(safe_load); there is no pickle (torch.save / torch.distributed.checkpoint's `.metadata`) anywhere.

Completeness and integrity: a checkpoint counts only when checksums.json is there, and resume takes the newest one
whose files all match it, saying which newer ones it skipped and why. Every file is written into
OUT/.tmp-checkpoint-<step>/, fsync'ed, then the directory is renamed to its final name (atomic on POSIX): a crash,
even kill -9, mid-save leaves only the .tmp directory (removed at the next start) and the previous checkpoint intact.
A full disk removes the partial directory and says "disk full at PATH".

Checkpoints written before this format (model.pt / optimizer.pt / state-rank<R>.pt pickles, or a dcp/ directory) are
not read: loading them means unpickling. Resume and export stop with a one-line error naming the directory; finish
or export such a run with the fastsft version that wrote it, or start a new --out.

(Longer than most modules on purpose: writing, finding, verifying and reading one format belong together.)
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fastsft._fsutil import fsync_file, replace_dir
from fastsft.train import distributed

FORMAT = "fastsft-checkpoint-v2"
PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_RANK_FILE = re.compile(r"-rank(\d+)\.[a-z]+$")
CHECKSUMS = "checksums.json"
STATE_JSON = "trainer_state.json"
MODEL_INDEX = "model-index.json"
_OLD_FORMAT_FILES = ("model.pt", "optimizer.pt", "state-rank0.pt", "dcp")


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read; the message names the file and says what to do."""


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def model_file(rank: int) -> str:
    return f"model-rank{rank}.safetensors"


def state_file(rank: int) -> str:
    return f"state-rank{rank}.safetensors"


def state_json(rank: int) -> str:
    return f"state-rank{rank}.json"


# ---------------------------------------------------------------------------------------------------------------------
# Finding checkpoints


def is_old_format(path: Path) -> bool:
    return not (path / CHECKSUMS).exists() and any((path / name).exists() for name in _OLD_FORMAT_FILES)


def old_format_error(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path} is a checkpoint of an older fastsft format (pickle files model.pt/optimizer.pt or dcp/, which this "
        "version never loads because unpickling can run code); finish or export that run with the fastsft version "
        "that wrote it, or start a new --out"
    )


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """Checkpoint directories in out_dir as (step, path), oldest first: those whose checksums.json was written (not
    yet verified) and older-format ones (which `find_resumable` reports). Temporary (crashed) saves are not listed."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = []
    for path in out_dir.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_dir() and ((path / CHECKSUMS).is_file() or is_old_format(path)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in out_dir (not verified; `find_resumable` verifies)."""
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


def read_json(path: Path) -> dict:
    """A JSON object from a checkpoint file, or a CheckpointError naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_trainer_state(checkpoint: str | Path) -> dict:
    checkpoint = Path(checkpoint)
    if is_old_format(checkpoint):
        raise old_format_error(checkpoint)
    return read_json(checkpoint / STATE_JSON)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()


def _owner(name: str) -> int:
    """The rank that writes (and verifies) a file: rank R's -rank<R> files, rank 0 everything else."""
    match = _RANK_FILE.search(name)
    return int(match.group(1)) if match else 0


def read_checksums(path: Path) -> dict:
    if is_old_format(path):
        raise old_format_error(path)
    manifest = read_json(path / CHECKSUMS)
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path / CHECKSUMS}: format {manifest.get('format')!r}, this fastsft reads {FORMAT!r}")
    if not isinstance(manifest.get("files"), dict) or not isinstance(manifest.get("world_size"), int):
        raise CheckpointError(f"{path / CHECKSUMS}: 'files' or 'world_size' missing or of the wrong type")
    return manifest


def verify(path: str | Path, rank: int | None = None) -> str | None:
    """None when the checkpoint's files (all of them, or rank `rank`'s share) match checksums.json, else what is
    wrong, naming the file. Reads every byte: a checkpoint costs one extra read at resume and export."""
    path = Path(path)
    try:
        manifest = read_checksums(path)
    except CheckpointError as e:
        return str(e)
    for name, entry in sorted(manifest["files"].items()):
        if rank is not None and _owner(name) != rank:
            continue
        file = path / name
        if "/" in name or name.startswith(".") or not isinstance(entry, dict):
            return f"{path / CHECKSUMS}: bad entry {name!r}"
        if not file.is_file():
            return f"{file} is missing (listed in {CHECKSUMS})"
        size = file.stat().st_size
        if size != entry.get("bytes"):
            return f"{file} has {size} bytes, {CHECKSUMS} says {entry.get('bytes')} (truncated or changed)"
        if _sha256(file) != entry.get("sha256"):
            return f"{file} does not match its SHA-256 in {CHECKSUMS} (corrupted or changed)"
    return None


def verify_collectively(path: Path, info: distributed.DistInfo) -> str | None:
    """`verify` with each rank checking its own files in parallel; every rank gets the same answer."""
    problems = distributed.all_gather_object(verify(path, info.rank if info.enabled else None), info)
    return next((p for p in problems if p), None)


def find_resumable(out_dir: str | Path, info: distributed.DistInfo, say: Callable[[str], None]) -> Path | None:
    """The newest checkpoint in out_dir whose files verify (None when there is none at all). Newer ones that do not
    verify are skipped with a message; when checkpoints exist but none verifies, a CheckpointError names each."""
    out_dir = Path(out_dir)
    found = distributed.broadcast_object([str(p) for _s, p in list_checkpoints(out_dir)] if info.is_main else None,
                                         info)
    problems = []
    for candidate in map(Path, reversed(found)):
        if is_old_format(candidate):
            raise old_format_error(candidate)
        problem = verify_collectively(candidate, info)
        if problem is None:
            return candidate
        problems.append(problem)
        say(f"skipping {candidate.name}: {problem}")
    if problems:
        raise CheckpointError(f"no checkpoint in {out_dir} verifies ({'; '.join(problems)}); move the broken ones "
                              "aside to start over, or use a new --out")
    return None


def resolve(path: str | Path, say: Callable[[str], None] | None = None) -> Path:
    """A checkpoint directory (verified), or the newest checkpoint of a run directory that verifies (export and
    generate; `say`, stderr by default, hears which newer ones were skipped and why): a CheckpointError naming what
    is wrong otherwise."""
    path = Path(path)
    if (path / CHECKSUMS).is_file() or is_old_format(path):
        problem = verify(path)
        if problem:
            raise CheckpointError(problem)
        return path
    found = find_resumable(path, distributed.DistInfo(), say or (lambda text: print(text, file=sys.stderr)))
    if found is None:
        raise CheckpointError(f"{path}: neither a fastsft checkpoint (no {CHECKSUMS}) nor a run directory holding "
                              f"{PREFIX}* checkpoints")
    return found


# ---------------------------------------------------------------------------------------------------------------------
# RNG states (torch/CUDA as uint8 tensors, Python/numpy as JSON)


def capture_rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON-able Python/numpy states, torch/CUDA states as uint8 tensors)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {"python": [version, list(internal), gauss],
             "numpy": [name, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)]}
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    return plain, tensors


def restore_rng_state(plain: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])


# ---------------------------------------------------------------------------------------------------------------------
# Model and optimizer state as flat tensors (plain tensors in one process, DTensor shards under FSDP2)


def _local(value: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.to_local()
    return value


def _shard_dim(value: torch.Tensor, name: str) -> int | None:
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(value, DTensor):
        return None
    placements = tuple(value.placements)
    if len(placements) != 1 or not isinstance(placements[0], Shard):
        raise CheckpointError(f"cannot save {name}: placements {placements} (only a 1-D mesh of Shard(dim) is known)")
    return placements[0].dim


def _state_dicts(model, optimizer, trainable_only: bool = False) -> tuple[dict, dict]:
    """(model state, optimizer state) keyed by parameter name, as torch.distributed.checkpoint.state_dict gives them
    (the optimizer's state is created if it has none yet, so a fresh optimizer has a template to load into).
    trainable_only: the frozen parameters are left out (adapter runs: the base comes from model.path)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=trainable_only))


def _flat_optimizer(optim_state: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors = {}
    for param, entries in optim_state["state"].items():
        for key, value in entries.items():
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"cannot save optimizer state {param}/{key}: {type(value).__name__}, not a tensor")
            tensors[f"optim/{param}/{key}"] = value
    groups = []
    for group in optim_state["param_groups"]:
        plain = {}
        for key, value in group.items():
            if isinstance(value, tuple):
                value = list(value)
            if isinstance(value, torch.Tensor) or not _json_plain(value):
                raise CheckpointError(f"cannot save optimizer hyper-parameter {key}={value!r} as JSON")
            plain[key] = value
        groups.append(plain)
    return tensors, groups


def _json_plain(value) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, list):
        return all(_json_plain(v) for v in value)
    return False


# ---------------------------------------------------------------------------------------------------------------------
# Saving


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: _local(v).detach().to("cpu").contiguous() for k, v in tensors.items()}


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": FORMAT})
    fsync_file(path)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    fsync_file(path)


def _guard(action: Callable[[], None], where: Path) -> str | None:
    """Run a write; None, or a one-line description of why it failed (a full disk says so)."""
    full = f"disk full at {where}: free some space (or lower log.save_total_limit) and run again to resume"
    try:
        action()
    except OSError as e:
        return full if e.errno == errno.ENOSPC else f"could not write {where}: {e.strerror or e}"
    except RuntimeError as e:  # safetensors reports I/O failures as RuntimeError / SafetensorError
        if "No space left" in str(e) or "os error 28" in str(e):
            return full
        raise
    return None


def save(
    out_dir: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rank_state: dict,
    trainer_state: dict,
    write_shared: Callable[[Path], None],
    info: distributed.DistInfo,
    trainable_only: bool = False,
) -> Path:
    """Write one complete checkpoint (every rank calls this) and return its final path.

    rank_state: this rank's JSON-able state (schedule, loader position); the model and optimizer come from the
    objects, RNG states are captured here. write_shared(directory) writes rank 0's extra files (config.yaml,
    config.json, tokenizer). A failure on any rank (a full disk) removes the partial directory on every rank and
    raises CheckpointError.
    """
    out_dir = Path(out_dir)
    tmp = out_dir / f"{TMP_PREFIX}{step:08d}"
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        problem = _guard(lambda: tmp.mkdir(parents=True), tmp)
    else:
        problem = None
    problem = distributed.broadcast_object(problem, info)
    if problem:
        raise CheckpointError(problem)

    model_state, optim_state = _state_dicts(model, optimizer, trainable_only)
    optim_tensors, groups = _flat_optimizer(optim_state)
    rng_plain, rng_tensors = capture_rng_state()
    rank = info.rank
    written: list[Path] = []

    def write_rank_files():
        _save_tensors(_cpu(model_state), tmp / model_file(rank))
        written.append(tmp / model_file(rank))
        _save_tensors({**_cpu(optim_tensors), **rng_tensors}, tmp / state_file(rank))
        written.append(tmp / state_file(rank))
        _write_json(tmp / state_json(rank), {**rank_state, "optimizer_param_groups": groups, "rng": rng_plain})
        written.append(tmp / state_json(rank))

    def write_shared_files():
        index = {name: {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch."),
                        "shard_dim": _shard_dim(value, name)} for name, value in model_state.items()}
        _write_json(tmp / MODEL_INDEX, {"world_size": info.world_size, "tensors": index})
        write_shared(tmp)
        _write_json(tmp / STATE_JSON, {**trainer_state, "step": step})

    problem = _guard(write_rank_files, tmp)
    if problem is None and info.is_main:
        problem = _guard(write_shared_files, tmp)
    sums = {}
    if problem is None:
        files = [p for p in tmp.iterdir() if p.is_file()] if info.is_main else written
        sums = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files if _owner(p.name) == rank}
    reports = distributed.all_gather_object((problem, sums), info)
    problem = next((p for p, _ in reports if p), None)
    path = out_dir / checkpoint_name(step)
    if problem is None and info.is_main:
        files = {name: entry for _p, s in reports for name, entry in s.items()}

        def commit():
            # Written last: its presence marks the checkpoint complete.
            _write_json(tmp / CHECKSUMS, {"format": FORMAT, "step": step, "world_size": info.world_size,
                                          "files": dict(sorted(files.items()))})
            replace_dir(tmp, path)

        problem = _guard(commit, tmp)
    problem = distributed.broadcast_object(problem, info)
    if problem:
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(problem)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def _copy_into(template: dict, loaded: dict[str, torch.Tensor], file: Path, prefix: str = "") -> None:
    """Copy the loaded (local) tensors into the template's tensors in place; every name must match, shapes too."""
    names = {f"{prefix}{k}" for k in template}
    present = {k for k in loaded if k.startswith(prefix)} if prefix else set(loaded)
    if names != present:
        missing, extra = sorted(names - present), sorted(present - names)
        raise CheckpointError(f"{file} does not fit this model: missing {missing[:4]}, unexpected {extra[:4]}; resume "
                              "with the same model and options (or start a new --out)")
    with torch.no_grad():
        for key, value in template.items():
            target, source = _local(value), loaded[f"{prefix}{key}"]
            if target.shape != source.shape:
                raise CheckpointError(f"{file}: {prefix}{key} has shape {tuple(source.shape)}, this run "
                                      f"{tuple(target.shape)}; resume with the same model and number of processes")
            target.copy_(source)


def load(path: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         info: distributed.DistInfo, trainable_only: bool = False) -> tuple[dict, dict]:
    """Load model, optimizer and RNG state of this rank from a checkpoint written by the same number of processes.
    Returns (trainer_state, this rank's JSON state: schedule, loader position). Verify it first (find_resumable)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    path = Path(path)
    manifest = read_checksums(path)
    if manifest["world_size"] != info.world_size:
        raise CheckpointError(
            f"{path} was written by {manifest['world_size']} processes, this run has {info.world_size}; resume with "
            "the same number of processes (the data order is split per rank)"
        )
    trainer_state = read_trainer_state(path)
    rank = info.rank
    model_state, optim_state = _state_dicts(model, optimizer, trainable_only)
    _copy_into(model_state, _load_tensors(path / model_file(rank)), path / model_file(rank))
    extra = _load_tensors(path / state_file(rank))
    plain = read_json(path / state_json(rank))
    optim_template = {f"{param}/{key}": value for param, entries in optim_state["state"].items()
                      for key, value in entries.items()}
    _copy_into(optim_template, {k: v for k, v in extra.items() if k.startswith("optim/")},
               path / state_file(rank), prefix="optim/")
    groups = plain.get("optimizer_param_groups")
    if not isinstance(groups, list) or len(groups) != len(optim_state["param_groups"]):
        raise CheckpointError(f"{path / state_json(rank)}: optimizer_param_groups does not fit this optimizer")
    for template, saved in zip(optim_state["param_groups"], groups, strict=True):
        if list(template["params"]) != list(saved.get("params", [])):
            raise CheckpointError(f"{path / state_json(rank)}: the optimizer's parameter groups differ from this "
                                  "run's (another model or train.freeze?)")
        for key, value in saved.items():
            if key != "params":
                template[key] = tuple(value) if isinstance(template.get(key), tuple) else value
    options = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)  # names checked above
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state, options=options)
    if "rng/torch" not in extra or "rng" not in plain:
        raise CheckpointError(f"{path / state_file(rank)}: no RNG state")
    restore_rng_state(plain["rng"], {k: v for k, v in extra.items() if k.startswith("rng/")})
    return trainer_state, plain


def load_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The full (unsharded) model weights of a checkpoint, in one process: shards of a torchrun run are put back
    together along the dimension model-index.json names. For export and generate; verify first (`resolve`)."""
    path = Path(path)
    manifest = read_checksums(path)
    index = read_json(path / MODEL_INDEX).get("tensors")
    if not isinstance(index, dict):
        raise CheckpointError(f"{path / MODEL_INDEX}: 'tensors' missing")
    parts = [_load_tensors(path / model_file(r)) for r in range(manifest["world_size"])]
    full = {}
    for name, entry in index.items():
        try:
            pieces = [p[name] for p in parts]
        except KeyError:
            raise CheckpointError(f"{path}: tensor {name} is missing from a model-rank file") from None
        dim = entry.get("shard_dim")
        tensor = pieces[0] if dim is None else torch.cat(pieces, dim=dim)
        if list(tensor.shape) != entry.get("shape"):
            raise CheckpointError(f"{path}: {name} assembles to shape {list(tensor.shape)}, {MODEL_INDEX} says "
                                  f"{entry.get('shape')}")
        full[name] = tensor
    return full


# ---------------------------------------------------------------------------------------------------------------------
# Pruning


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
