"""Record readers for `fastsft prepare`: every input kind a user already has, streamed record by record.

First stage of the data flow (files -> records -> `formats` -> tokenizer -> shards). Accepted inputs:
  .jsonl / .jsonl.gz        one JSON object per line (blank lines allowed)
  .json / .json.gz          one JSON list of objects, walked element by element (never held whole)
  .parquet                  rows of a parquet file, read in batches
  a `datasets` folder       written by `Dataset.save_to_disk` (state.json + .arrow files) or `DatasetDict.save_to_disk`
                            (dataset_dict.json + one folder per split: choose one with `split`)
  any other folder          the supported files under it, in path order, as a hub download leaves them
                            (`data/train-00000-of-00002.parquet`, `train/0000.parquet`, `test.jsonl`, ...): files of
                            one split are chosen by `split` (a folder named after it, or a file name starting with it)

Parquet and Arrow files are read with pyarrow: the maintained reader of both formats (the one `datasets` itself uses),
which decodes column batches in C++ and lets us stream rows without importing `datasets`. It is imported only when
such a file is read.

Each record comes with its location: (line, record index) — the line for .jsonl, the record index for .json (plus the
line where it starts), the row for parquet/arrow (0-based, per file). Every problem is a `formats.DataError` naming the
file, line or row, and field. Memory stays bounded whatever the input size: readers hold one batch of rows or one
buffer of text, never a whole file.

Column mapping (`--columns messages=conversations,prompt=question`) renames a record's top-level fields to the names
the formats expect, before format detection and normalization; errors name the user's column.

(Over 500 lines on purpose: one reader per input kind, each small, share the location and error rules above.)
"""

from __future__ import annotations

import codecs
import gzip
import json
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fastsft.data.formats import _DETECT_KEYS, DataError, _json_type, detect_format, normalize_record

KINDS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
BATCH_ROWS = 1024  # rows per parquet/arrow batch: large enough for pyarrow's speed, small enough to bound memory
READ_BYTES = 1 << 20  # text read per step of the .json list walker
# Fields of the record formats that --columns may map to (formats.py's top-level keys).
COLUMN_TARGETS = ("messages", "conversations", "instruction", "input", "output", "system", "prompt", "completion",
                  "text")
KNOWN_SPLITS = ("train", "test", "validation", "valid", "val", "dev", "eval")
# JSON files of a dataset folder that describe it rather than hold records.
METADATA_FILES = ("dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json")


@dataclass(frozen=True)
class SourceFile:
    """One file to read: its path, kind (jsonl/json/parquet/arrow), whether gzip-compressed."""

    path: Path
    kind: str
    gzip: bool = False


# ---------------------------------------------------------------------------------------------- finding files


def file_kind(path) -> tuple[str, bool] | None:
    """(kind, gzip) for a supported file name, else None."""
    name = Path(path).name.lower()
    compressed = name.endswith(".gz")
    if compressed:
        name = name[:-3]
    kind = KINDS.get(os.path.splitext(name)[1])
    if kind is None or (compressed and kind not in ("jsonl", "json")):
        return None
    return kind, compressed


def resolve_sources(paths, split: str | None = None) -> list[SourceFile]:
    """The files to read, in order, for the given --data paths (files or folders) and --split."""
    sources = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            sources.extend(_folder_sources(path, split))
        elif path.is_file():
            if split is not None:
                raise ValueError(f"--split {split}: chooses a split of a folder, but --data {path} is a file; drop "
                                 "--split or give the folder")
            kind = file_kind(path)
            if kind is None:
                raise DataError("unsupported file type: use .jsonl, .json (optionally .gz), .parquet, .arrow, or a "
                                "folder written by datasets' save_to_disk", path)
            sources.append(SourceFile(path, *kind))
        else:
            raise FileNotFoundError(f"--data {path}: no such file or folder")
    return sources


