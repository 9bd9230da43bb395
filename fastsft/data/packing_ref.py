"""Pure numpy/python reference of the packing loader: the epoch plan and the batch assembly that `csrc/` (module
`fastsft._C`) implements in C++. The two must agree byte for byte (tests/test_loader.py checks it); the C++ side is the
one the loader uses, this one is the specification and the benchmark baseline.

Flow: ShardDataset -> effective_lengths (truncate / drop, loss-bucket cap; once per loader)
      -> plan_epoch (seeded shuffle, best-fit-decreasing per window, row shuffle, rank balancing; once per epoch)
      -> assemble_rows (plan rows -> fixed-shape batch buffers; per batch) -> fastsft.data.batch.Batch

The algorithm, exactly (C++ follows it step by step):

RNG. SplitMix64: `next()` adds GAMMA to a 64-bit state and returns mix64(state). A stream for (seed, epoch, stream)
starts at state = mix64(mix64(mix64(seed) + epoch) + stream) (arithmetic mod 2**64). `below(n)` = next() % n (the
modulo bias, < n / 2**64, is irrelevant here and keeps both implementations trivially identical). Stream 0 permutes
the documents, stream 1 shuffles the rows of every window in turn.

Effective length. A document keeps min(length, seq_len) tokens. A token t of a document is a supervised position
when t + 1 < length and loss_mask[t + 1] (labels are shifted). With a loss bucket B, a document with more than B
supervised positions within its kept prefix is cut to the longest prefix that has exactly B. long_docs="drop" drops
(effective length 0) every document that would have been cut, for either reason.

Plan of one epoch. Fisher-Yates permutation of all document ids (stream 0: for i = n-1 down to 1, swap a[i] and
a[below(i+1)]). Take windows of `window` consecutive ids of the permutation; in each, skip dropped documents and sort
the rest by effective length, longest first, ties kept in permutation order. Best-fit: each document goes to the
open bin with the smallest remaining capacity >= its length (ties: the oldest bin), skipping at most MAX_FIT_PROBES
candidates whose remaining loss budget (B minus supervised positions placed) is too small; with no fit it opens a new
bin. A bin closes when it holds max_docs documents or is exactly full. The window's bins (in opening order) are then
shuffled with stream 1 (Fisher-Yates as above) and appended to the epoch's rows. Rows keep their documents in
placement order.

Ranks. With world_size w and R rows: drop_last trims R to a multiple of w. Otherwise (the default) the rows are
balanced without losing or repeating a document: passes over the existing rows from the last to the first move the
last document of every row holding two or more into a new row at the end, until R is a multiple of w; if no row can
be split any more, empty (all-padding) rows make up the rest. Rank r takes rows r, r + w, r + 2w, ...

Assembly of one row (the batch contract, fastsft/data/batch.py): documents back to back from position 0, then
padding (PAD_ID) to seq_len; position_ids count from 0 in each document and in the padding tail; labels[t] = token
t + 1 when t + 1 is in the same document and carries loss, else IGNORE_INDEX; cu_seqlens = 0, each document's end,
then seq_len for the padding segment and every unused entry; loss_positions = the positions with a label, ascending,
then LOSS_POSITION_FILL up to the bucket; counts = (num_loss_tokens, num_tokens, num_docs).
"""

from __future__ import annotations

from bisect import bisect_left, insort

import numpy as np

from fastsft.data.batch import IGNORE_INDEX, LOSS_POSITION_FILL, PAD_ID

MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
DOC_STREAM = 0
ROW_STREAM = 1
MAX_FIT_PROBES = 32
LONG_DOC_POLICIES = ("truncate", "drop")


# ------------------------------------------------------------------------------------------------------------ RNG


def mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    return z ^ (z >> 31)


def stream_state(seed: int, epoch: int, stream: int) -> int:
    return mix64((mix64((mix64(seed & MASK64) + epoch) & MASK64) + stream) & MASK64)


class SplitMix64:
    def __init__(self, state: int):
        self.state = state & MASK64

    def next(self) -> int:
        self.state = (self.state + GAMMA) & MASK64
        return mix64(self.state)

    def below(self, n: int) -> int:
        return self.next() % n

    def draws(self, count: int) -> np.ndarray:
        """The next `count` outputs at once (vectorized: output k only depends on state + (k + 1) * GAMMA)."""
        k = np.arange(1, count + 1, dtype=np.uint64)
        with np.errstate(over="ignore"):
            z = np.uint64(self.state) + k * np.uint64(GAMMA)
            z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX1)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX2)
            z = z ^ (z >> np.uint64(31))
        self.state = (self.state + count * GAMMA) & MASK64
        return z


