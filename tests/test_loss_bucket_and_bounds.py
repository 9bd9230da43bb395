"""Issue 16 items 1-2 on the loader side: the loss bucket chosen from the data (prompt rows never reach the lm_head,
packing kept, shapes fixed) and attention bounds per row (max_seqlen = the longest segment rounded up to a few
levels, cu_seqlens sized to the segments packed, a few lengths), with torch.compile compilations counted."""

import numpy as np
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils._python_dispatch import TorchDispatchMode

from fastsft.data.batch import IGNORE_INDEX, cu_seqlens_lengths, max_seqlen_levels
from fastsft.data.loader import LOSS_BUCKET_GRANULE, LOSS_BUCKET_MAX_CUT, PackedLoader
from fastsft.data.shards import ShardWriter
from fastsft.model import ModelConfig, Transformer
from fastsft.train.step import apply_compile

VOCAB = 263  # distinct from every other dimension of the model below, so the lm_head matmuls are recognisable
MODEL = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=512)


def write_sft_like(out_dir, n_docs, response_share=0.3, seed=None, median=40, max_len=400):
    """Lognormal lengths, a prompt without loss, then a response span of about `response_share` of the document."""
    rng = np.random.default_rng(seed)
    with ShardWriter(out_dir, VOCAB) as writer:
        for _ in range(n_docs):
            n = int(np.clip(rng.lognormal(np.log(median), 0.8), 2, max_len))
            start = int(n * (1 - rng.uniform(0.5, 1.5) * response_share))
            writer.add(rng.integers(0, VOCAB, n), np.arange(n) >= min(max(start, 1), n - 1))
    return out_dir


