"""The on-disk shard format: its layout, writer (`ShardWriter`, called by `fastsft prepare`) and reader
(`open_shards` -> `ShardDataset`, read by the packing loader).

Flow: prepare (token ids + loss mask per document) -> ShardWriter -> *.shard files -> open_shards -> PackedLoader.

Layout of one shard file (little-endian; every section starts at a multiple of 8 bytes):

    offset  size               what
    0       64                 header (HEADER_FORMAT below)
    64      8 * (docs + 1)     document offsets into the token array, int64: 0, end of doc 0, ..., num_tokens
    ...     num_tokens * k     token ids, uint16 (k=2) when vocab_size <= 65536, else uint32 (k=4)
    ...     0..7               zero padding to a multiple of 8
    ...     num_tokens         loss mask, uint8 0/1, one per token: 1 = this token is a supervised target
    end = file_size

Header fields, in order: magic b"FSFTSHRD", format version (uint32), token item size in bytes (uint32: 2 = uint16,
4 = uint32), document count, token count, loss-token count (sum of the mask), max token id (int64), total file size
(uint64), crc32 of the payload (every byte after the header), crc32 of the first 60 header bytes.

Validation: opening a file ALWAYS checks the magic, the version, the header crc, the item size, that the file size
matches both the header and the size the counts imply, and the offsets index (starts at 0, ends at num_tokens, every
document at least one token) -- so no later read can go out of bounds, and a truncated or half-copied file is caught.
By default (`verify=True`) the open also reads the whole file once: the payload crc32 against the header, and the real
largest token id, the mask's values (0/1) and its sum against the header's counts, so a flipped byte anywhere is a
ShardError before training, and the vocabulary check (`open_shards(..., vocab_size=V)`, O(1) from the header) rests
on a verified header. Measured on a 0.75 GiB shard (2**28 uint16 tokens, the writer's default shard size) on the
shared 2-core dev machine, warm page cache: 0.43 CPU-seconds (1.75 GiB per CPU-second, time.thread_time), 1.8 s wall
(CPU contention); a cold cache adds the disk read. `verify=False` (`data.verify=false`) keeps only the header checks.

Reading: positional reads (`os.pread`), each length-checked: a shard truncated in place is a short read, a ShardError
naming the file. The C++ batch assembly alone maps the files read-only, for speed (pread per document cost 2-2.5x),
under a SIGBUS guard that turns a fault in a truncated map into the same error (csrc/assembly.cpp).

Writing: each shard's tokens and mask stream to temporary files; the shard is assembled under a temporary name,
fsynced, and renamed into place, so a crash never leaves a half-written shard under a final name.

(Over 500 lines on purpose: the format's layout, writer, reader and checks stay in one file, as Megatron keeps its
indexed dataset.)
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from fastsft._fsutil import fsync_dir
from fastsft.data import manifest as manifest_lib
from fastsft.data.errors import ShardError

MAGIC = b"FSFTSHRD"
FORMAT_VERSION = 1
HEADER_FORMAT = "<8sIIQQQqQII"
HEADER_SIZE = struct.calcsize(HEADER_FORMAT)  # 64
HEADER_CRC_SPAN = HEADER_SIZE - 4  # the header crc covers every header byte before itself
SHARD_SUFFIX = ".shard"
TOKEN_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
UINT16_VOCAB_LIMIT = 1 << 16
CRC_CHUNK_BYTES = 1 << 24

assert HEADER_SIZE == 64


def _align8(n: int) -> int:
    return (n + 7) & ~7


def token_dtype_for_vocab(vocab_size: int) -> np.dtype:
    return TOKEN_DTYPES[2] if vocab_size <= UINT16_VOCAB_LIMIT else TOKEN_DTYPES[4]


def shard_layout(num_docs: int, num_tokens: int, itemsize: int) -> dict:
    """Byte offsets of each section, derived from the counts alone (the reader checks the file against this)."""
    offsets_start = HEADER_SIZE
    tokens_start = offsets_start + 8 * (num_docs + 1)
    tokens_end = tokens_start + num_tokens * itemsize
    mask_start = _align8(tokens_end)
    file_size = mask_start + num_tokens
    return dict(
        offsets_start=offsets_start, tokens_start=tokens_start, tokens_end=tokens_end, mask_start=mask_start,
        file_size=file_size,
    )


def _pack_header(itemsize, num_docs, num_tokens, num_loss_tokens, max_token_id, file_size, payload_crc) -> bytes:
    head = struct.pack(
        HEADER_FORMAT, MAGIC, FORMAT_VERSION, itemsize, num_docs, num_tokens, num_loss_tokens, max_token_id,
        file_size, payload_crc, 0,
    )
    return head[:HEADER_CRC_SPAN] + struct.pack("<I", zlib.crc32(head[:HEADER_CRC_SPAN]))


# --------------------------------------------------------------------------------------------------------- writer


class ShardWriter:
    """Streams documents (token ids + loss mask) into shard files of at most `max_tokens_per_shard` tokens.

    Files are named `{prefix}-00000.shard`, `{prefix}-00001.shard`, ... inside `out_dir`. A document longer than
    `max_tokens_per_shard` gets a shard of its own. Use as a context manager, or call `close()`; leaving the `with`
    block through an exception discards the shard in progress (earlier, finished shards stay).
    """

    def __init__(self, out_dir, vocab_size: int, prefix: str = "shard", max_tokens_per_shard: int = 1 << 28):
        if not isinstance(vocab_size, (int, np.integer)) or not 1 <= vocab_size <= 1 << 32:
            raise ValueError(f"ShardWriter: vocab_size must be an int in [1, 2**32], got {vocab_size!r}")
        if max_tokens_per_shard < 1:
            raise ValueError(f"ShardWriter: max_tokens_per_shard must be >= 1, got {max_tokens_per_shard}")
        if not prefix or "/" in prefix or os.sep in prefix:
            raise ValueError(f"ShardWriter: prefix must be a plain file-name prefix, got {prefix!r}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.vocab_size = int(vocab_size)
        self.prefix = prefix
        self.max_tokens_per_shard = int(max_tokens_per_shard)
        self.dtype = token_dtype_for_vocab(self.vocab_size)
        self._files: list[str] = []
        self._documents = 0
        self._tokens = 0
        self._loss_tokens = 0
        self._max_token_id = -1
        self._current: _ShardInProgress | None = None
        self._closed = False
        self._summary: dict | None = None

    def add(self, tokens: np.ndarray, loss_mask: np.ndarray) -> None:
        """Append one document: `tokens` integer ids < vocab_size, `loss_mask` bool/0-1 ints of the same length."""
        if self._closed:
            raise ValueError("ShardWriter.add: the writer is closed")
        tokens = np.asarray(tokens)
        loss_mask = np.asarray(loss_mask)
        where = f"ShardWriter.add (document {self._documents})"
        if tokens.ndim != 1 or loss_mask.ndim != 1:
            raise ValueError(f"{where}: tokens and loss_mask must be 1-D, got shapes {tokens.shape}, {loss_mask.shape}")
        if tokens.shape != loss_mask.shape:
            raise ValueError(f"{where}: tokens has {tokens.size} entries but loss_mask has {loss_mask.size}")
        if tokens.size == 0:
            raise ValueError(f"{where}: empty document (0 tokens); drop it before writing")
        if tokens.dtype.kind not in "iu":
            raise ValueError(f"{where}: tokens must be integers, got dtype {tokens.dtype}")
        if loss_mask.dtype != np.bool_:
            if loss_mask.dtype.kind not in "iu" or loss_mask.min() < 0 or loss_mask.max() > 1:
                raise ValueError(f"{where}: loss_mask must be bool or integers 0/1, got dtype {loss_mask.dtype}")
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"{where}: token id {bad} is outside the vocabulary [0, {self.vocab_size})")

        if self._current is not None and self._current.num_tokens + tokens.size > self.max_tokens_per_shard:
            self._finish_current()
        if self._current is None:
            name = f"{self.prefix}-{len(self._files):05d}{SHARD_SUFFIX}"
            self._current = _ShardInProgress(self.out_dir, name, self.dtype)
        loss_count = self._current.append(tokens.astype(self.dtype, copy=False), loss_mask.astype(np.uint8, copy=False))
        self._current.max_token_id = max(self._current.max_token_id, high)
        self._documents += 1
        self._tokens += tokens.size
        self._loss_tokens += loss_count
        self._max_token_id = max(self._max_token_id, high)

    def close(self) -> dict:
        """Finish the last shard; returns {"files", "documents", "tokens", "loss_tokens", "max_token_id"}."""
        if not self._closed:
            if self._current is not None:
                self._finish_current()
            self._closed = True
            self._summary = {
                "files": list(self._files),
                "documents": self._documents,
                "tokens": self._tokens,
                "loss_tokens": self._loss_tokens,
                "max_token_id": self._max_token_id,
            }
        return dict(self._summary)

    def abort(self) -> None:
        """Discard the shard in progress (finished shards stay) and close."""
        if self._current is not None:
            self._current.discard()
            self._current = None
        self._closed = True
        self._summary = {"files": list(self._files), "documents": 0, "tokens": 0, "loss_tokens": 0, "max_token_id": -1}

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _finish_current(self) -> None:
        self._files.append(self._current.finish())
        self._current = None


class _ShardInProgress:
    """One shard being written: tokens and mask stream to two temporary files until `finish` assembles the shard."""

    def __init__(self, out_dir: Path, name: str, dtype: np.dtype):
        self.out_dir = out_dir
        self.name = name
        self.dtype = dtype
        tag = f".{name}.{os.getpid()}"
        self.tokens_tmp = out_dir / f"{tag}.tokens.tmp"
        self.mask_tmp = out_dir / f"{tag}.mask.tmp"
        self.shard_tmp = out_dir / f"{tag}.tmp"
        self.tokens_file = open(self.tokens_tmp, "wb", buffering=1 << 20)  # noqa: SIM115 (closed in finish/discard)
        self.mask_file = open(self.mask_tmp, "wb", buffering=1 << 20)  # noqa: SIM115
        self.offsets = [0]
        self.num_tokens = 0
        self.num_loss_tokens = 0
        self.max_token_id = -1

    def append(self, tokens: np.ndarray, mask_u8: np.ndarray) -> int:
        self.tokens_file.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self.mask_file.write(np.ascontiguousarray(mask_u8).tobytes())
        self.num_tokens += tokens.size
        self.offsets.append(self.num_tokens)
        loss_count = int(np.count_nonzero(mask_u8))
        self.num_loss_tokens += loss_count
        return loss_count

    def finish(self) -> str:
        self.tokens_file.close()
        self.mask_file.close()
        itemsize = self.dtype.itemsize
        num_docs = len(self.offsets) - 1
        layout = shard_layout(num_docs, self.num_tokens, itemsize)
        crc = 0
        with open(self.shard_tmp, "wb") as out:
            out.write(b"\0" * HEADER_SIZE)
            crc = _write_tracked(out, np.asarray(self.offsets, dtype="<i8").tobytes(), crc)
            crc = _copy_tracked(self.tokens_tmp, out, crc)
            crc = _write_tracked(out, b"\0" * (layout["mask_start"] - layout["tokens_end"]), crc)
            crc = _copy_tracked(self.mask_tmp, out, crc)
            if out.tell() != layout["file_size"]:
                raise RuntimeError(f"ShardWriter: internal size mismatch writing {self.name}")
            out.seek(0)
            out.write(
                _pack_header(itemsize, num_docs, self.num_tokens, self.num_loss_tokens, self.max_token_id,
                             layout["file_size"], crc)
            )
            out.flush()
            os.fsync(out.fileno())
        os.replace(self.shard_tmp, self.out_dir / self.name)
        fsync_dir(self.out_dir)
        self.tokens_tmp.unlink()
        self.mask_tmp.unlink()
        return self.name

    def discard(self) -> None:
        self.tokens_file.close()
        self.mask_file.close()
        for path in (self.tokens_tmp, self.mask_tmp, self.shard_tmp):
            path.unlink(missing_ok=True)


def _write_tracked(out, data: bytes, crc: int) -> int:
    out.write(data)
    return zlib.crc32(data, crc)


def _copy_tracked(src_path: Path, out, crc: int) -> int:
    with open(src_path, "rb") as src:
        while chunk := src.read(CRC_CHUNK_BYTES):
            crc = _write_tracked(out, chunk, crc)
    return crc


class ShardFile:
    """One validated shard, read here with positional reads (`os.pread`): a file truncated or replaced in place while
    the loader holds it open gives a ShardError naming it (a short read), not a SIGBUS (the C++ loader maps `fd`
    under a SIGBUS guard: the same error).
    `offsets` (int64, docs + 1) is read into memory at open; tokens and mask are read per range on demand."""

    def __init__(self, path, verify: bool = True):
        self.path = str(path)
        if os.path.isdir(path):
            raise ShardError(f"{path}: a directory, not a shard file")
        try:
            self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise ShardError(f"{path}: cannot open shard ({e.strerror})") from None
        try:
            self._open(verify)
        except BaseException:
            self.close()
            raise

    def _open(self, verify: bool) -> None:
        path = self.path
        size = os.fstat(self._fd).st_size
        if size == 0:
            raise ShardError(f"{path}: empty file (0 bytes), not a shard; re-run `fastsft prepare`")
        if size < HEADER_SIZE:
            raise ShardError(f"{path}: truncated: {size} bytes, smaller than the {HEADER_SIZE}-byte shard header")
        header = self._parse_header(self.pread(0, HEADER_SIZE), size)
        (_, _, itemsize, num_docs, num_tokens, num_loss_tokens, max_token_id, _, payload_crc, _) = header
        self.itemsize = itemsize
        self.token_dtype = TOKEN_DTYPES[itemsize]
        self.num_docs = num_docs
        self.num_tokens = num_tokens
        self.num_loss_tokens = num_loss_tokens
        self.max_token_id = max_token_id
        self.payload_crc = payload_crc
        self.file_size = size
        self.layout = shard_layout(num_docs, num_tokens, itemsize)
        self.offsets = np.frombuffer(
            self.pread(self.layout["offsets_start"], 8 * (num_docs + 1)), dtype="<i8"
        ).astype(np.int64)
        self._check_offsets()
        self.verified = False
        if verify:
            self.verify()

    @property
    def fd(self) -> int:
        return self._fd

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", -1), -1
        if fd >= 0:
            os.close(fd)

    def __del__(self):
        self.close()

    def pread(self, offset: int, nbytes: int) -> bytes:
        """`nbytes` bytes at `offset`; a short read (the file shrank after it was opened) is a ShardError."""
        if self._fd < 0:
            raise ShardError(f"{self.path}: shard is closed")
        data = os.pread(self._fd, nbytes, offset)
        while len(data) < nbytes:
            more = os.pread(self._fd, nbytes - len(data), offset + len(data))
            if not more:
                raise ShardError(
                    f"{self.path}: read {len(data)} of {nbytes} bytes at offset {offset}: the file was truncated or "
                    "replaced in place while in use; restore it or re-run `fastsft prepare`, then resume"
                )
            data += more
        return data

    def read_tokens(self, start: int, end: int) -> np.ndarray:
        """Token ids [start, end) of the shard's token array."""
        nbytes = (end - start) * self.itemsize
        return np.frombuffer(self.pread(self.layout["tokens_start"] + start * self.itemsize, nbytes), self.token_dtype)

    def read_mask(self, start: int, end: int) -> np.ndarray:
        """Loss-mask bytes (uint8 0/1) [start, end)."""
        return np.frombuffer(self.pread(self.layout["mask_start"] + start, end - start), np.uint8)

    def _parse_header(self, raw: bytes, size: int) -> tuple:
        path = self.path
        if raw[:8] != MAGIC:
            raise ShardError(f"{path}: not a fastsft shard (its first bytes are not the magic {MAGIC!r})")
        version = struct.unpack_from("<I", raw, 8)[0]
        if version != FORMAT_VERSION:
            raise ShardError(
                f"{path}: shard format version {version}, this fastsft reads version {FORMAT_VERSION}; "
                "re-run `fastsft prepare` with this version"
            )
        fields = struct.unpack(HEADER_FORMAT, raw)
        if zlib.crc32(raw[:HEADER_CRC_SPAN]) != fields[-1]:
            raise ShardError(f"{path}: corrupt header (header checksum mismatch)")
        _, _, itemsize, num_docs, num_tokens, num_loss_tokens, max_token_id, file_size, _, _ = fields
        if itemsize not in TOKEN_DTYPES:
            raise ShardError(f"{path}: corrupt header: token item size {itemsize} (expected 2 or 4)")
        if file_size != size:
            raise ShardError(
                f"{path}: file is {size} bytes but its header says {file_size} "
                f"({'truncated or partially copied' if size < file_size else 'trailing bytes'})"
            )
        expected = shard_layout(num_docs, num_tokens, itemsize)["file_size"]
        if expected != file_size:
            raise ShardError(f"{path}: corrupt header: counts imply {expected} bytes, header says {file_size}")
        if num_loss_tokens > num_tokens or max_token_id >= 1 << (8 * itemsize) or (num_tokens > 0) != (max_token_id >= 0):
            raise ShardError(f"{path}: corrupt header: inconsistent counts")
        return fields

    def _check_offsets(self) -> None:
        off = self.offsets
        if off[0] != 0 or off[-1] != self.num_tokens:
            raise ShardError(
                f"{self.path}: corrupt offsets index (starts at {off[0]}, ends at {off[-1]}, expected 0 and "
                f"{self.num_tokens})"
            )
        if self.num_docs and np.diff(off).min() < 1:
            raise ShardError(f"{self.path}: corrupt offsets index (not strictly increasing)")

    def _chunks(self, start: int, nbytes: int, buffer: np.ndarray):
        """Memoryviews over `buffer` holding the file's bytes [start, start + nbytes), one chunk at a time."""
        done = 0
        while done < nbytes:
            want = min(len(buffer), nbytes - done)
            view = memoryview(buffer)[:want]
            got = os.preadv(self._fd, [view], start + done)
            if got < want:  # a regular file reads short only at its end: it shrank after it was opened
                raise ShardError(
                    f"{self.path}: read {done} of {nbytes} bytes at offset {start}: the file was truncated or "
                    "replaced in place while in use; restore it or re-run `fastsft prepare`, then resume"
                )
            done += got
            yield view[:got]

    def verify(self) -> None:
        """One full read: the payload crc32 against the header, and the real largest token id, the mask's values
        (0/1) and its sum against the header's counts (cost measured in the module docstring)."""
        layout, itemsize = self.layout, self.itemsize
        buffer = np.empty(CRC_CHUNK_BYTES, np.uint8)
        crc = zlib.crc32(self.pread(HEADER_SIZE, layout["tokens_start"] - HEADER_SIZE))
        max_id = -1
        for chunk in self._chunks(layout["tokens_start"], layout["tokens_end"] - layout["tokens_start"], buffer):
            crc = zlib.crc32(chunk, crc)
            max_id = max(max_id, int(np.frombuffer(chunk, self.token_dtype).max()))
        crc = zlib.crc32(self.pread(layout["tokens_end"], layout["mask_start"] - layout["tokens_end"]), crc)
        ones, mask_ok = 0, True
        for chunk in self._chunks(layout["mask_start"], self.num_tokens, buffer):
            crc = zlib.crc32(chunk, crc)
            mask = np.frombuffer(chunk, np.uint8)
            mask_ok &= int(mask.max()) <= 1
            ones += int(np.count_nonzero(mask))
        if crc != self.payload_crc:
            raise ShardError(f"{self.path}: corrupt payload (crc32 {crc:#010x}, header says {self.payload_crc:#010x}); "
                             "re-run `fastsft prepare` or restore the file")
        if max_id != self.max_token_id or not mask_ok or ones != self.num_loss_tokens:
            raise ShardError(f"{self.path}: payload disagrees with its header (largest token id {max_id} vs "
                             f"{self.max_token_id}, loss tokens {ones} vs {self.num_loss_tokens}, mask bytes 0/1: "
                             f"{mask_ok}); re-run `fastsft prepare`")
        self.verified = True

    def __len__(self) -> int:
        return self.num_docs