def shuffle_in_place(items: list, rng: SplitMix64) -> None:
    """Fisher-Yates: for i = n-1 down to 1, swap items[i] with items[below(i + 1)]."""
    n = len(items)
    if n < 2:
        return
    bounds = np.arange(n, 1, -1, dtype=np.uint64)  # i + 1 for i = n-1 .. 1
    picks = (rng.draws(n - 1) % bounds).tolist()
    for i, j in zip(range(n - 1, 0, -1), picks, strict=True):
        items[i], items[j] = items[j], items[i]


def permutation(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    shuffle_in_place(order, SplitMix64(stream_state(seed, epoch, DOC_STREAM)))
    return order


# ------------------------------------------------------------------------------------------------ effective length


def effective_lengths(dataset, seq_len: int, loss_bucket: int | None = None, long_docs: str = "truncate"):
    """(eff_len, supervised): tokens kept per document (0 = dropped) and its supervised positions within them."""
    if long_docs not in LONG_DOC_POLICIES:
        raise ValueError(f"long_docs must be one of {LONG_DOC_POLICIES}, got {long_docs!r}")
    lengths = dataset.lengths.astype(np.int64)
    eff_len = np.minimum(lengths, seq_len)
    cut = lengths > seq_len
    supervised = np.zeros_like(lengths)
    for f, shard in enumerate(dataset.shards):
        lo, hi = int(dataset.doc_starts[f]), int(dataset.doc_starts[f + 1])
        csum = np.zeros(shard.num_tokens + 1, dtype=np.int64)  # csum[i] = mask[:i].sum()
        np.cumsum(shard.read_mask(0, shard.num_tokens) != 0, out=csum[1:])
        starts = shard.offsets[:-1]
        sup = csum[starts + eff_len[lo:hi]] - csum[starts + 1]
        supervised[lo:hi] = sup
        if loss_bucket is not None:
            over = sup > loss_bucket
            # the (B+1)-th supervised token sits at p; the longest prefix with exactly B is [start, p)
            first_past = np.searchsorted(csum, csum[starts + 1] + loss_bucket + 1, side="left")
            eff_len[lo:hi] = np.where(over, first_past - 1 - starts, eff_len[lo:hi])
            supervised[lo:hi] = np.where(over, loss_bucket, sup)
            cut[lo:hi] |= over
    if long_docs == "drop":
        eff_len[cut] = 0
        supervised[cut] = 0
    return eff_len, supervised


# ------------------------------------------------------------------------------------------------------- planning


def best_fit_decreasing(ids: list[int], eff_len, supervised, seq_len: int, max_docs: int, loss_budget: int):
    """Bins (lists of document ids, in opening order) for the documents `ids` of one window."""
    order = sorted(range(len(ids)), key=lambda k: -int(eff_len[ids[k]]))  # stable: ties keep window order
    bin_docs: list[list[int]] = []
    bin_room: list[int] = []
    bin_loss_room: list[int] = []
    open_bins: list[tuple[int, int]] = []  # sorted (remaining capacity, bin id)
    for k in order:
        doc = ids[k]
        length, sup = int(eff_len[doc]), int(supervised[doc])
        chosen = -1
        first = bisect_left(open_bins, (length, -1))
        for probe in range(first, min(first + MAX_FIT_PROBES, len(open_bins))):
            bin_id = open_bins[probe][1]
            if bin_loss_room[bin_id] >= sup:
                chosen = bin_id
                del open_bins[probe]
                break
        if chosen < 0:
            chosen = len(bin_docs)
            bin_docs.append([])
            bin_room.append(seq_len)
            bin_loss_room.append(loss_budget)
        bin_docs[chosen].append(doc)
        bin_room[chosen] -= length
        bin_loss_room[chosen] -= sup
        if len(bin_docs[chosen]) < max_docs and bin_room[chosen] > 0:
            insort(open_bins, (bin_room[chosen], chosen))
    return bin_docs


def balance_rows(rows: list[list[int]], world_size: int, drop_last: bool) -> list[list[int]]:
    if drop_last:
        return rows[: len(rows) - len(rows) % world_size]
    missing = -len(rows) % world_size
    while missing:
        split_any = False
        for r in range(len(rows) - 1, -1, -1):
            if missing and len(rows[r]) >= 2:
                rows.append([rows[r].pop()])
                missing -= 1
                split_any = True
        if not split_any:
            rows.extend([] for _ in range(missing))
            missing = 0
    return rows


def plan_epoch(eff_len, supervised, *, seq_len: int, max_docs: int, loss_bucket: int | None, window: int, seed: int,
               epoch: int, world_size: int = 1, drop_last: bool = False):
    """The epoch's rows as CSR arrays (row_ptr int64 [rows + 1], row_docs int64), all ranks together."""
    loss_budget = seq_len if loss_bucket is None else loss_bucket
    perm = permutation(len(eff_len), seed, epoch)
    row_rng = SplitMix64(stream_state(seed, epoch, ROW_STREAM))
    rows: list[list[int]] = []
    for start in range(0, len(perm), window):
        ids = [d for d in perm[start:start + window] if eff_len[d] > 0]
        window_rows = best_fit_decreasing(ids, eff_len, supervised, seq_len, max_docs, loss_budget)
        shuffle_in_place(window_rows, row_rng)
        rows.extend(window_rows)
    rows = balance_rows(rows, world_size, drop_last)
    row_ptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=row_ptr[1:])
    row_docs = np.array([d for r in rows for d in r], dtype=np.int64)
    return row_ptr, row_docs


