"""PackedLoader and the packing behind it: the batch contract checked against a plain per-document construction,
coverage of every document once per epoch across ranks, determinism, resume (also across an epoch boundary), rank
split, the loss bucket, and the C++ extension byte-identical to the numpy reference (fastsft/data/packing_ref.py)."""

import gc
import os
import json
import subprocess
import sys
import threading
from collections import Counter

import numpy as np
import pytest
import torch

from fastsft import _C
from fastsft.data import packing_ref
from fastsft.data.batch import IGNORE_INDEX, LOSS_POSITION_FILL, PAD_ID, cu_seqlens_lengths
from fastsft.data.loader import PackedLoader
from fastsft.data.shards import ShardError, ShardWriter, open_shards

SEQ_LEN = 96


def write_dataset(out_dir, n_docs, vocab_size, seed, spans=False, max_len=160, max_tokens_per_shard=2500):
    """Lognormal lengths (a few longer than SEQ_LEN), random ids, about half the tokens supervised: scattered, or
    (spans=True) as one contiguous response span per document, like real prompt/response data."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(20), 0.9, n_docs).astype(int), 1, max_len)
    with ShardWriter(out_dir, vocab_size, max_tokens_per_shard=max_tokens_per_shard) as writer:
        for n in lengths:
            mask = np.arange(n) >= rng.integers(0, n + 1) if spans else rng.random(n) < 0.5
            writer.add(rng.integers(0, vocab_size, n), mask)
    return open_shards(out_dir)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shards"), 400, 1000, seed=0)


@pytest.fixture(scope="module")
def dataset_u32(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shards32"), 250, 100_000, seed=1, spans=True)


def kept_length(tokens_mask, seq_len, loss_bucket):
    """Straightforward truncation: at most seq_len tokens, and at most loss_bucket supervised positions."""
    tokens, mask = tokens_mask
    length = min(len(tokens), seq_len)
    if loss_bucket is not None:
        supervised = 0
        for t in range(1, length):
            supervised += bool(mask[t])
            if supervised > loss_bucket:
                return t
    return length


def expected_row(dataset, docs, seq_len, max_docs, loss_bucket):
    """The batch contract written out token by token, one document at a time."""
    bucket = loss_bucket or seq_len
    ids, positions, labels, cu, loss_pos = [], [], [], [0], []
    for doc in docs:
        length = kept_length(dataset[doc], seq_len, loss_bucket)
        tokens = [int(x) for x in dataset[doc][0][:length]]
        mask = [bool(x) for x in dataset[doc][1][:length]]
        for t in range(length):
            if t + 1 < length and mask[t + 1]:
                loss_pos.append(len(ids))
                labels.append(tokens[t + 1])
            else:
                labels.append(IGNORE_INDEX)
            ids.append(tokens[t])
            positions.append(t)
        cu.append(len(ids))
    num_tokens, pad = len(ids), seq_len - len(ids)
    return dict(
        input_ids=ids + [PAD_ID] * pad,
        position_ids=positions + list(range(pad)),
        labels=labels + [IGNORE_INDEX] * pad,
        cu_seqlens=cu + [seq_len] * (max_docs + 2 - len(cu)),
        loss_positions=loss_pos + [LOSS_POSITION_FILL] * (bucket - len(loss_pos)),
        num_loss_tokens=len(loss_pos),
        num_tokens=num_tokens,
        num_docs=len(docs),
    )


def rank_docs(loader, epoch):
    row_ptr, row_docs = loader.plan(epoch)
    return [row_docs[row_ptr[r]:row_ptr[r + 1]].tolist() for r in loader.rank_rows(epoch)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for name in ("input_ids", "position_ids", "labels", "cu_seqlens", "loss_positions"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name
        assert (x.num_loss_tokens, x.num_tokens, x.num_docs) == (y.num_loss_tokens, y.num_tokens, y.num_docs)


@pytest.mark.parametrize("which, loss_bucket", [("uint16", None), ("uint16", 24), ("uint32", None)])
def test_batches_match_per_document_construction(dataset, dataset_u32, which, loss_bucket):
    dataset = dataset if which == "uint16" else dataset_u32
    max_docs = 6
    loader = PackedLoader(dataset, SEQ_LEN, max_docs, seed=3, window=64, loss_bucket=loss_bucket, prefetch=2,
                          bound_attention=False)  # the full-length contract (bounds: tests/test_loss_bucket_and_bounds.py)
    plan_rows = rank_docs(loader, 0)
    batches = list(loader)
    assert len(batches) == len(plan_rows) > 0
    saw_padding = saw_truncated = False
    for batch, docs in zip(batches, plan_rows, strict=True):
        want = expected_row(dataset, docs, SEQ_LEN, max_docs, loss_bucket)
        for name in ("input_ids", "position_ids", "labels", "cu_seqlens", "loss_positions"):
            assert getattr(batch, name).tolist() == want[name], name
        assert (batch.num_loss_tokens, batch.num_tokens, batch.num_docs) == (
            want["num_loss_tokens"], want["num_tokens"], want["num_docs"])
        assert batch.max_seqlen == SEQ_LEN
        assert batch.input_ids.dtype == torch.int64 and batch.labels.dtype == torch.int64
        assert batch.position_ids.dtype == torch.int32 and batch.cu_seqlens.dtype == torch.int32
        assert batch.loss_positions.dtype == torch.int32
        saw_padding |= batch.num_tokens < SEQ_LEN
        saw_truncated |= any(len(dataset[d][0]) > SEQ_LEN for d in docs)
    assert saw_padding and saw_truncated  # both edge cases were exercised


def test_contract_invariants(dataset):
    loader = PackedLoader(dataset, SEQ_LEN, 5, seed=11, window=50, loss_bucket=40)
    for batch in loader:
        cu = batch.cu_seqlens
        assert cu.shape[0] in cu_seqlens_lengths(5) and cu[0] == 0 and cu[-1] == SEQ_LEN
        assert bool((cu[1:] >= cu[:-1]).all())
        # positions restart at 0 at every segment start and count up by one inside a segment
        starts = torch.zeros(SEQ_LEN, dtype=torch.bool)
        starts[cu[:-1][cu[:-1] < SEQ_LEN].long()] = True
        pos = batch.position_ids
        assert bool((pos[starts] == 0).all()) and bool((pos[1:][~starts[1:]] == pos[:-1][~starts[1:]] + 1).all())
        # the last token of each document has no target; padding has none either
        assert bool((batch.labels[cu[1:batch.num_docs + 1].long() - 1] == IGNORE_INDEX).all())
        assert bool((batch.labels[batch.num_tokens:] == IGNORE_INDEX).all())
        assert bool((batch.input_ids[batch.num_tokens:] == PAD_ID).all())
        supervised = torch.nonzero(batch.labels != IGNORE_INDEX).flatten()
        n = supervised.numel()
        assert n == batch.num_loss_tokens <= 40
        assert batch.loss_positions[:n].tolist() == supervised.tolist()
        assert bool((batch.loss_positions[n:] == LOSS_POSITION_FILL).all())


@pytest.mark.parametrize("world_size", [1, 3])
def test_every_document_once_per_epoch_across_ranks(dataset, world_size):
    loaders = [PackedLoader(dataset, SEQ_LEN, 4, seed=5, rank=r, world_size=world_size, window=70)
               for r in range(world_size)]
    for epoch in range(2):
        batches = [list(loader) for loader in loaders]
        assert len({len(b) for b in batches}) == 1  # every rank yields the same number of batches
        # compare what the batches hold (segments) with every document's kept tokens: independent of the plan
        segments = Counter()
        for rank_batches in batches:
            for batch in rank_batches:
                cu = batch.cu_seqlens.tolist()
                for k in range(batch.num_docs):
                    segments[tuple(batch.input_ids[cu[k]:cu[k + 1]].tolist())] += 1
        documents = Counter(tuple(int(x) for x in dataset[d][0][:SEQ_LEN]) for d in range(len(dataset)))
        assert segments == documents, f"epoch {epoch}"
        assert all(loader.epoch == epoch + 1 for loader in loaders)


def test_rank_split_disjoint_with_drop_last(dataset):
    world_size = 4
    loaders = [PackedLoader(dataset, SEQ_LEN, 4, seed=2, rank=r, world_size=world_size, window=33, drop_last=True)
               for r in range(world_size)]
    rows = [set(loader.rank_rows(0).tolist()) for loader in loaders]
    assert len({len(r) for r in rows}) == 1 and len({len(loader) for loader in loaders}) == 1
    assert sum(len(r) for r in rows) == len(set().union(*rows))  # disjoint
    total_rows = len(loaders[0].plan(0)[0]) - 1
    assert total_rows % world_size == 0


def test_determinism_and_epochs_differ(dataset):
    a = PackedLoader(dataset, SEQ_LEN, 4, seed=7, window=64)
    b = PackedLoader(dataset, SEQ_LEN, 4, seed=7, window=64)
    first_a, first_b = list(a), list(b)
    assert_same_batches(first_a, first_b)
    second_a = list(a)
    assert not torch.equal(first_a[0].input_ids, second_a[0].input_ids)  # a new epoch is a new shuffle
    other_seed = list(PackedLoader(dataset, SEQ_LEN, 4, seed=8, window=64))
    assert not torch.equal(first_a[0].input_ids, other_seed[0].input_ids)


@pytest.mark.parametrize("stop_after", ["mid_epoch", "end_of_epoch", "next_epoch"])
def test_resume_is_byte_identical(dataset, stop_after):
    config = dict(seq_len=SEQ_LEN, max_docs=4, seed=9, window=48, rank=1, world_size=2)
    reference = PackedLoader(dataset, **config)
    epoch0 = list(reference)
    uninterrupted = epoch0 + list(reference)
    k = {"mid_epoch": 5, "end_of_epoch": len(epoch0), "next_epoch": len(epoch0) + 3}[stop_after]

    first = PackedLoader(dataset, **config)
    taken = []
    while len(taken) < k:
        for batch in first:
            taken.append(batch)
            if len(taken) == k:
                break
    state = first.state_dict()
    resumed = PackedLoader(dataset, **config)
    resumed.load_state_dict(state)
    rest = []
    while len(taken) + len(rest) < len(uninterrupted):
        rest.extend(resumed)
    assert_same_batches(taken + rest[: len(uninterrupted) - k], uninterrupted)


def test_resume_refuses_other_config(dataset):
    state = PackedLoader(dataset, SEQ_LEN, 4, seed=1).state_dict()
    with pytest.raises(ValueError, match="max_docs"):
        PackedLoader(dataset, SEQ_LEN, 5, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        PackedLoader(dataset, SEQ_LEN, 4, seed=2).load_state_dict(state)


def test_long_docs_drop_and_stats(dataset):
    too_long = int((dataset.lengths > SEQ_LEN).sum())
    assert too_long > 0
    loader = PackedLoader(dataset, SEQ_LEN, 6, long_docs="drop", window=64)
    _, row_docs = loader.plan(0)
    assert sorted(row_docs.tolist()) == [d for d in range(len(dataset)) if dataset.lengths[d] <= SEQ_LEN]
    stats = loader.stats
    assert stats["dropped_docs"] == too_long and stats["truncated_docs"] == 0
    assert stats["dropped_tokens"] == int(dataset.lengths[dataset.lengths > SEQ_LEN].sum())
    truncating = PackedLoader(dataset, SEQ_LEN, 6, window=64).stats
    assert truncating["truncated_docs"] == too_long and truncating["dropped_docs"] == 0
    assert 0.5 < truncating["packing_efficiency"] <= 1.0
    assert truncating["packed_tokens"] == int(np.minimum(dataset.lengths, SEQ_LEN).sum())


CONFIGS = [  # (seed, window, max_docs, long_docs, loss_bucket, world_size, drop_last)
    (0, 8192, 8, "truncate", None, 1, False),
    (1, 17, 3, "truncate", 30, 2, False),
    (2, 64, 6, "drop", None, 3, False),
    (3, 100, 16, "drop", 12, 4, True),
    (4, 5, 1, "truncate", None, 5, False),
]


@pytest.mark.parametrize("seed, window, max_docs, long_docs, loss_bucket, world_size, drop_last", CONFIGS)
@pytest.mark.parametrize("which", ["uint16", "uint32"])
def test_cpp_equals_numpy_reference(dataset, dataset_u32, which, seed, window, max_docs, long_docs, loss_bucket,
                                    world_size, drop_last):
    ds = dataset if which == "uint16" else dataset_u32
    config = dict(seq_len=SEQ_LEN, max_docs=max_docs, seed=seed, window=window, long_docs=long_docs,
                  loss_bucket=loss_bucket, world_size=world_size, rank=world_size - 1, drop_last=drop_last)
    cpp = PackedLoader(ds, backend="cpp", **config)
    ref = PackedLoader(ds, backend="numpy", prefetch=0, **config)
    np.testing.assert_array_equal(cpp.eff_len, ref.eff_len)
    if loss_bucket is not None:
        np.testing.assert_array_equal(cpp.supervised, ref.supervised)
    for epoch in range(2):
        for a, b in zip(cpp.plan(epoch), ref.plan(epoch), strict=True):
            np.testing.assert_array_equal(a, b)
        assert_same_batches(list(cpp), list(ref))


def test_loss_bucket_never_overflows(dataset):
    bucket = 10
    loader = PackedLoader(dataset, SEQ_LEN, 8, window=64, loss_bucket=bucket)
    counts = [b.num_loss_tokens for b in loader]
    assert max(counts) <= bucket and max(counts) == bucket  # the cap binds and holds
    for batch in loader:
        assert int((batch.labels != IGNORE_INDEX).sum()) == batch.num_loss_tokens <= bucket


def test_prefetch_thread_stops_on_early_break_and_surfaces_errors(dataset):
    def prefetch_threads():
        return [t for t in threading.enumerate() if t.name == "fastsft-prefetch"]

    loader = PackedLoader(dataset, SEQ_LEN, 4, window=64, prefetch=3)
    for i, _ in enumerate(loader):
        if i == 2:
            break
    gc.collect()
    assert prefetch_threads() == []
    assert loader.state_dict()["index"] == 3

    def broken_assemble(*args):
        raise OSError("disk vanished")

    loader._impl.assemble = broken_assemble
    with pytest.raises(OSError, match="disk vanished"):
        list(loader)
    assert prefetch_threads() == []


def test_bad_arguments_and_bad_plans_raise(dataset, tmp_path):
    with pytest.raises(ValueError, match="rank"):
        PackedLoader(dataset, SEQ_LEN, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="long_docs"):
        PackedLoader(dataset, SEQ_LEN, 4, long_docs="split")
    with pytest.raises(ValueError, match="loss_bucket"):
        PackedLoader(dataset, SEQ_LEN, 4, loss_bucket=SEQ_LEN + 1)
    with ShardWriter(tmp_path, 50) as writer:
        writer.add(np.arange(9), np.ones(9, bool))
    with pytest.raises(ValueError, match="drops them all"):
        PackedLoader(tmp_path, 8, 4, long_docs="drop")
    # a hand-made plan that does not fit is refused by the C++ side, not a crash
    loader = PackedLoader(dataset, SEQ_LEN, 4, window=64)
    bufs = packing_ref.allocate_batch_buffers(1, SEQ_LEN, 4, SEQ_LEN)
    args = [bufs[k] for k in ("input_ids", "position_ids", "labels", "cu_seqlens", "loss_positions", "counts")]
    corpus = loader._impl.corpus
    bad_doc = np.array([0, 1], np.int64), np.array([len(dataset)], np.int64)
    with pytest.raises(ValueError, match="out of range"):
        _C.assemble_rows(corpus, *bad_doc, loader.eff_len, np.zeros(1, np.int64), *args)
    long_row = np.array([0, 5], np.int64), np.arange(5, dtype=np.int64)
    too_long = np.full(len(dataset), SEQ_LEN, np.int64)
    with pytest.raises(ValueError):
        _C.assemble_rows(corpus, *long_row, too_long, np.zeros(1, np.int64), *args)
    with pytest.raises(ValueError, match="dtype"):
        _C.assemble_rows(corpus, *bad_doc, loader.eff_len, np.zeros(1, np.int64), args[0].astype(np.int32), *args[1:])


def test_rng_matches_reference():
    # the C++ and python SplitMix64 streams agree (plan equality depends on it); here on a permutation of 1000
    eff = np.ones(1000, np.int64)
    row_ptr, row_docs = _C.plan_epoch(eff, np.zeros(1000, np.int64), 1, 1, 1, 1000, 123, 4, 1, False)
    ref_ptr, ref_docs = packing_ref.plan_epoch(eff, np.zeros(1000, np.int64), seq_len=1, max_docs=1, loss_bucket=None,
                                               window=1000, seed=123, epoch=4)
    np.testing.assert_array_equal(row_docs, ref_docs)
    assert sorted(row_docs.tolist()) == list(range(1000)) and row_docs.tolist() != list(range(1000))


def test_opens_a_prepared_directory_and_checks_vocab(tmp_path):
    rng = np.random.default_rng(4)
    with ShardWriter(tmp_path / "train", 500) as writer:
        for n in rng.integers(5, 60, 40):
            writer.add(rng.integers(0, 499, n), rng.random(n) < 0.5)
    summary = writer.close()
    manifest = {"splits": {"train": {"files": [f"train/{f}" for f in summary["files"]]}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    loader = PackedLoader(str(tmp_path), 64, 4, window=16, vocab_size=500)
    assert sum(b.num_docs for b in loader) == 40
    with pytest.raises(ShardError, match="outside the model's vocabulary of 100"):
        PackedLoader(tmp_path, 64, 4, vocab_size=100)


def test_interpreter_exits_with_a_prefetch_thread_mid_epoch(tmp_path):
    write_dataset(tmp_path, 300, 1000, seed=6)
    script = (
        "import sys; from fastsft.data.loader import PackedLoader\n"
        f"loader = PackedLoader({str(tmp_path)!r}, 32, 4, window=32, prefetch=2)\n"
        "it = iter(loader); next(it)\n"  # the thread now waits on a full queue; the generator is never closed
        "sys.exit(0)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], timeout=60, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.gpu
def test_pinned_batches_copy_to_gpu(dataset):
    loader = PackedLoader(dataset, SEQ_LEN, 4, window=64)  # pin_memory defaults to True with CUDA
    for i, batch in enumerate(loader):
        assert batch.input_ids.is_pinned() and batch.loss_positions.is_pinned()
        on_gpu = batch.to("cuda")
        torch.cuda.synchronize()
        assert torch.equal(on_gpu.labels.cpu(), batch.labels) and on_gpu.num_loss_tokens == batch.num_loss_tokens
        if i == 3:
            break


_EXIT_MID_EPOCH = """
import sys
from fastsft.data.loader import PackedLoader
it = iter(PackedLoader(sys.argv[1], seq_len=64, max_docs=8, prefetch=4, verify=False))
next(it)
sys.exit(0)  # `it` stays alive: its prefetch thread is mid-epoch when the interpreter finalizes
"""


def test_exit_with_a_loader_mid_epoch_is_clean(dataset, tmp_path):
    """A process that exits while its prefetch thread is inside the C++ assembly must not abort ("terminate called
    without an active exception", rc -6: seen at the end of torchrun ranks before the atexit close)."""
    script = tmp_path / "exit_mid_epoch.py"
    script.write_text(_EXIT_MID_EPOCH)
    shard_dir = os.path.dirname(dataset.files[0])
    codes = [subprocess.run([sys.executable, str(script), shard_dir], capture_output=True, text=True).returncode
             for _ in range(12)]
    assert codes == [0] * 12, codes
