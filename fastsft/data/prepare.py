"""Tokenize instruction data into checksummed shards with a loss mask (`fastsft prepare`).

Flow: input files or folders -> `sources` (record readers: .jsonl/.json, gzip, parquet, `datasets` folders, streamed
in batches) -> `formats` (records -> conversations or texts) -> `tokenizer` (ids + loss mask, in N worker
processes, order preserved) -> truncation/drop/split -> `ShardWriter` (OUT/train/*.shard, OUT/val/*.shard) ->
OUT/manifest.json, which the loader (`open_shards`, `PackedLoader`) reads.

Output is identical for any number of workers. The validation split is chosen per document by hashing (seed, token
ids, loss mask), so it is deterministic in the seed and identical duplicates always land in the same split.

Memory stays bounded whatever the input size: records are read in chunks, at most 4 chunks per worker are in flight,
and documents are written to shard files as they come.

The dataset is built in a hidden staging directory next to OUT and moved into place at the end, manifest written last:
a directory without manifest.json is incomplete. Staging directories left by a killed prepare (kill -9) are removed by
the next prepare of the same OUT. An OUT that already holds a dataset is replaced only with
--overwrite. Bad records stop prepare with their file, line and field unless --skip-bad (then they are counted, and a
few examples kept in the manifest); a malformed .json list (as opposed to one bad .jsonl line) always stops it,
since nothing after the error can be located.

(Over 500 lines on purpose: the staging, worker pool, split and manifest steps of one command read best in one file.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
import uuid
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastsft._fsutil import replace_dir
from fastsft.data.formats import FORMATS, DataError, normalize_record
from fastsft.data.manifest import MANIFEST_FORMAT_VERSION, MANIFEST_NAME, write_manifest
from fastsft.data.sources import (
    SourceFile,
    column_error,
    detect_source_format,
    iter_raw_records,
    load_record,
    map_columns,
    parse_columns,
    resolve_sources,
    surrogate_field,
)
from fastsft.data.tokenizer import EARLIER_REASONING, TRAIN_ON, Tokenizer, load_tokenizer, trained_turns

SPLITS = ("train", "val")
CHUNK_RECORDS = 256  # records per worker task: large enough to amortize IPC, small enough to keep workers busy
MAX_BAD_EXAMPLES = 5
DROP_NO_LOSS = "no_loss_tokens"
DROP_NO_LOSS_AFTER_TRUNCATION = "no_loss_tokens_after_truncation"
# Options that change the output (the cache key); workers and progress do not.
OUTPUT_OPTIONS = {"max_len": None, "format": "auto", "val_fraction": 0.0, "seed": 0, "skip_bad": False,
                  "train_on": "all", "split": None, "columns": None, "template_kwargs": None,
                  "earlier_reasoning": "template"}

# Per-record outcome codes, sent back from the workers.
KEPT, KEPT_TRUNCATED, DROPPED_NO_LOSS, DROPPED_AFTER_TRUNCATION, BAD = range(5)


# ---------------------------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", nargs="+", required=True, metavar="PATH",
                        help="files or folders, in order: .jsonl / .json (a list), optionally .gz; .parquet; a folder "
                             "written by datasets' save_to_disk; a folder of such files (a hub download)")
    parser.add_argument("--split", default=None, metavar="NAME",
                        help="the split to read from a DatasetDict folder or a hub folder with several splits")
    parser.add_argument("--columns", default=None, metavar="FIELD=COLUMN[,...]",
                        help="read a format's field from another column, e.g. messages=conversations or "
                             "prompt=question,completion=answer")
    parser.add_argument("--tokenizer", required=True, metavar="PATH|byte",
                        help="a local Hugging Face tokenizer directory, or 'byte' for the built-in byte tokenizer")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (manifest.json, train/, val/)")
    parser.add_argument("--max-len", type=int, default=None, metavar="N",
                        help="truncate documents to N tokens (a document left with no trained token is dropped)")
    parser.add_argument("--format", default="auto", choices=("auto", *FORMATS),
                        help="record format; auto detects it per file from its first record")
    parser.add_argument("--workers", type=int, default=1, metavar="N", help="tokenizer processes (output is the same)")
    parser.add_argument("--val-fraction", type=float, default=0.0, metavar="F",
                        help="share of documents for the validation split, in [0, 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    parser.add_argument("--skip-bad", action="store_true", help="skip and count bad records instead of stopping")
    parser.add_argument("--train-on", default="all", choices=TRAIN_ON,
                        help="train on every assistant turn (all) or only the final one (last)")
    parser.add_argument("--chat-template-kwargs", type=json_object_arg, default=None, metavar="JSON",
                        help="keyword arguments for the chat template, as a JSON object (e.g. '{\"enable_thinking\": "
                             "false}'); the same ones must be used at inference")
    parser.add_argument("--earlier-reasoning", default="template", choices=EARLIER_REASONING,
                        help="reasoning of assistant turns the template does not render (e.g. Qwen3 drops it before "
                             "the last user message): template = train those turns as rendered, without it; keep = "
                             "train each such turn in its own document, the conversation up to it, reasoning shown")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    try:
        manifest = prepare_dataset(
            args.data, args.tokenizer, args.out, max_len=args.max_len, format=args.format, workers=args.workers,
            val_fraction=args.val_fraction, seed=args.seed, skip_bad=args.skip_bad, train_on=args.train_on,
            progress=not args.no_progress, overwrite=args.overwrite, split=args.split, columns=args.columns,
            template_kwargs=args.chat_template_kwargs, earlier_reasoning=args.earlier_reasoning,
        )
    except (ValueError, OSError) as e:  # DataError and ShardError are ValueErrors
        print(f"fastsft prepare: error: {e}", file=sys.stderr)
        return 1
    print(summary_text(manifest, args.out))
    return 0


def json_object_arg(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e.msg}): give an object such as '{{\"enable_thinking\": false}}'")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object such as '{\"enable_thinking\": false}'")
    return value


def summary_text(manifest: dict, out_dir) -> str:
    lines = [f"fastsft prepare: wrote {out_dir}"]
    for name, split in manifest["splits"].items():
        lines.append(f"  {name}: {split['documents']} documents, {split['tokens']} tokens, "
                     f"{split['loss_tokens']} trained, {len(split['files'])} shard file(s)")
    records = manifest["records"]
    lines.append(f"  records: {records['read']} read, {records['truncated']} truncated, "
                 f"{sum(records['dropped'].values())} dropped {records['dropped']}, {records['skipped_bad']} bad skipped")
    lines.extend(f"  warning: {w}" for w in manifest["warnings"])
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- Python API


def prepare_dataset(data_files, tokenizer, out_dir, max_len=None, format="auto", workers=1, val_fraction=0.0, seed=0,
                    skip_bad=False, train_on="all", progress=True, overwrite=False, split=None, columns=None,
                    template_kwargs=None, earlier_reasoning="template") -> dict:
    """Tokenize `data_files` (files or folders, see `sources`) into OUT/train and OUT/val shards and write
    OUT/manifest.json; returns the manifest.

    `tokenizer`: "byte", a tokenizer directory, or a Tokenizer from `load_tokenizer`. `split`: the split of a
    DatasetDict or hub folder. `columns`: {format field: column} or "field=column,..." (see `sources.parse_columns`).
    `template_kwargs`: keyword arguments for the chat template (e.g. {"enable_thinking": False});
    `earlier_reasoning`: "template" or "keep" (see `--earlier-reasoning`).
    """
    data_files = [Path(f) for f in ([data_files] if isinstance(data_files, str | Path) else data_files)]
    _check_options(data_files, max_len, format, workers, val_fraction, train_on)
    columns = parse_columns(columns)
    sources = resolve_sources(data_files, split)
    tokenizer = load_tokenizer(tokenizer)
    out_dir = Path(out_dir)
    remove_stale_staging(out_dir)
    _check_out_dir(out_dir, overwrite)
    if earlier_reasoning not in EARLIER_REASONING:
        raise ValueError(f"--earlier-reasoning {earlier_reasoning}: expected one of {', '.join(EARLIER_REASONING)}")
    if template_kwargs is not None and not isinstance(template_kwargs, dict):
        raise ValueError("--chat-template-kwargs: must be a JSON object")
    options = dict(max_len=max_len, format=format, workers=workers, val_fraction=val_fraction, seed=seed,
                   skip_bad=skip_bad, train_on=train_on, split=split, columns=columns or None,
                   template_kwargs=template_kwargs or None, earlier_reasoning=earlier_reasoning)

    formats = [detect_source_format(src, columns) if format == "auto" else format for src in sources]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        manifest = _write_dataset(sources, formats, tokenizer, staging, options, progress)
        replace_dir(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def prepare_cached(data_files, tokenizer_spec, cache_root, **opts) -> Path:
    """Prepare into cache_root/<hash of file contents + tokenizer identity + output options> unless it is already
    there; returns that directory. `opts` are `prepare_dataset`'s keyword arguments."""
    data_files = [Path(f) for f in ([data_files] if isinstance(data_files, str | Path) else data_files)]
    sources = resolve_sources(data_files, opts.get("split"))
    tokenizer = load_tokenizer(tokenizer_spec)
    identity = {k: v for k, v in tokenizer.identity().items() if k not in ("path", "name")}
    key_source = {
        "manifest_format_version": MANIFEST_FORMAT_VERSION,
        "files": [file_sha256(src.path) for src in sources],
        "tokenizer": identity,
        "options": {k: opts.get(k, default) for k, default in OUTPUT_OPTIONS.items() if k != "columns"},
        "columns": parse_columns(opts.get("columns")),
    }
    key = hashlib.sha256(json.dumps(key_source, sort_keys=True).encode()).hexdigest()[:24]
    out_dir = Path(cache_root) / key
    if (out_dir / MANIFEST_NAME).is_file():
        return out_dir
    prepare_dataset(data_files, tokenizer, out_dir, overwrite=True, **opts)
    return out_dir