# ------------------------------------------------------------------------------------------------------- assembly


def allocate_batch_buffers(num_rows: int, seq_len: int, max_docs: int, bucket: int) -> dict:
    return dict(
        input_ids=np.empty((num_rows, seq_len), np.int64),
        position_ids=np.empty((num_rows, seq_len), np.int32),
        labels=np.empty((num_rows, seq_len), np.int64),
        cu_seqlens=np.empty((num_rows, max_docs + 2), np.int32),
        loss_positions=np.empty((num_rows, bucket), np.int32),
        counts=np.empty((num_rows, 3), np.int64),
    )


def assemble_rows(dataset, row_ptr, row_docs, eff_len, rows, out: dict, vocab_size: int | None = None) -> None:
    """Fill out[...][i] with plan row rows[i] (see allocate_batch_buffers for the buffers). A document holding a token
    id >= vocab_size raises ShardError naming its file."""
    seq_len = out["input_ids"].shape[1]
    bucket = out["loss_positions"].shape[1]
    for i, row in enumerate(rows):
        docs = row_docs[row_ptr[row]:row_ptr[row + 1]]
        input_ids, position_ids, labels = out["input_ids"][i], out["position_ids"][i], out["labels"][i]
        cu_seqlens, loss_positions = out["cu_seqlens"][i], out["loss_positions"][i]
        cu_seqlens[0] = 0
        pos = 0
        loss_pos = []
        for n, doc in enumerate(docs):
            length = int(eff_len[doc])
            tokens, mask = dataset[doc]
            tokens, mask = tokens[:length].astype(np.int64), mask[:length]
            if vocab_size is not None and length and int(tokens.max()) >= vocab_size:
                _out_of_vocab(dataset, int(doc), int(tokens.max()), vocab_size)
            end = pos + length
            input_ids[pos:end] = tokens
            position_ids[pos:end] = np.arange(length)
            labels[pos:end - 1] = np.where(mask[1:], tokens[1:], IGNORE_INDEX)
            labels[end - 1] = IGNORE_INDEX
            loss_pos.append(pos + np.flatnonzero(mask[1:]))
            cu_seqlens[n + 1] = end
            pos = end
        input_ids[pos:] = PAD_ID
        position_ids[pos:] = np.arange(seq_len - pos)
        labels[pos:] = IGNORE_INDEX
        cu_seqlens[len(docs) + 1:] = seq_len
        loss_pos = np.concatenate(loss_pos) if loss_pos else np.zeros(0, np.int64)
        if loss_pos.size > bucket:
            raise ValueError(f"row {row}: {loss_pos.size} supervised positions overflow the loss bucket of {bucket}")
        loss_positions[:loss_pos.size] = loss_pos
        loss_positions[loss_pos.size:] = LOSS_POSITION_FILL
        out["counts"][i] = (loss_pos.size, pos, len(docs))


def _out_of_vocab(dataset, doc: int, token: int, vocab_size: int):
    from fastsft.data.shards import ShardError

    f = int(np.searchsorted(dataset.doc_starts, doc, side="right")) - 1
    raise ShardError(
        f"{dataset.files[f]}: document {doc - int(dataset.doc_starts[f])} holds token id {token}, outside the "
        f"vocabulary of {vocab_size}: the shard is corrupt (changed since it was verified?); re-run `fastsft prepare` "
        "or restore the file"
    )
