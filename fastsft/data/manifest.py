"""`manifest.json`: the one reader and writer of a prepared dataset's manifest.

Flow: `fastsft prepare` -> shards (fastsft/data/shards.py) -> `write_manifest` (written last: a directory without a
manifest is incomplete) -> `read_manifest` / `split_paths` -> `open_shards` (which compares the manifest with the
shard headers: `shards.check_manifest_against_shards`) -> loader.
The trainer reads the recorded tokenizer and split sizes through `read_manifest` too; nothing else parses the file.

What is checked, and where:
- `read_manifest`: JSON object; `format_version` (when present) is one this fastsft reads; `vocab_size` a positive
  int; `splits` an object of split objects, each with `files` a list of shard paths and optional non-negative int
  `documents` / `tokens` / `loss_tokens`.
- `split_paths`: every listed path is relative, has no `..` component, ends in `.shard`, and resolves (symlinks
  followed) inside the dataset directory; no file is listed twice, in one split or across splits, and no file sits
  under another split's directory (`val/...` listed as train).
- `shards.check_manifest_against_shards` (beside the format it knows): the split's recorded counts equal the sums of
  its shards' headers, every shard's largest token id is below `vocab_size`, and each shard's token width is the one
  that vocabulary implies.
Errors name the manifest and the field (`splits.train.files[2]`), never print the contents of a file they point at.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath

from fastsft.data.errors import ShardError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT_VERSION = 1
SPLIT_COUNT_FIELDS = ("documents", "tokens", "loss_tokens")
_SHARD_SUFFIX = ".shard"  # fastsft.data.shards.SHARD_SUFFIX (shards imports this module, not the other way)


def manifest_error(path, message: str) -> ShardError:
    """A ShardError (the class `fastsft train` reports as one line) naming the manifest file."""
    return ShardError(f"{path}: {message}")


def manifest_path(directory) -> Path:
    return Path(directory) / MANIFEST_NAME


def has_manifest(directory) -> bool:
    return manifest_path(directory).is_file()


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_manifest(directory) -> dict:
    """The validated manifest of a prepared directory (see the module docstring for what is checked)."""
    path = manifest_path(directory)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise manifest_error(path, f"cannot read the manifest ({e.strerror}); re-run `fastsft prepare`") from None
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise manifest_error(path, "not UTF-8 text, so not a fastsft manifest; re-run `fastsft prepare`") from None
    except json.JSONDecodeError as e:
        raise manifest_error(path, f"not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                                   "re-run `fastsft prepare`") from None
    except RecursionError:
        raise manifest_error(path, "JSON nested too deeply, not a fastsft manifest") from None
    validate_manifest(manifest, path)
    return manifest


def validate_manifest(manifest, path) -> None:
    """Structural checks of a manifest object (raises naming `path` and the field)."""
    if not isinstance(manifest, dict):
        raise manifest_error(path, f"expected a JSON object, got {type(manifest).__name__}")
    version = manifest.get("format_version", MANIFEST_FORMAT_VERSION)
    if version != MANIFEST_FORMAT_VERSION or isinstance(version, bool):
        raise manifest_error(path, f"format_version {version!r}: this fastsft reads version "
                                   f"{MANIFEST_FORMAT_VERSION}; re-run `fastsft prepare` with this version")
    vocab = manifest.get("vocab_size")
    if vocab is not None and not (_is_count(vocab) and vocab >= 1):
        raise manifest_error(path, f"vocab_size must be a positive integer, got {vocab!r}")
    tokenizer = manifest.get("tokenizer")
    if tokenizer is not None and not isinstance(tokenizer, dict):
        raise manifest_error(path, f"tokenizer must be an object, got {type(tokenizer).__name__}")
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not splits:
        raise manifest_error(path, "field 'splits' must be a non-empty object of splits (e.g. {\"train\": "
                                   "{\"files\": [...]}}); re-run `fastsft prepare`")
    for name, split in splits.items():
        if not isinstance(split, dict):
            raise manifest_error(path, f"splits.{name} must be an object with a 'files' list")
        files = split.get("files")
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise manifest_error(path, f"splits.{name}.files must be a list of shard file names")
        for field in SPLIT_COUNT_FIELDS:
            if field in split and not _is_count(split[field]):
                raise manifest_error(path, f"splits.{name}.{field} must be a non-negative integer, "
                                           f"got {split[field]!r}")


def split_names(manifest: dict) -> list[str]:
    return list(manifest["splits"])


def split_info(manifest: dict, split: str) -> dict | None:
    """The split's object ({"files", "documents", ...}) or None when the manifest has no such split."""
    return manifest["splits"].get(split)


def _resolve_inside(directory: Path, rel: str, path, field: str) -> Path:
    pure = PurePosixPath(rel)
    if not rel or pure.is_absolute() or os.path.isabs(rel) or "\\" in rel or "\0" in rel:
        raise manifest_error(path, f"{field} = {rel!r}: must be a path relative to the dataset directory")
    if ".." in pure.parts:
        raise manifest_error(path, f"{field} = {rel!r}: '..' would leave the dataset directory; list files "
                                   "inside it")
    if not rel.endswith(_SHARD_SUFFIX):
        raise manifest_error(path, f"{field} = {rel!r}: not a {_SHARD_SUFFIX} file")
    root = directory.resolve()
    target = (root / pure).resolve()
    if not target.is_relative_to(root):
        raise manifest_error(path, f"{field} = {rel!r}: resolves outside the dataset directory (a symbolic link?)")
    return target


def split_paths(directory, manifest: dict, split: str) -> list[Path]:
    """The shard files of `split`, checked to lie inside `directory`, each listed once in the whole manifest."""
    directory = Path(directory)
    path = manifest_path(directory)
    if split not in manifest["splits"]:
        raise manifest_error(path, f"no split {split!r} (splits: {split_names(manifest)})")
    seen: dict[Path, str] = {}
    resolved = {}
    for name, info in manifest["splits"].items():
        for i, rel in enumerate(info["files"]):
            field = f"splits.{name}.files[{i}]"
            target = _resolve_inside(directory, rel, path, field)
            if target in seen:
                raise manifest_error(path, f"{field} = {rel!r} is also listed as {seen[target]}; a file listed "
                                           "twice would train its documents twice")
            seen[target] = field
            resolved[name, i] = target
    for name, info in manifest["splits"].items():
        for i, rel in enumerate(info["files"]):
            parts = PurePosixPath(rel).parts
            if len(parts) > 1 and parts[0] in manifest["splits"] and parts[0] != name:
                raise manifest_error(path, f"splits.{name}.files[{i}] = {rel!r} lies in the {parts[0]!r} split's "
                                           f"directory but is listed under {name!r}")
    return [resolved[split, i] for i in range(len(manifest["splits"][split]["files"]))]


def split_documents(directory, split: str) -> int | None:
    """Documents recorded for `split`: None without a manifest (a bare shard directory), 0 when the split is absent
    or lists no file, else the recorded count (-1 when the manifest lists files but records no count)."""
    if not has_manifest(directory):
        return None
    info = split_info(read_manifest(directory), split)
    if not info or not info["files"]:
        return 0
    return info.get("documents", -1)


def recorded_tokenizer(directory) -> dict | None:
    """The tokenizer identity recorded by `fastsft prepare` (None without a manifest or without the field)."""
    if not has_manifest(directory):
        return None
    return read_manifest(directory).get("tokenizer")


def write_manifest(directory, manifest: dict) -> Path:
    """Validate and write `directory/manifest.json` atomically (temporary file, fsync, rename)."""
    path = manifest_path(directory)
    validate_manifest(manifest, path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