class ShardDataset:
    """Documents of one or more shard files, indexed globally: `ds[i]` -> (tokens, loss_mask), read from the file
    (tokens uint16/uint32, loss_mask bool)."""

    def __init__(self, shards: list[ShardFile]):
        self.shards = list(shards)
        self.files = [s.path for s in self.shards]
        counts = np.array([s.num_docs for s in self.shards], dtype=np.int64)
        self.doc_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.lengths = (
            np.concatenate([np.diff(s.offsets) for s in self.shards]) if self.shards else np.zeros(0, np.int64)
        )
        self.num_tokens = int(sum(s.num_tokens for s in self.shards))
        self.num_loss_tokens = int(sum(s.num_loss_tokens for s in self.shards))
        self.max_token_id = int(max((s.max_token_id for s in self.shards), default=-1))
        self.vocab_size: int | None = None  # the bound check_vocab accepted; the loader checks each document against it

    def __len__(self) -> int:
        return int(self.doc_starts[-1])

    def __getitem__(self, i):
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"document index {i} out of range for a dataset of {n} documents")
        f = int(np.searchsorted(self.doc_starts, i, side="right")) - 1
        shard = self.shards[f]
        local = i - int(self.doc_starts[f])
        start, end = int(shard.offsets[local]), int(shard.offsets[local + 1])
        return shard.read_tokens(start, end), shard.read_mask(start, end).view(np.bool_)

    def verify(self) -> None:
        for shard in self.shards:
            shard.verify()

    def check_vocab(self, vocab_size: int) -> None:
        for shard in self.shards:
            if shard.max_token_id >= vocab_size:
                raise ShardError(
                    f"{shard.path}: token id {shard.max_token_id} is outside the model's vocabulary of {vocab_size}; "
                    "was the data prepared with a different tokenizer?"
                )
        self.vocab_size = int(vocab_size)

    def __repr__(self) -> str:
        return f"ShardDataset({len(self)} documents, {self.num_tokens} tokens, {len(self.files)} files)"