def _folder_sources(folder: Path, split: str | None) -> list[SourceFile]:
    if (folder / "dataset_dict.json").is_file():
        splits = _read_json(folder / "dataset_dict.json").get("splits")
        if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
            raise DataError("field 'splits': must be a list of split names (a DatasetDict.save_to_disk folder)",
                            folder / "dataset_dict.json")
        if split is None and len(splits) == 1:
            split = splits[0]
        if split is None:
            raise DataError(f"a DatasetDict with splits {', '.join(splits)}: choose one with --split", folder)
        if split not in splits:
            raise DataError(f"--split {split}: not a split of this DatasetDict (it has {', '.join(splits)})", folder)
        return _saved_dataset_sources(_inside(folder, split, folder / "dataset_dict.json"), split)
    if (folder / "state.json").is_file():
        return _saved_dataset_sources(folder, split)
    return _hub_folder_sources(folder, split)


def _saved_dataset_sources(folder: Path, split: str | None) -> list[SourceFile]:
    """The .arrow files of a `Dataset.save_to_disk` folder, in the order its state.json lists them."""
    state_path = folder / "state.json"
    state = _read_json(state_path)
    recorded = state.get("_split")
    if split is not None and isinstance(recorded, str) and recorded != split:
        raise DataError(f"--split {split}: this saved Dataset holds the '{recorded}' split", folder)
    files = state.get("_data_files")
    if not isinstance(files, list) or not all(isinstance(f, dict) and isinstance(f.get("filename"), str)
                                              for f in files):
        raise DataError("field '_data_files': must be a list of {\"filename\": ...} (a Dataset.save_to_disk folder)",
                        state_path)
    if state.get("_indices_data_files"):
        raise DataError("this saved Dataset has an indices mapping (select/shuffle without flatten_indices); "
                        "save it again after dataset.flatten_indices()", folder)
    return [SourceFile(_inside(folder, f["filename"], state_path), "arrow") for f in files]


def _hub_folder_sources(folder: Path, split: str | None) -> list[SourceFile]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # .cache/.git/.huggingface
        for name in sorted(filenames):
            kind = file_kind(name)
            if kind is not None and not name.startswith(".") and name not in METADATA_FILES:
                found.append(SourceFile(Path(dirpath) / name, *kind))
    if not found:
        raise DataError("no .jsonl, .json(.gz), .parquet or .arrow files in this folder", folder)
    splits = {s for s in (_split_of(src.path.relative_to(folder)) for src in found) if s}
    if split is not None:
        chosen = [src for src in found if _split_of(src.path.relative_to(folder), split)]
        if not chosen:
            have = f"it has {', '.join(sorted(splits))}" if splits else "no file is named after a split"
            raise DataError(f"--split {split}: no file of this split in the folder ({have})", folder)
        return chosen
    if len(splits) > 1:
        raise DataError(f"the folder holds the splits {', '.join(sorted(splits))}: choose one with --split", folder)
    return found


def _split_of(relative: Path, wanted: str | None = None) -> str | None:
    """The split a file of a hub folder belongs to: a folder on its path, or the first word of its name
    (`train-00000-of-00002.parquet`, `test.jsonl`). With `wanted`: that split if the file belongs to it."""
    words = [*relative.parts[:-1], re.split(r"[-_.]", relative.name, maxsplit=1)[0]]
    if wanted is not None:
        return wanted if wanted in words else None
    return next((w for w in words if w in KNOWN_SPLITS), None)


def _inside(folder: Path, name: str, listed_in: Path) -> Path:
    """folder/name, refusing names that lead outside the folder (`../x`, absolute paths)."""
    path = (folder / name).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise DataError(f"lists '{name}', which is outside {folder}", listed_in)
    return folder / name


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise DataError(f"not valid JSON ({e})", path) from None
    if not isinstance(value, dict):
        raise DataError(f"must hold a JSON object, got {_json_type(value)}", path)
    return value


# ---------------------------------------------------------------------------------------------- reading records


def iter_raw_records(source) -> Iterator[tuple[int | None, int | None, bytes | dict, int]]:
    """Yield (line, record_index, payload, bytes_read) for every record of one file.

    .jsonl payloads are the raw line (bytes, parsed later by `load_record`, possibly in a worker); the other kinds
    yield parsed records. bytes_read counts the file's (compressed) bytes consumed since the previous record, for
    progress. `source`: a SourceFile or a path.
    """
    if not isinstance(source, SourceFile):
        kind = file_kind(source)
        if kind is None:
            raise DataError(f"unsupported file type '{Path(source).suffix}': use .jsonl, .json (optionally .gz) or "
                            ".parquet", source)
        source = SourceFile(Path(source), *kind)
    reader = {"jsonl": _iter_jsonl, "json": _iter_json_list, "parquet": _iter_parquet, "arrow": _iter_arrow}
    yield from reader[source.kind](source)