# ---------------------------------------------------------------------------------------------- checks


def _check_options(data_files, max_len, format, workers, val_fraction, train_on) -> None:
    if not data_files:
        raise ValueError("--data: give at least one file or folder")
    if max_len is not None and (not isinstance(max_len, int) or max_len < 2):
        raise ValueError(f"--max-len {max_len}: must be an integer >= 2 (or absent for no truncation)")
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"--format {format}: expected auto or one of {', '.join(FORMATS)}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"--workers {workers}: must be an integer >= 1")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    if train_on not in TRAIN_ON:
        raise ValueError(f"--train-on {train_on}: expected one of {', '.join(TRAIN_ON)}")


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse to clobber: a complete dataset needs --overwrite; anything not ours is never touched."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"--out {out_dir}: exists and is not a directory")
    entries = set(os.listdir(out_dir))
    if not entries:
        return
    if not entries <= {MANIFEST_NAME, *SPLITS}:
        listed = ", ".join(sorted(entries)[:5])
        raise FileExistsError(f"--out {out_dir}: not empty and not a fastsft dataset (holds {listed}); "
                              "choose a new or empty directory")
    if overwrite:
        return
    if MANIFEST_NAME in entries:
        raise FileExistsError(f"--out {out_dir}: already holds a prepared dataset; pass --overwrite to replace it "
                              "or choose another directory")
    raise FileExistsError(f"--out {out_dir}: holds an incomplete dataset (no manifest.json: an interrupted prepare?); "
                          "pass --overwrite to replace it")