class LmHeadRows(TorchDispatchMode):
    """Counts the rows multiplied by the [V, H] head weight (any matmul with a vocabulary-sized operand)."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            a, b = args[-2], args[-1]
            if b.shape[-1] == VOCAB and a.shape[-1] != VOCAB:
                self.rows.append(a.shape[0])
        return func(*args, **(kwargs or {}))


def reference_loss_sum(model, batch) -> float:
    """Float64 cross-entropy summed over every position with a label, from the full [seq_len, V] logits."""
    with torch.no_grad():
        hidden = model(**batch.model_inputs()).double()
        logits = hidden @ model.lm_head_weight.double().T
    keep = batch.labels != IGNORE_INDEX
    return float(torch.nn.functional.cross_entropy(logits[keep], batch.labels[keep], reduction="sum"))


def test_auto_loss_bucket_skips_prompt_rows(tmp_path):
    write_sft_like(tmp_path, 800, response_share=0.3, seed=0)
    seq_len, max_docs = 512, 32
    free = PackedLoader(tmp_path, seq_len, max_docs, prefetch=0)
    auto = PackedLoader(tmp_path, seq_len, max_docs, prefetch=0, loss_bucket="auto")
    assert free.bucket == seq_len
    assert auto.loss_bucket is not None and auto.bucket % LOSS_BUCKET_GRANULE == 0
    assert auto.bucket <= seq_len // 2  # about 30% of the tokens are supervised: at least half the rows skipped
    stats, free_stats = auto.stats, free.stats
    assert stats["lm_head_rows_skipped"] == pytest.approx(1 - auto.bucket / seq_len)
    assert stats["packing_efficiency"] >= free_stats["packing_efficiency"] - 0.0005
    assert stats["supervised_positions_cut"] <= LOSS_BUCKET_MAX_CUT * stats["supervised_positions"]
    assert stats["supervised_positions"] + stats["supervised_positions_cut"] == sum(b.num_loss_tokens for b in free)

    model = Transformer.from_config(ModelConfig(**MODEL), seed=0)
    model.eval()
    batches = list(auto)
    assert all(b.loss_positions.shape == (auto.bucket,) for b in batches)  # fixed shape
    for batch in batches[:2]:
        with LmHeadRows() as counted, torch.no_grad():
            loss_sum = model.loss(batch, num_items=1.0)
        assert sum(counted.rows) == auto.bucket  # the loss op saw the bucket's rows, not seq_len
        assert float(loss_sum) == pytest.approx(reference_loss_sum(model, batch), rel=1e-4)


def test_auto_loss_bucket_is_none_when_everything_is_supervised(tmp_path):
    with ShardWriter(tmp_path, VOCAB) as writer:
        rng = np.random.default_rng()
        for _ in range(200):
            n = int(rng.integers(20, 120))
            writer.add(rng.integers(0, VOCAB, n), np.ones(n, bool))
    loader = PackedLoader(tmp_path, 256, 16, prefetch=0, loss_bucket="auto")
    assert loader.loss_bucket is None or loader.bucket >= 0.9 * 256  # nothing to skip: no bucket that loses packing
    assert loader.stats["packing_efficiency"] >= PackedLoader(tmp_path, 256, 16, prefetch=0).stats[
        "packing_efficiency"] - 0.0005


@pytest.mark.parametrize("virtual_tokens", [0, 3])
def test_attention_bounds_per_row(tmp_path, virtual_tokens):
    write_sft_like(tmp_path, 600, seed=1)
    seq_len, max_docs = 256, 16
    bounded = PackedLoader(tmp_path, seq_len, max_docs, prefetch=0, virtual_tokens=virtual_tokens)
    full = PackedLoader(tmp_path, seq_len, max_docs, prefetch=0, bound_attention=False, virtual_tokens=virtual_tokens)
    lengths, levels = cu_seqlens_lengths(max_docs), max_seqlen_levels(seq_len)
    assert len(lengths) <= 4 and len(levels) <= 4 and lengths[-1] == max_docs + 2 and levels[-1] == seq_len
    model = Transformer.from_config(ModelConfig(**MODEL), seed=0)
    seen = set()
    for i, (b, f) in enumerate(zip(bounded, full, strict=True)):
        cu, cu_full = b.cu_seqlens.tolist(), f.cu_seqlens.tolist()
        assert f.max_seqlen == seq_len and len(cu_full) == max_docs + 2
        n = len(cu)
        assert n in lengths and cu == cu_full[:n] and all(x == seq_len for x in cu_full[n:])
        assert cu[-1] == seq_len  # the padding tail is still a segment of its own
        segments = sum(1 for s, e in zip(cu_full[:-1], cu_full[1:], strict=True) if e > s)
        assert n == min(m for m in lengths if m >= segments + 1)  # the smallest length that holds the row
        longest = max(e - s for s, e in zip(cu[:-1], cu[1:], strict=True))
        assert b.max_seqlen in levels and b.max_seqlen == min(m for m in levels if m >= longest)
        seen.add((n, b.max_seqlen))
        if i < 3 and not virtual_tokens:  # the model gives the same hidden states with the bounds as with the full-length offsets
            with torch.no_grad():
                torch.testing.assert_close(model(**b.model_inputs()), model(**f.model_inputs()), rtol=0, atol=0)
    assert len(seen) >= 3  # the data made the bounds vary


def compiled_frames(loader, batches: int) -> tuple[int, set]:
    """torch.compile frames compiled while a per-block compiled model computes the loss of `batches` rows."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    model = Transformer.from_config(ModelConfig(**dict(MODEL, num_hidden_layers=1)), seed=0)  # one region: fast
    apply_compile(model, "blocks", backend=counter)
    seen = set()
    with torch.no_grad():
        for i, batch in enumerate(loader):
            model.loss(batch, num_items=1.0)
            seen.add((len(batch.cu_seqlens), batch.max_seqlen))
            if i + 1 == batches:
                break
    return counter.frame_count, seen


def test_compilations_over_varying_bounds_are_bounded(tmp_path):
    """Rows with varying (cu_seqlens length, max_seqlen) through per-block compiled forwards. The compiled regions
    (here one block) each compile at most MAX_COMPILATIONS_PER_REGION times, however many distinct
    bounds arrive: torch.compile's automatic dynamic shapes make a size symbolic the first time it changes (one
    recompile for the cu_seqlens length, one for max_seqlen)."""
    write_sft_like(tmp_path, 600, seed=2)
    fixed, fixed_seen = compiled_frames(PackedLoader(tmp_path, 256, 16, prefetch=0, bound_attention=False), 3)
    assert fixed_seen == {(18, 256)}  # one shape: the frames of one compilation per region
    frames, seen = compiled_frames(PackedLoader(tmp_path, 256, 16, prefetch=0, loss_bucket="auto"), 40)
    assert len(seen) >= 6  # many distinct bounds arrived...
    assert frames <= MAX_COMPILATIONS_PER_REGION * fixed, (frames, fixed, sorted(seen))  # ...and did not multiply
    print(f"compiled frames: {frames} over {len(seen)} distinct bounds (fixed shapes: {fixed})")


MAX_COMPILATIONS_PER_REGION = 3