class _Counted:
    """A binary file that counts the bytes read from it (compressed bytes for a .gz file)."""

    def __init__(self, source: SourceFile):
        self.raw = open(source.path, "rb")
        self.file = gzip.GzipFile(fileobj=self.raw, mode="rb") if source.gzip else self.raw
        self.path = source.path
        self.reported = 0

    def consumed(self) -> int:
        now = self.raw.tell()
        delta, self.reported = now - self.reported, now
        return delta

    def close(self):
        self.file.close()
        self.raw.close()


def _gzip_error(path, line, error) -> DataError:
    return DataError(f"the gzip stream is corrupt or truncated ({error}) after line {line}", path)


def _iter_jsonl(source: SourceFile):
    f = _Counted(source)
    line_no = 0
    try:
        while True:
            try:
                line = f.file.readline()
            except (OSError, EOFError, zlib.error) as e:
                raise _gzip_error(source.path, line_no, e) from None
            if not line:
                return
            line_no += 1
            if line.strip():
                yield line_no, None, line, f.consumed()
    finally:
        f.close()


_WHITESPACE = re.compile(r"[ \t\n\r]*")


class _TextBuffer:
    """Text of a file decoded as UTF-8 in steps, with line numbers of positions and the consumed prefix dropped."""

    def __init__(self, source: SourceFile):
        self.file = _Counted(source)
        self.path = source.path
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.text = ""
        self.eof = False
        self.bytes_decoded = 0
        self.line = 1  # line number at self.line_pos
        self.line_pos = 0

    def fill(self, at_least: int = READ_BYTES) -> bool:
        """Read more text; False at the end of the file."""
        if self.eof:
            return False
        try:
            block = self.file.file.read(max(at_least, READ_BYTES))
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"the gzip stream is corrupt or truncated ({e}) near line {self.line}", self.path) from None
        try:
            self.text += self.decoder.decode(block, final=not block)
        except UnicodeDecodeError as e:
            raise DataError(f"not valid UTF-8 at byte {self.bytes_decoded + e.start}", self.path) from None
        self.bytes_decoded += len(block)
        self.eof = not block
        return True

    def line_at(self, pos: int) -> int:
        """Line of text position pos (positions asked for only increase)."""
        self.line += self.text.count("\n", self.line_pos, pos)
        self.line_pos = pos
        return self.line

    def drop_before(self, pos: int) -> int:
        """Forget the text before pos; returns the new position of pos (0)."""
        self.line_at(pos)
        self.text = self.text[pos:]
        self.line_pos = 0
        return 0

    def skip_whitespace(self, pos: int) -> int:
        """Position of the next non-whitespace character (== len(text) only at the end of the file)."""
        while True:
            pos = _WHITESPACE.match(self.text, pos).end()
            if pos < len(self.text) or not self.fill():
                return pos


def _iter_json_list(source: SourceFile):
    """Walk a JSON list element by element (raw_decode over a sliding text buffer) so each record keeps its line
    number and the file is never held whole. A record cut by the buffer's end is decoded again with more text."""
    buf = _TextBuffer(source)
    path, decoder = source.path, json.JSONDecoder()
    try:
        pos = buf.skip_whitespace(0)
        if pos == len(buf.text):
            return
        if buf.text[pos] != "[":
            raise DataError("a .json file must hold a list of records (for one object per line, name the file "
                            ".jsonl)", path, line=buf.line_at(pos))
        pos = buf.skip_whitespace(pos + 1)
        if buf.text.startswith("]", pos):
            return _check_end(buf, pos + 1)
        index = 0
        while True:
            if pos > READ_BYTES:
                pos = buf.drop_before(pos)
            try:
                obj, end = decoder.raw_decode(buf.text, pos)
                if end == len(buf.text) and buf.fill():  # a number or literal may continue past the buffer
                    continue
            except json.JSONDecodeError as e:
                # Cut short by the buffer's end (an error there, or an unterminated string): read as much again and
                # retry; an error well before the end is the file's.
                cut = e.pos + 64 >= len(buf.text) or e.msg.startswith("Unterminated string")
                if cut and buf.fill(len(buf.text) - pos):
                    continue
                raise DataError(f"malformed JSON: {e.msg} (column {e.colno}); a .json list cannot be read past this "
                                "point, fix the file", path, line=buf.line_at(e.pos), record=index) from None
            except (RecursionError, ValueError) as e:
                raise DataError(f"{_json_value_problem(e)}; a .json list cannot be read past this point, fix the "
                                "file", path, line=buf.line_at(pos), record=index) from None
            yield buf.line_at(pos), index, obj, buf.file.consumed()
            index += 1
            pos = buf.skip_whitespace(end)
            if buf.text.startswith(",", pos):
                pos = buf.skip_whitespace(pos + 1)
            elif buf.text.startswith("]", pos):
                return _check_end(buf, pos + 1)
            else:
                raise DataError("malformed JSON: expected ',' or ']' after a record", path, line=buf.line_at(pos),
                                record=index)
    finally:
        buf.file.close()


