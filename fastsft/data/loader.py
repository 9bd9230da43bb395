"""`PackedLoader`: verified shards -> packed `Batch` rows (the batch contract, fastsft/data/batch.py).

Flow: open_shards (verified; C++ assembly reads a SIGBUS-guarded map, the rest pread) -> effective lengths and supervised positions (once) ->
[loss_bucket="auto": choose_loss_bucket] -> plan of the epoch (seeded shuffle, best-fit-decreasing per window under
the row and loss-bucket budgets, rank split; once per epoch) -> batch assembly in a background thread (C++
`fastsft._C`, GIL released, each document checked against the vocabulary, into pinned memory when CUDA is present)
-> attention bounds per row -> Batch -> the train step.

The C++ backend and the numpy reference (`backend="numpy"`, fastsft/data/packing_ref.py) give byte-identical batches.
Resume: `state_dict()` records (epoch, batches consumed in it); the plan is a pure function of (seed, epoch, config),
so `load_state_dict()` re-plans the epoch and skips to the index.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import queue
import threading
import weakref
import zlib

import numpy as np
import torch

from fastsft.data import packing_ref
from fastsft.data.batch import Batch, attention_bounds
from fastsft.data.shards import ShardDataset, ShardError, open_shards
from fastsft.data.virtual_tokens import insert_virtual_tokens

# Documents per shuffle window. With max_docs = seq_len // 32, bench/bench_loader.py measured 99.93% packing at
# seq_len 4096 and 99.84% at 16384 (lognormal lengths, median 250); a window of 8192 gave 99.73% at 16384.
DEFAULT_WINDOW = 16384
ROWS_PER_CALL = 4  # rows assembled per C++ call: amortizes the call, keeps prefetched memory small
BACKENDS = ("cpp", "numpy")
_QUEUE_POLL_S = 0.05
_STATE_VERSION = 1
_CPP_API_VERSION = 2  # csrc/bindings.cpp API_VERSION
_MAX_EPOCH = (1 << 32) - 1  # the plan's RNG takes the epoch as a uint64; no run comes near this


class _CppBackend:
    def __init__(self, dataset: ShardDataset, vocab_size: int | None):
        from fastsft import _C

        if getattr(_C, "API_VERSION", 1) != _CPP_API_VERSION:
            raise RuntimeError(f"{_C.__file__}: a stale build of the C++ loader (API {getattr(_C, 'API_VERSION', 1)}, "
                               f"this fastsft needs {_CPP_API_VERSION}); rebuild it: pip install -e . "
                               "(or python3 setup.py build_ext --inplace)")
        self._C = _C
        self.vocab_size = vocab_size or 0
        try:  # maps every shard for batch assembly (csrc/assembly.cpp: why a guarded map, not pread)
            self.corpus = _C.Corpus(list(dataset.shards))
        except _C.ShardReadError as e:
            raise ShardError(str(e)) from None

    def effective_lengths(self, seq_len, loss_bucket, long_docs):
        bucket = -1 if loss_bucket is None else loss_bucket
        try:
            return self.corpus.effective_lengths(seq_len, bucket, long_docs == "drop")
        except self._C.ShardReadError as e:
            raise ShardError(str(e)) from None

    def plan_epoch(self, eff_len, supervised, *, seq_len, max_docs, loss_bucket, window, seed, epoch, world_size,
                   drop_last):
        budget = seq_len if loss_bucket is None else loss_bucket
        return self._C.plan_epoch(eff_len, supervised, seq_len, max_docs, budget, window, seed, epoch, world_size,
                                  drop_last)

    def assemble(self, row_ptr, row_docs, eff_len, rows, out):
        try:
            self._C.assemble_rows(self.corpus, row_ptr, row_docs, eff_len, rows, out["input_ids"],
                                  out["position_ids"], out["labels"], out["cu_seqlens"], out["loss_positions"],
                                  out["counts"], self.vocab_size)
        except self._C.ShardReadError as e:
            raise ShardError(str(e)) from None


class _NumpyBackend:
    def __init__(self, dataset: ShardDataset, vocab_size: int | None):
        self.dataset = dataset
        self.vocab_size = vocab_size

    def effective_lengths(self, seq_len, loss_bucket, long_docs):
        return packing_ref.effective_lengths(self.dataset, seq_len, loss_bucket, long_docs)

    def plan_epoch(self, eff_len, supervised, **config):
        return packing_ref.plan_epoch(eff_len, supervised, **config)

    def assemble(self, row_ptr, row_docs, eff_len, rows, out):
        packing_ref.assemble_rows(self.dataset, row_ptr, row_docs, eff_len, rows, out, self.vocab_size)


def _check_int(name, value, low, high=None):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low or (
            high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"PackedLoader: {name} must be an int {bound}, got {value!r}")


class PackedLoader:
    """Iterate one epoch of packed rows per `for` loop; see the module docstring.

    source: a prepared directory / shard directory / shard file (passed to open_shards), or a ShardDataset.
    seq_len, max_docs: row length and the most documents per row (cu_seqlens has max_docs + 2 entries). A small
        max_docs costs packing: short documents left at the end of a window fill rows by count, not by tokens;
        max_docs = seq_len // 32 packs >= 99.8% on SFT-like lengths (see DEFAULT_WINDOW).
    window: documents per shuffle window; best-fit-decreasing packs each window.
    loss_bucket: fixed length of loss_positions (default seq_len); rows never hold more supervised positions, and the
        loss multiplies only these rows through the lm_head. "auto": chosen from the data (`choose_loss_bucket`: the
        smallest multiple of LOSS_BUCKET_GRANULE that keeps packing and cuts almost no supervised position).
    long_docs: "truncate" (default) or "drop" documents that do not fit a row (or the loss bucket); both counted.
    drop_last: False (default) balances the row count across ranks by splitting rows, so every document is seen
        exactly once per epoch; True drops the last (row count % world_size) rows.
    prefetch: batches assembled ahead in a background thread (0: assemble in the caller's thread).
    pin_memory: page-locked buffers for non-blocking copies to the GPU (default: when CUDA is available).
    vocab_size: the model's vocabulary; a token id >= vocab_size in any shard raises ShardError here, before training
        (from the verified shard headers), and every document is checked again as it is assembled.
    verify: when `source` is a path, open it with a full verification of every shard (see fastsft/data/shards.py).
    virtual_tokens: slots reserved in front of every document for prompt tuning / P-tuning (fastsft/data/
        virtual_tokens.py): documents are cut to seq_len - virtual_tokens and packed as that much longer.
    bound_attention: per row, cu_seqlens sized to the segments packed and max_seqlen to the longest one, each
        rounded up to one of a few values (fastsft/data/batch.py `attention_bounds`); False: max_docs + 2 and seq_len.
    A dataset with no supervised position left after truncation raises ValueError: it would train on nothing.
    """

    def __init__(self, source, seq_len: int, max_docs: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 window: int = DEFAULT_WINDOW, loss_bucket: int | str | None = None, long_docs: str = "truncate",
                 drop_last: bool = False, prefetch: int = 2, pin_memory: bool | None = None, backend: str = "cpp",
                 vocab_size: int | None = None, virtual_tokens: int = 0, verify: bool = True,
                 bound_attention: bool = True):
        _check_int("seq_len", seq_len, 1, (1 << 31) - 1)
        _check_int("max_docs", max_docs, 1)
        _check_int("seed", seed, 0, (1 << 64) - 1)
        _check_int("world_size", world_size, 1)
        _check_int("rank", rank, 0, world_size - 1)
        _check_int("window", window, 1)
        _check_int("prefetch", prefetch, 0)
        _check_int("virtual_tokens", virtual_tokens, 0, seq_len - 1)
        if loss_bucket is not None and loss_bucket != "auto":
            _check_int("loss_bucket", loss_bucket, 1, seq_len)
        if long_docs not in packing_ref.LONG_DOC_POLICIES:
            raise ValueError(f"PackedLoader: long_docs must be one of {packing_ref.LONG_DOC_POLICIES}, got {long_docs!r}")
        if backend not in BACKENDS:
            raise ValueError(f"PackedLoader: backend must be one of {BACKENDS}, got {backend!r}")
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        elif pin_memory and not torch.cuda.is_available():
            raise ValueError("PackedLoader: pin_memory=True needs CUDA; pass pin_memory=None or False")

        if vocab_size is not None:
            _check_int("vocab_size", vocab_size, 1)
        self.dataset = source if isinstance(source, ShardDataset) else open_shards(source, verify=verify)
        if vocab_size is not None:
            self.dataset.check_vocab(vocab_size)
        self.vocab_size = self.dataset.vocab_size  # set by check_vocab, here or by whoever opened the dataset
        self.seq_len, self.max_docs, self.seed = int(seq_len), int(max_docs), int(seed)
        self.rank, self.world_size, self.window = int(rank), int(world_size), int(window)
        self.long_docs, self.drop_last = long_docs, bool(drop_last)
        self.prefetch, self.pin_memory, self.backend = int(prefetch), bool(pin_memory), backend
        self.bound_attention = bool(bound_attention)
        self.virtual_tokens = int(virtual_tokens)
        self._impl = (_CppBackend if backend == "cpp" else _NumpyBackend)(self.dataset, self.vocab_size)
        doc_len = self.seq_len - self.virtual_tokens
        eff_len, supervised = self._impl.effective_lengths(doc_len, None, self.long_docs)
        self.supervised_uncapped = int(np.asarray(supervised).sum())  # before any loss-bucket cut
        if loss_bucket == "auto":
            loss_bucket = choose_loss_bucket(
                np.asarray(eff_len) + self.virtual_tokens * (np.asarray(eff_len) > 0), supervised,
                seq_len=self.seq_len, max_docs=self.max_docs, window=self.window, seed=self.seed,
                plan_epoch=self._impl.plan_epoch,
            )
        self.loss_bucket = None if loss_bucket is None else int(loss_bucket)
        self.bucket = self.loss_bucket or self.seq_len
        if self.loss_bucket is not None:
            eff_len, supervised = self._impl.effective_lengths(doc_len, self.loss_bucket, self.long_docs)
        self.eff_len = np.ascontiguousarray(eff_len, dtype=np.int64)
        # What planning counts per document: its kept tokens plus its virtual slots.
        self.plan_len = self.eff_len + self.virtual_tokens * (self.eff_len > 0)
        self.supervised = np.ascontiguousarray(supervised, dtype=np.int64)
        if not self.eff_len.any():
            raise ValueError(
                f"PackedLoader: every one of the {len(self.dataset)} documents is longer than seq_len={seq_len} and "
                "long_docs='drop' drops them all; raise seq_len or use long_docs='truncate'"
            )
        if not self.supervised.any():  # a data problem (ShardError: `fastsft train` reports it as one line)
            raise ShardError(
                f"PackedLoader: {self.dataset.files[0] if len(self.dataset.files) == 1 else self.dataset.files}: no "
                f"supervised token in any of the {len(self.dataset)} documents (every loss-mask byte is 0 after "
                f"seq_len={seq_len} truncation); training would learn nothing. Check the data's response fields and "
                "--train-on, then prepare again"
            )
        self.epoch = 0
        self._index = 0  # batches of the current epoch already handed out
        self._iterating = False
        self._plan_cache: tuple[int, np.ndarray, np.ndarray] | None = None
        self._config = self._make_config()
        self._fingerprint = hashlib.sha256(json.dumps(self._config, sort_keys=True).encode()).hexdigest()[:16]
        if len(self) == 0:
            raise ValueError(
                f"PackedLoader: the dataset packs into fewer rows than world_size={world_size} with drop_last=True; "
                "use drop_last=False or more data"
            )

    # ---------------------------------------------------------------------------------------------------- plan

    def _make_config(self) -> dict:
        config = dict(
            seq_len=self.seq_len, max_docs=self.max_docs, seed=self.seed, world_size=self.world_size,
            window=self.window, loss_bucket=self.loss_bucket, long_docs=self.long_docs, drop_last=self.drop_last,
            documents=len(self.dataset), tokens=self.dataset.num_tokens,
            lengths_crc32=zlib.crc32(np.ascontiguousarray(self.dataset.lengths, dtype=np.int64).tobytes()),
        )
        if self.virtual_tokens:
            config["virtual_tokens"] = self.virtual_tokens
        return config

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(row_ptr, row_docs): the rows of every rank for `epoch`, as CSR arrays of document ids."""
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            row_ptr, row_docs = self._impl.plan_epoch(
                self.plan_len, self.supervised, seq_len=self.seq_len, max_docs=self.max_docs,
                loss_bucket=self.loss_bucket, window=self.window, seed=self.seed, epoch=epoch,
                world_size=self.world_size, drop_last=self.drop_last,
            )
            self._plan_cache = (epoch, row_ptr, row_docs)
        return self._plan_cache[1], self._plan_cache[2]

    def rank_rows(self, epoch: int) -> np.ndarray:
        """Indices (into plan(epoch)) of this rank's rows, in the order its batches come."""
        row_ptr, _ = self.plan(epoch)
        return np.arange(self.rank, len(row_ptr) - 1, self.world_size, dtype=np.int64)

    def __len__(self) -> int:
        """Batches this rank yields in the current epoch (every rank yields the same number)."""
        return (len(self.plan(self.epoch)[0]) - 1) // self.world_size

    @property
    def stats(self) -> dict:
        """Packing of the current epoch (all ranks) and what truncation / dropping cost."""
        row_ptr, row_docs = self.plan(self.epoch)
        rows = len(row_ptr) - 1
        lengths = self.dataset.lengths
        kept = self.eff_len > 0
        packed_tokens = int(self.plan_len[row_docs].sum())
        return dict(
            epoch=self.epoch,
            rows=rows,
            batches_per_rank=rows // self.world_size,
            packing_efficiency=packed_tokens / max(1, rows * self.seq_len),
            packed_tokens=packed_tokens,
            documents=len(lengths),
            truncated_docs=int((kept & (self.eff_len < lengths)).sum()),
            truncated_tokens=int((lengths - self.eff_len)[kept].sum()),
            dropped_docs=int((~kept).sum()),
            dropped_tokens=int(lengths[~kept].sum()),
            empty_rows=int((np.diff(row_ptr) == 0).sum()),
            loss_bucket=self.bucket,
            lm_head_rows_skipped=1.0 - self.bucket / self.seq_len,
            supervised_positions=int(self.supervised.sum()),
            supervised_positions_cut=self.supervised_uncapped - int(self.supervised.sum()),
        )

    # ------------------------------------------------------------------------------------------------ assembly

    def _allocate(self, num_rows: int) -> tuple[dict, dict]:
        """Torch buffers (pinned when asked) and numpy views of the same memory for the assembler."""
        shapes = dict(
            input_ids=((num_rows, self.seq_len), torch.int64),
            position_ids=((num_rows, self.seq_len), torch.int32),
            labels=((num_rows, self.seq_len), torch.int64),
            cu_seqlens=((num_rows, self.max_docs + 2), torch.int32),
            loss_positions=((num_rows, self.bucket), torch.int32),
        )
        tensors = {k: torch.empty(shape, dtype=dtype, pin_memory=self.pin_memory) for k, (shape, dtype) in shapes.items()}
        arrays = {k: t.numpy() for k, t in tensors.items()}
        arrays["counts"] = np.empty((num_rows, 3), np.int64)
        return tensors, arrays

    def _assemble_chunk(self, row_ptr: np.ndarray, row_docs: np.ndarray, rows: np.ndarray) -> list[Batch]:
        tensors, arrays = self._allocate(len(rows))
        self._impl.assemble(row_ptr, row_docs, self.eff_len, np.ascontiguousarray(rows, dtype=np.int64), arrays)
        if self.virtual_tokens:
            insert_virtual_tokens(arrays, self.virtual_tokens)
        counts = arrays["counts"].tolist()  # host-side numpy, not a device sync
        bounds = [
            attention_bounds(arrays["cu_seqlens"][i], counts[i][2], self.seq_len, self.max_docs)
            if self.bound_attention else (self.max_docs + 2, self.seq_len)
            for i in range(len(rows))
        ]
        return [
            Batch(
                input_ids=tensors["input_ids"][i], position_ids=tensors["position_ids"][i],
                labels=tensors["labels"][i], cu_seqlens=tensors["cu_seqlens"][i, :bounds[i][0]],
                max_seqlen=bounds[i][1], loss_positions=tensors["loss_positions"][i], num_loss_tokens=counts[i][0],
                num_tokens=counts[i][1], num_docs=counts[i][2], virtual_tokens=self.virtual_tokens,
            )
            for i in range(len(rows))
        ]

    def _batches(self, row_ptr: np.ndarray, row_docs: np.ndarray, rows: np.ndarray):
        for start in range(0, len(rows), ROWS_PER_CALL):
            yield from self._assemble_chunk(row_ptr, row_docs, rows[start:start + ROWS_PER_CALL])

    # ----------------------------------------------------------------------------------------------- iteration

    def __iter__(self):
        """One epoch (or its rest, after load_state_dict). One iteration at a time: the loader's position is one
        (epoch, index) that state_dict() saves, so a second iterator running beside the first is a RuntimeError
        rather than a second reader handing out the same rows."""
        self._check_not_iterating("iterate")
        return self._iterate()

    def _check_not_iterating(self, what: str) -> None:
        if self._iterating:
            raise RuntimeError(
                f"PackedLoader: cannot {what} while another iteration over this loader is in progress (both would "
                "hand out the same rows); finish or close the first iterator, or build a second PackedLoader"
            )

    def _iterate(self):
        self._check_not_iterating("iterate")
        self._iterating = True
        try:
            yield from self._epoch_batches()
        finally:
            self._iterating = False

    def _epoch_batches(self):
        if self._index >= len(self):  # a state saved right after the last batch of an epoch
            self.epoch += 1
            self._index = 0
        epoch = self.epoch
        row_ptr, row_docs = self.plan(epoch)  # here, not in the thread: planning errors surface at once
        batches = self._batches(row_ptr, row_docs, self.rank_rows(epoch)[self._index:])
        source = batches if self.prefetch == 0 else _Prefetcher(batches, self.prefetch)
        try:
            for batch in source:
                self._index += 1
                yield batch
        finally:
            if isinstance(source, _Prefetcher):
                source.close()
        self.epoch = epoch + 1
        self._index = 0

    # -------------------------------------------------------------------------------------------------- resume

    def state_dict(self) -> dict:
        return dict(version=_STATE_VERSION, epoch=self.epoch, index=self._index, seed=self.seed,
                    fingerprint=self._fingerprint, config=dict(self._config))

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved position. Every field is checked (type and range) before anything changes."""
        where = "PackedLoader.load_state_dict"
        self._check_not_iterating("load a state")
        if not isinstance(state, dict):
            raise ValueError(f"{where}: state must be a dict, got {type(state).__name__}")
        missing = {"epoch", "index", "fingerprint"} - set(state)
        if missing:
            raise ValueError(f"{where}: state is missing {sorted(missing)}")
        version = state.get("version", _STATE_VERSION)
        if version != _STATE_VERSION or isinstance(version, bool):
            raise ValueError(f"{where}: state version {version!r}, this fastsft reads {_STATE_VERSION}")
        for name, high in (("epoch", _MAX_EPOCH), ("index", None)):
            value = state[name]
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0 or (
                    high is not None and value > high):
                bound = f"[0, {high}]" if high is not None else ">= 0"
                raise ValueError(f"{where}: {name} must be an int {bound}, got {value!r}")
        if not isinstance(state["fingerprint"], str):
            raise ValueError(f"{where}: fingerprint must be a string, got {type(state['fingerprint']).__name__}")
        if state["fingerprint"] != self._fingerprint:
            theirs = state.get("config") if isinstance(state.get("config"), dict) else {}
            diff = {k: (theirs.get(k), v) for k, v in self._config.items() if theirs.get(k) != v}
            raise ValueError(
                f"{where}: the state comes from a different loader configuration or dataset "
                f"(field: (saved, now) = {diff}); resume with the same data and loader settings"
            )
        epoch, index = int(state["epoch"]), int(state["index"])
        batches = (len(self.plan(epoch)[0]) - 1) // self.world_size
        if index > batches:
            raise ValueError(f"{where}: index {index} outside epoch {epoch} of {batches} batches")
        self.epoch, self._index = epoch, index


# ------------------------------------------------------------------------------------------------ loss bucket

LOSS_BUCKET_GRANULE = 64  # the bucket is a multiple of this (tensor-core friendly row counts for the lm_head GEMM)
LOSS_BUCKET_SAMPLE_DOCS = 1 << 16  # documents the choice plans with (a seeded sample; planning is per window)
LOSS_BUCKET_MAX_EFFICIENCY_DROP = 0.0005  # packing efficiency may fall this much (absolute) below no bucket
LOSS_BUCKET_MAX_CUT = 0.001  # share of supervised positions the bucket may cut from over-long responses


def choose_loss_bucket(eff_len: np.ndarray, supervised: np.ndarray, *, seq_len: int, max_docs: int, window: int,
                       seed: int, plan_epoch) -> int | None:
    """The smallest multiple of LOSS_BUCKET_GRANULE that keeps packing within LOSS_BUCKET_MAX_EFFICIENCY_DROP of
    the bucket-free plan (measured by planning a seeded sample of LOSS_BUCKET_SAMPLE_DOCS documents) and cuts at
    most LOSS_BUCKET_MAX_CUT of the supervised positions (counted over all documents). eff_len / supervised: the
    bucket-free effective lengths and supervised positions per document.
    None when no bucket below seq_len qualifies (then loss_positions has seq_len entries, as without a bucket).

    The packer already balances supervised positions across rows under a budget, so the bucket can sit near the
    mean supervised count of a row rather than its maximum; the sample plan measures how near."""
    all_supervised = np.asarray(supervised, dtype=np.int64)  # the cut is counted over every document
    total_supervised = int(all_supervised.sum())
    if total_supervised == 0:
        return None
    n = len(eff_len)
    if n > LOSS_BUCKET_SAMPLE_DOCS:  # packing is simulated on a sample
        pick = np.sort(np.random.default_rng(seed).choice(n, LOSS_BUCKET_SAMPLE_DOCS, replace=False))
        eff_len, supervised = eff_len[pick], supervised[pick]
    eff_len = np.ascontiguousarray(eff_len, dtype=np.int64)
    supervised = np.ascontiguousarray(supervised, dtype=np.int64)

    def efficiency(bucket: int | None) -> float:
        sup = supervised if bucket is None else np.minimum(supervised, bucket)
        row_ptr, _ = plan_epoch(eff_len, sup, seq_len=seq_len, max_docs=max_docs, loss_bucket=bucket, window=window,
                                seed=seed, epoch=0, world_size=1, drop_last=False)
        return int(eff_len.sum()) / max(1, (len(row_ptr) - 1) * seq_len)

    floor = efficiency(None) - LOSS_BUCKET_MAX_EFFICIENCY_DROP

    def acceptable(bucket: int) -> bool:
        cut = int(np.maximum(all_supervised - bucket, 0).sum())
        return cut <= LOSS_BUCKET_MAX_CUT * total_supervised and efficiency(bucket) >= floor

    low, high = 1, -(-seq_len // LOSS_BUCKET_GRANULE)  # in granules; high * granule >= seq_len means no bucket
    while low < high:  # smallest acceptable (acceptability grows with the bucket)
        mid = (low + high) // 2
        if acceptable(mid * LOSS_BUCKET_GRANULE):
            high = mid
        else:
            low = mid + 1
    bucket = low * LOSS_BUCKET_GRANULE
    return None if bucket >= seq_len else bucket


class _Prefetcher:
    """Runs a batch generator in a daemon thread, `depth` batches ahead. Exceptions re-raise in the consumer;
    `close()` stops the thread promptly (it polls a stop flag while the queue is full)."""

    _DONE = object()

    def __init__(self, batches, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(batches,), name="fastsft-prefetch", daemon=True)
        self._thread.start()
        _LIVE_PREFETCHERS.add(self)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_QUEUE_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, batches) -> None:
        try:
            for batch in batches:
                if not self._put(batch):
                    return
            self._put(self._DONE)
        except BaseException as e:  # noqa: BLE001 -- handed to the consumer, which re-raises it
            self._put(e)

    def __iter__(self):
        while True:
            item = self._queue.get()
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item  # the original error, with the prefetch thread's traceback
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


# A prefetch thread still inside a C++ call (GIL released) when the interpreter finalizes is killed as it takes the
# GIL back, and that unwinding through C++ aborts the process ("terminate called without an active exception": seen
# at the exit of a torchrun rank whose loader stopped mid-epoch). atexit runs before daemon threads are killed, so
# every live prefetcher is stopped and joined there.
_LIVE_PREFETCHERS: "weakref.WeakSet[_Prefetcher]" = weakref.WeakSet()


@atexit.register
def _close_live_prefetchers() -> None:
    for prefetcher in list(_LIVE_PREFETCHERS):
        prefetcher.close()