def shard_paths(path, split: str = "train") -> list[Path]:
    """The shard files `open_shards(path, split)` reads (see its docstring for the three accepted forms)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ShardError(f"{path}: no such shard file or directory")
    if manifest_lib.has_manifest(path):
        return manifest_lib.split_paths(path, manifest_lib.read_manifest(path), split)
    files = sorted(path.glob(f"*{SHARD_SUFFIX}"))
    if not files:
        raise ShardError(f"{path}: no {manifest_lib.MANIFEST_NAME} and no *{SHARD_SUFFIX} files; run `fastsft prepare` "
                         "first")
    return files


def check_manifest_against_shards(directory, manifest: dict, split: str, shards: list[ShardFile]) -> None:
    """The split's recorded counts and vocabulary (manifest.json) against its opened shards' headers: equal sums of
    documents, tokens and loss tokens; every largest token id below vocab_size; the token width that vocabulary
    implies. A mismatch means the manifest belongs to other shards."""
    path = manifest_lib.manifest_path(directory)
    info = manifest_lib.split_info(manifest, split)
    actual = {
        "documents": sum(s.num_docs for s in shards),
        "tokens": sum(s.num_tokens for s in shards),
        "loss_tokens": sum(s.num_loss_tokens for s in shards),
    }
    for field, value in actual.items():
        if field in info and info[field] != value:
            raise ShardError(f"{path}: splits.{split}.{field} = {info[field]} but its shards hold {value}; the "
                             "manifest does not belong to these shards (re-run `fastsft prepare`)")
    vocab = manifest.get("vocab_size")
    if vocab is None:
        return
    itemsize = token_dtype_for_vocab(vocab).itemsize
    for shard in shards:
        if shard.max_token_id >= vocab:
            raise ShardError(f"{path}: vocab_size = {vocab} but {shard.path} holds token id {shard.max_token_id}; "
                             "the shards were prepared with another vocabulary (re-run `fastsft prepare`)")
        if shard.itemsize != itemsize:
            raise ShardError(f"{path}: vocab_size = {vocab} implies {itemsize}-byte token ids but {shard.path} "
                             f"stores {shard.itemsize}-byte ids; the shards were prepared with another vocabulary "
                             "(re-run `fastsft prepare`)")


def open_shards(path, split: str = "train", vocab_size: int | None = None, verify: bool = True) -> ShardDataset:
    """Open a dataset: `path` is a prepared directory with manifest.json (reads manifest["splits"][split]["files"]),
    a directory of *.shard files without a manifest (all of them, sorted by name), or one shard file.

    `vocab_size`: raise ShardError naming the file if any token id is >= vocab_size (O(1): max id is in the header).
    `verify` (default): read every file once, checking its payload against the header (see the module docstring);
    False: header checks only. With a manifest, its counts and vocabulary are checked against the shards
    (fastsft/data/manifest.py). An empty dataset is an error.
    """
    paths = shard_paths(path, split)
    shards = [ShardFile(p, verify=verify) for p in paths]
    if Path(path).is_dir() and manifest_lib.has_manifest(path):
        check_manifest_against_shards(path, manifest_lib.read_manifest(path), split, shards)
    dataset = ShardDataset(shards)
    if len(dataset) == 0:
        raise ShardError(f"{path}: dataset has no documents (split {split!r}, files: {[str(p) for p in paths]})")
    if vocab_size is not None:
        dataset.check_vocab(vocab_size)
    return dataset