def _check_end(buf: _TextBuffer, pos: int) -> None:
    pos = buf.skip_whitespace(pos)
    if pos < len(buf.text):
        raise DataError("text after the list's closing ']' (records there would be lost); remove it, or use .jsonl "
                        "for one object per line", buf.path, line=buf.line_at(pos))


def _json_value_problem(error: Exception) -> str:
    """What json could not represent, for the two errors that are not JSONDecodeError."""
    if isinstance(error, RecursionError):
        return "malformed JSON: nested too deeply to read (thousands of levels of lists/objects)"
    if "digits" in str(error):
        return "malformed JSON: an integer with more than 4300 digits (Python's limit for int conversion)"
    return f"malformed JSON: {error}"


def load_record(payload: bytes | dict, path, line: int | None, record: int | None) -> dict:
    """The record as a dict: parses a .jsonl line, checks it is a JSON object."""
    if isinstance(payload, bytes | bytearray):
        try:
            payload = json.loads(payload)
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON: {e.msg} (column {e.colno})", path, line=line) from None
        except UnicodeDecodeError as e:
            raise DataError(f"not valid UTF-8 at byte {e.start} of the line", path, line=line) from None
        except (RecursionError, ValueError) as e:
            raise DataError(_json_value_problem(e), path, line=line) from None
    if not isinstance(payload, dict):
        raise DataError(f"a record must be a JSON object, got {_json_type(payload)}", path, line=line, record=record)
    return payload


def _iter_parquet(source: SourceFile):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(source.path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"not a readable parquet file ({e})", source.path) from None
    per_row = source.path.stat().st_size / max(parquet.metadata.num_rows, 1)
    yield from _iter_batches(source, parquet.iter_batches(batch_size=BATCH_ROWS), per_row)


def _iter_arrow(source: SourceFile):
    """An Arrow IPC file: the stream format `datasets` writes, or the random-access file format. Read with ordinary
    reads (not a memory map), so pages of batches already done are not kept in this process's resident memory."""
    import pyarrow as pa

    try:
        stream = pa.OSFile(str(source.path))
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"cannot open ({e})", source.path) from None
    try:
        try:
            random_access = stream.read(6) == b"ARROW1"
            stream.seek(0)
            if random_access:
                reader = pa.ipc.open_file(stream)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                batches = pa.ipc.open_stream(stream)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"not a readable Arrow file ({e})", source.path) from None
        yield from _iter_batches(source, _sliced(batches), None)
    finally:
        stream.close()


def _sliced(batches):
    for batch in batches:
        for start in range(0, batch.num_rows, BATCH_ROWS):
            yield batch.slice(start, BATCH_ROWS)


def _iter_batches(source: SourceFile, batches, per_row: float | None):
    """Rows of record batches as dicts, each located by its 0-based row index in the file. `per_row`: file bytes
    per row for progress (None: each batch's in-memory size, which for Arrow IPC files is about their file size)."""
    import pyarrow as pa

    row, batches = 0, iter(batches)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"cannot read the rows after row {row} ({e})", source.path) from None
        step = per_row if per_row is not None else batch.nbytes / max(batch.num_rows, 1)
        for record in batch.to_pylist():
            yield None, row, record, int((row + 1) * step) - int(row * step)
            row += 1