def remove_stale_staging(out_dir: Path) -> None:
    """Remove the staging (and set-aside) directories of OUT left by a prepare that was killed: their names carry
    the pid of the prepare that made them, and that process no longer exists."""
    parent = out_dir.parent
    if not parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.(?:staging|old)-(\d+)-[0-9a-f]+")
    for entry in os.listdir(parent):
        match = pattern.fullmatch(entry)
        if match and not _process_alive(int(match.group(1))):
            shutil.rmtree(parent / entry, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- tokenizing


@dataclass
class Chunk:
    """A run of consecutive records of one file: what one worker task tokenizes."""

    path: str
    fmt: str
    items: list  # (line, record_index, payload) from sources.iter_raw_records
    nbytes: int


@dataclass
class Job:
    """Everything a worker needs, fixed for the whole run."""

    tokenizer: Tokenizer
    train_on: str
    max_len: int | None
    val_fraction: float
    seed: int
    columns: dict | None = None
    template_kwargs: dict | None = None
    earlier_reasoning: str = "template"


def iter_chunks(sources, formats, chunk_records=CHUNK_RECORDS):
    for source, fmt in zip(sources, formats, strict=True):
        if not isinstance(source, SourceFile):
            source = resolve_sources([source])[0]
        items, nbytes = [], 0
        for line, record_index, payload, size in iter_raw_records(source):
            items.append((line, record_index, payload))
            nbytes += size
            if len(items) == chunk_records:
                yield Chunk(str(source.path), fmt, items, nbytes)
                items, nbytes = [], 0
        if items:
            yield Chunk(str(source.path), fmt, items, nbytes)


def tokenize_chunk(job: Job, chunk: Chunk):
    """Tokenize one chunk. Returns (tokens, masks, lengths, is_val, statuses, doc_counts, errors, counts): the kept
    documents' ids and masks concatenated (one array each, cheap to send between processes), their lengths and split,
    one status code and one kept-document count per record (a record gives more than one document only with
    earlier_reasoning="keep"), the DataError of each BAD record in order, and the chunk's file counts."""
    staged = stage_chunk(job, chunk)
    return finish_chunk(job, chunk, staged, encode_staged(job, staged))


@dataclass
class Staged:
    """A chunk up to tokenizing its texts: its records normalized, and its documents staged (`Tokenizer.start_batch`)
    or, when staging them together failed, None (then `finish_chunk` encodes them one by one to locate the failure)."""

    normalized: list  # per record: (its document, the record), or the DataError that stopped it
    batch: object | None
    counts: dict


def stage_chunk(job: Job, chunk: Chunk) -> Staged:
    """Read, normalize and stage one chunk: everything before its texts are tokenized."""
    counts = {"path": chunk.path, "trained_turns": 0, "trained_tokens": 0, "reasoning_not_rendered": 0}
    normalized = []
    for line, record_index, payload in chunk.items:
        try:
            record = map_columns(load_record(payload, chunk.path, line, record_index), job.columns)
            normalized.append((normalize_record(record, chunk.fmt, chunk.path, line, record_index), record))
        except DataError as e:
            normalized.append(e)
    batch_counts = {}
    try:
        batch = job.tokenizer.start_batch([d for d, _ in _good(normalized)], job.train_on, job.template_kwargs,
                                          job.earlier_reasoning, batch_counts)
    except (UnicodeError, TypeError, ValueError) as e:  # outside the template checks: a lone surrogate
        if isinstance(e, DataError):
            raise
        return Staged(normalized, None, counts)
    for key, value in batch_counts.items():
        counts[key] = counts.get(key, 0) + value
    return Staged(normalized, batch, counts)


def encode_staged(job: Job, staged: Staged):
    """Tokenize a staged chunk's texts (in one batch, without the GIL); None when that fails, so that
    `finish_chunk` encodes the chunk's documents one by one and locates the failure."""
    if staged.batch is None:
        return None
    try:
        return job.tokenizer.encode_texts(staged.batch.texts)
    except (UnicodeError, TypeError, ValueError):  # a text the tokenizer cannot take (a lone surrogate)
        return None


def finish_chunk(job: Job, chunk: Chunk, staged: Staged, encodings):
    """`tokenize_chunk`'s result from a staged chunk and its texts' encodings."""
    token_parts, mask_parts, lengths, is_val, statuses, doc_counts, errors = [], [], [], [], [], [], []
    counts, normalized = staged.counts, staged.normalized
    if encodings is None:  # encode each document alone, so the one that fails is located
        counts.update(trained_turns=0, trained_tokens=0, reasoning_not_rendered=0)
        encoded = []
        for document, record in _good(normalized):
            try:
                encoded.append(_encode(job, document, record, counts))
            except DataError as e:
                encoded.append(e)
    else:
        encoded = job.tokenizer.finish_batch(staged.batch, encodings)
    encoded = iter(encoded)
    for (line, record_index, _), document in zip(chunk.items, normalized, strict=True):
        documents = document if isinstance(document, DataError) else next(encoded)
        document = None if isinstance(document, DataError) else document[0]
        if isinstance(documents, DataError):
            e = documents
            statuses.append(BAD)
            doc_counts.append(0)
            e = column_error(e, job.columns)
            errors.append(e if e.path else DataError(e.problem, chunk.path, line, record_index, e.field))
            continue
        kept = truncated = 0
        for ids, mask in documents:
            if job.max_len is not None and len(ids) > job.max_len:
                ids, mask = ids[: job.max_len], mask[: job.max_len]
                truncated += 1
            trained = int(np.count_nonzero(mask))
            if not trained:
                continue
            kept += 1
            token_parts.append(ids)
            mask_parts.append(mask)
            lengths.append(len(ids))
            is_val.append(job.val_fraction > 0 and split_hash(job.seed, ids, mask) < job.val_fraction)
            counts["trained_tokens"] += trained
        if kept:
            statuses.append(KEPT_TRUNCATED if truncated else KEPT)
            if not isinstance(document, str):
                counts["trained_turns"] += len(trained_turns(document, job.train_on))
        else:
            statuses.append(DROPPED_AFTER_TRUNCATION if truncated else DROPPED_NO_LOSS)
        doc_counts.append(kept)
    tokens = np.concatenate(token_parts) if token_parts else np.zeros(0, np.int32)
    masks = np.concatenate(mask_parts) if mask_parts else np.zeros(0, np.uint8)
    return (tokens, masks, np.asarray(lengths, np.int64), np.asarray(is_val, bool), np.asarray(statuses, np.uint8),
            np.asarray(doc_counts, np.int64), errors, counts)


def _good(normalized: list) -> list:
    return [d for d in normalized if not isinstance(d, DataError)]


def _encode(job: Job, document, record: dict, counts: dict):
    try:
        return job.tokenizer.encode_documents(document, job.train_on, job.template_kwargs, job.earlier_reasoning,
                                              counts)
    except (UnicodeError, TypeError, ValueError):
        field = surrogate_field(record)  # looked for only when encoding failed: most text has none
        if field is None:
            raise
        raise DataError("holds a lone surrogate (an unpaired \\ud800-\\udfff escape), which is not valid Unicode "
                        "text; fix or remove it", field=field) from None


def split_hash(seed: int, ids: np.ndarray, mask: np.ndarray) -> float:
    """A number in [0, 1) determined by the seed and the document's content."""
    digest = hashlib.blake2b(digest_size=8, key=int(seed).to_bytes(8, "little", signed=True))
    digest.update(np.ascontiguousarray(ids, dtype="<i4").tobytes())
    digest.update(np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
    return int.from_bytes(digest.digest(), "little") / 2.0**64


_WORKER_JOB: Job | None = None


def _init_worker(job: Job) -> None:
    global _WORKER_JOB
    _WORKER_JOB = job
    # The worker processes are the parallelism: one tokenizer thread each, not one per core each.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _worker_tokenize_chunk(chunk: Chunk):
    return tokenize_chunk(_WORKER_JOB, chunk)


def tokenized_chunks(job: Job, chunks, workers: int):
    """Yield (chunk bytes, tokenize_chunk result) in chunk order, using `workers` processes.

    At most 4 tasks per worker are in flight, so memory stays bounded however large the input (Pool.imap would read
    the whole input ahead)."""
    if workers == 1:
        # Pipelined: chunk k's texts are tokenized on a thread (the tokenizer leaves the GIL and uses its own threads)
        # while this thread stages chunk k+1 (reading, rendering, placing turns) and finishes chunk k-1.
        with ThreadPoolExecutor(1, thread_name_prefix="fastsft-tokenize") as pool:
            pending = deque()
            try:
                for chunk in chunks:
                    staged = stage_chunk(job, chunk)
                    pending.append((chunk, staged, pool.submit(encode_staged, job, staged)))
                    if len(pending) > 1:
                        chunk, staged, encoded = pending.popleft()
                        yield chunk.nbytes, finish_chunk(job, chunk, staged, encoded.result())
                while pending:
                    chunk, staged, encoded = pending.popleft()
                    yield chunk.nbytes, finish_chunk(job, chunk, staged, encoded.result())
            finally:
                for _, _, encoded in pending:
                    encoded.cancel()
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers, initializer=_init_worker, initargs=(job,)) as pool:
        pending = deque()
        for chunk in chunks:
            pending.append((chunk.nbytes, pool.apply_async(_worker_tokenize_chunk, (chunk,))))
            if len(pending) >= 4 * workers:
                nbytes, result = pending.popleft()
                yield nbytes, result.get()
        while pending:
            nbytes, result = pending.popleft()
            yield nbytes, result.get()


# ---------------------------------------------------------------------------------------------- writing


class _Tally:
    """Counts over the whole run, for the manifest."""

    def __init__(self):
        self.read = 0
        self.documents = 0
        self.truncated = 0
        self.dropped = Counter()
        self.skipped = 0
        self.skipped_by_field = Counter()
        self.bad_examples: list[str] = []
        self.length_log2 = np.zeros(64, np.int64)  # bucket k: lengths in (2**(k-1), 2**k]
        self.files: dict[str, Counter] = {}  # per data file: records kept, trained turns, trained tokens
        self.reasoning_not_rendered = 0

    def bad(self, error: DataError) -> None:
        self.skipped += 1
        field = error.field or ("json" if error.problem.startswith(("malformed JSON", "not valid UTF-8")) else "record")
        self.skipped_by_field[re.sub(r"\[\d+\]", "[]", field)] += 1
        if len(self.bad_examples) < MAX_BAD_EXAMPLES:
            self.bad_examples.append(str(error))

    def kept(self, length: int) -> None:
        self.documents += 1
        self.length_log2[int(length - 1).bit_length()] += 1

    def histogram(self) -> list[dict]:
        return [{"min": 1 if k == 0 else 2 ** (k - 1) + 1, "max": 2**k, "documents": int(n)}
                for k, n in enumerate(self.length_log2) if n]


def _write_dataset(sources, formats, tokenizer, staging: Path, options: dict, progress: bool) -> dict:
    started = time.time()
    job = Job(tokenizer, options["train_on"], options["max_len"], options["val_fraction"], options["seed"],
              options["columns"], options["template_kwargs"], options["earlier_reasoning"])
    split_names = SPLITS if options["val_fraction"] > 0 else SPLITS[:1]
    from fastsft.data.shards import ShardWriter

    writers = {name: ShardWriter(staging / name, tokenizer.vocab_size) for name in split_names}
    tally = _Tally()
    bar = _progress_bar(sum(src.path.stat().st_size for src in sources), progress)
    results = tokenized_chunks(job, iter_chunks(sources, formats), options["workers"])
    try:
        for nbytes, result in results:
            _consume(result, writers, tally, options["skip_bad"])
            bar.update(nbytes)
            bar.set_postfix(documents=tally.documents, refresh=False)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        results.close()  # stops the worker pool now, not when the traceback is freed
        bar.close()
    summaries = {name: writer.close() for name, writer in writers.items()}

    kept = sum(s["documents"] for s in summaries.values())
    if kept == 0:
        raise DataError(f"empty dataset: no document left from {len(sources)} file(s) ({tally.read} records read, "
                        f"{tally.skipped} bad skipped, dropped {dict(tally.dropped)})")
    warnings = []
    if tally.reasoning_not_rendered:
        warnings.append(f"{tally.reasoning_not_rendered} trained assistant turn(s) carry reasoning the chat template "
                        "does not render (e.g. Qwen3 drops it before the last user message): they train without it; "
                        "--earlier-reasoning keep trains each in its own document with its reasoning")
    if "val" in summaries and summaries["val"]["documents"] == 0:
        warnings.append(f"val_fraction {options['val_fraction']} chose no document for validation "
                        f"(only {kept} documents); the dataset has no val split")
        del summaries["val"]
    if summaries["train"]["documents"] == 0:
        raise DataError("every document went to the validation split; lower --val-fraction")

    manifest = {
        "format_version": MANIFEST_FORMAT_VERSION,
        "created_by": f"fastsft {_fastsft_version()}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tokenizer": tokenizer.identity(),
        "vocab_size": tokenizer.vocab_size,
        "data_files": [
            {"path": str(src.path.resolve()), "bytes": src.path.stat().st_size, "sha256": file_sha256(src.path),
             "format": fmt, **{k: int(tally.files.get(str(src.path), {}).get(k, 0))
                               for k in ("records_kept", "trained_turns", "trained_tokens")}}
            for src, fmt in zip(sources, formats, strict=True)
        ],
        "splits": {
            name: {"files": [f"{name}/{file}" for file in s["files"]], "documents": s["documents"],
                   "tokens": s["tokens"], "loss_tokens": s["loss_tokens"]}
            for name, s in summaries.items()
        },
        "length_histogram": tally.histogram(),
        "records": {
            "read": tally.read,
            "kept": kept,
            "truncated": tally.truncated,
            "dropped": {DROP_NO_LOSS: tally.dropped[DROP_NO_LOSS],
                        DROP_NO_LOSS_AFTER_TRUNCATION: tally.dropped[DROP_NO_LOSS_AFTER_TRUNCATION]},
            "skipped_bad": tally.skipped,
            "skipped_bad_by_field": dict(tally.skipped_by_field),
            "bad_examples": tally.bad_examples,
        },
        "options": dict(options),
        "warnings": warnings,
        "seconds": round(time.time() - started, 3),
    }
    write_manifest(staging, manifest)
    return manifest


def _consume(result, writers: dict, tally: _Tally, skip_bad: bool) -> None:
    """Write one chunk's kept documents to their splits and count the rest (in record order)."""
    tokens, masks, lengths, is_val, statuses, doc_counts, errors, counts = result
    errors = iter(errors)
    offset, doc = 0, 0
    per_file = tally.files.setdefault(counts["path"], Counter())
    per_file["trained_turns"] += counts["trained_turns"]
    per_file["trained_tokens"] += counts["trained_tokens"]
    tally.reasoning_not_rendered += counts["reasoning_not_rendered"]
    for status, n_docs in zip(statuses, doc_counts, strict=True):
        tally.read += 1
        if status == BAD:
            error = next(errors)
            if not skip_bad:
                raise error
            tally.bad(error)
        elif status == DROPPED_NO_LOSS:
            tally.dropped[DROP_NO_LOSS] += 1
        elif status == DROPPED_AFTER_TRUNCATION:
            tally.truncated += 1
            tally.dropped[DROP_NO_LOSS_AFTER_TRUNCATION] += 1
        else:
            tally.truncated += int(status == KEPT_TRUNCATED)
            per_file["records_kept"] += 1
            for _ in range(n_docs):
                n = int(lengths[doc])
                writers["val" if is_val[doc] else "train"].add(tokens[offset: offset + n], masks[offset: offset + n])
                tally.kept(n)
                offset += n
                doc += 1


def _progress_bar(total_bytes: int, progress: bool):
    from tqdm import tqdm

    enabled = progress and sys.stderr.isatty()
    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", disable=not enabled, leave=False)


def _fastsft_version() -> str:
    from fastsft import __version__

    return __version__