# ---------------------------------------------------------------------------------------------- columns


def parse_columns(spec) -> dict[str, str]:
    """--columns 'messages=conversations,prompt=question' (or a list of such strings, or a dict) as
    {format field: the record's column}."""
    if not spec:
        return {}
    if isinstance(spec, dict):
        pairs = list(spec.items())
    else:
        items = [spec] if isinstance(spec, str) else list(spec)
        pairs = []
        for item in items:
            for part in filter(None, (p.strip() for p in item.split(","))):
                target, sep, column = (s.strip() for s in part.partition("="))
                if not sep or not target or not column:
                    raise ValueError(f"--columns {part}: expected FIELD=COLUMN, e.g. messages=conversations")
                pairs.append((target, column))
    columns = {}
    for target, column in pairs:
        if target not in COLUMN_TARGETS:
            raise ValueError(f"--columns {target}={column}: '{target}' is not a field of any format (expected one of "
                             f"{', '.join(COLUMN_TARGETS)})")
        if target in columns:
            raise ValueError(f"--columns: field '{target}' is mapped twice")
        columns[target] = column
    return columns


def map_columns(record: dict, columns: dict[str, str]) -> dict:
    """The record with its mapped columns renamed to the formats' field names (unmapped fields kept)."""
    if not columns:
        return record
    sources = set(columns.values())
    mapped = {k: v for k, v in record.items() if k not in sources}
    for target, column in columns.items():
        if column in record:
            mapped[target] = record[column]
        else:
            mapped.pop(target, None)  # the field comes from its column only, so a missing column is reported
    return mapped


def column_error(error: DataError, columns: dict[str, str]) -> DataError:
    """A DataError whose field names the record's own column rather than the format field it was mapped to."""
    if not columns or not error.field:
        return error
    root = re.match(r"[^.\[]*", error.field).group(0)
    if root not in columns:
        return error
    field = columns[root] + error.field[len(root):]
    return DataError(error.problem, error.path, error.line, error.record, field)


def detect_source_format(source, columns: dict[str, str] | None = None) -> str:
    """The format of a file, from its first record that parses as an object with a known format's keys (after
    column mapping). Records before it that are malformed are left for the reading pass to report or skip."""
    columns = columns or {}
    path = source.path if isinstance(source, SourceFile) else source
    first_error = None
    for line, record_index, payload, _ in iter_raw_records(source):
        try:
            record = map_columns(load_record(payload, path, line, record_index), columns)
        except DataError as e:
            first_error = first_error or e
            continue
        name = detect_format(record)
        if name is not None:
            return name
        keys = ", ".join(sorted(record)) or "none"
        expected = "; ".join(f"{n}: {'+'.join(k)}" for n, k in _DETECT_KEYS)
        raise DataError(f"cannot detect the format from this record's keys ({keys}); expected one of {expected}, "
                        "or pass --format (and --columns to map other column names)", path, line=line,
                        record=record_index)
    if first_error is not None:
        raise first_error
    raise DataError("no records in file", path)


def surrogate_field(value, field: str = "") -> str | None:
    """The field path of the first string holding a lone surrogate (e.g. from a "\\ud800" escape), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return field or "record"
        return None
    if isinstance(value, dict):
        items = ((f"{field}.{k}" if field else str(k), v) for k, v in value.items())
    elif isinstance(value, list):
        items = ((f"{field}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for name, item in items:
        found = surrogate_field(item, name)
        if found:
            return found
    return None


def detect_file_format(path) -> str:
    """The format of one file (see `detect_source_format`)."""
    return detect_source_format(path)


def read_documents(path, fmt: str = "auto") -> Iterator[tuple[int | None, int | None, list | str]]:
    """Every document of a file as (line, record_index, document); the first bad record raises its DataError.

    Convenience for small files and tests; `fastsft prepare` streams raw records to its workers instead.
    """
    fmt = detect_file_format(path) if fmt == "auto" else fmt
    for line, record_index, payload, _ in iter_raw_records(path):
        record = load_record(payload, path, line, record_index)
        yield line, record_index, normalize_record(record, fmt, path, line, record_index)
