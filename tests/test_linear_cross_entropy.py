"""Tests for `fastsft.ops.linear_cross_entropy` (lm_head matmul fused with the loss, in chunks): the Triton path under
the interpreter and the reference, against an independent float64 computation (materialized float64 logits,
F.cross_entropy, autograd for d hidden, d weight, d bias).

Every Triton test forces several chunks (FASTSFT_LCE_CHUNK_MB) with a partial last one, so chunk boundaries, the
reused logits buffer and the fp32 d weight accumulator are always exercised.

Tolerances: fp32 inputs match float64 to 1e-5 (losses relative; gradients relative to their largest entry). With bf16
inputs the logits come out of a bf16 matmul, rounded once to bf16 (relative error 2^-9 of each logit), and d logits
is stored in bf16 before the gradient matmuls, whose outputs are rounded again: losses are then checked against the
bound 2 * 2^-9 * max|logit| per token, gradients within 2^-6 of their largest entry (a few bf16 roundings).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import reduce_and_backward
from torch.profiler import profile

from fastsft.ops import LinearCrossEntropyLoss, linear_cross_entropy, linear_cross_entropy_reference

IGNORE = -100
N, H, V = 40, 32, 301  # V odd; the forced chunk of 16 rows leaves a partial last chunk of 8


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 16 rows for the vocabulary sizes used here (fp32 rows; bf16 rows get 32)."""
    from fastsft.kernels.linear_cross_entropy import padded_row_stride

    monkeypatch.setenv("FASTSFT_LCE_CHUNK_MB", str(16 * padded_row_stride(V) * 4 / 2**20))


def float64_reference(hidden, weight, labels, bias=None, reduction="mean", row_weights=None, num_items=None,
                      label_smoothing=0.0, z_loss=0.0, softcap=None):
    """(loss, num_correct, d hidden, d weight, d bias) from float64 logits and torch's own cross-entropy."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    b = bias.detach().double().requires_grad_() if bias is not None else None
    logits = h.reshape(-1, h.shape[-1]) @ w.t()
    if b is not None:
        logits = logits + b
    z = softcap * torch.tanh(logits / softcap) if softcap else logits
    y = labels.reshape(-1)
    losses = F.cross_entropy(z, y, ignore_index=IGNORE, reduction="none", label_smoothing=label_smoothing)
    if z_loss:
        losses = losses + z_loss * torch.logsumexp(z, -1).square() * (y != IGNORE)
    loss = reduce_and_backward(losses, y != IGNORE, reduction, row_weights, num_items)
    num_correct = ((logits.argmax(-1) == y) & (y != IGNORE)).sum()
    return loss, num_correct, h.grad, w.grad, None if b is None else b.grad, logits.detach()


def random_case(n=N, dtype=torch.float32, bias=True, ignore_every=3):
    hidden = torch.randn(n, H).to(dtype)
    weight = (torch.randn(V, H) / H**0.5 * 3).to(dtype)
    b = (torch.randn(V) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, V, (n,))
    labels[::ignore_every] = IGNORE
    return hidden, weight, b, labels


def run_op(fn, hidden, weight, labels, bias=None, reduction="mean", row_weights=None, **kwargs):
    """(loss, num_correct, d hidden, d weight, d bias) through `fn` (the op or the reference)."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    b = bias.detach().clone().requires_grad_() if bias is not None else None
    loss, num_correct = fn(h, w, labels, b, reduction=reduction, return_num_correct=True, **kwargs)
    (loss * row_weights if reduction == "none" else loss).sum().backward()
    return loss, num_correct, h.grad, w.grad, None if b is None else b.grad


def assert_grads_close(got, ref, dtype):
    tol = 1e-5 if dtype == torch.float32 else 2**-6
    for name, g, r in zip(("hidden", "weight", "bias"), got, ref, strict=True):
        if r is None:
            assert g is None, name
            continue
        assert g.dtype == dtype, name
        assert torch.isfinite(g).all(), name
        err = (g.double() - r).abs().max()
        assert err <= tol * r.abs().max() + 1e-12, f"d {name}: max error {err:.3g}, largest entry {r.abs().max():.3g}"


def assert_matches_float64(got, ref, dtype, reduction):
    loss, num_correct, *grads = got
    ref_loss, ref_correct, *ref_grads, ref_logits = ref
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    if dtype == torch.float32:
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5 * ref_loss.abs().max().item())
        assert num_correct.item() == ref_correct.item()
    else:
        # Each logit is rounded to 16 bits once: a token's loss moves by at most twice the largest rounding (a mean
        # by no more than that, a sum by that times the number of tokens). Near-ties may flip the argmax here.
        bound = 2 * 2**-9 * ref_logits.abs().max().item()
        n_tokens = ref_logits.shape[0] if reduction == "sum" else 1
        assert (loss.double() - ref_loss).abs().max() <= bound * n_tokens
    assert num_correct.dtype == torch.int64 and num_correct.dim() == 0
    assert_grads_close(grads, ref_grads, dtype)


OPTIONS = {
    "plain": {},
    "all": {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 6.0},
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", list(OPTIONS))
def test_fp32_matches_float64(triton_interpret, small_chunks, monkeypatch, reduction, options):
    from fastsft.kernels import linear_cross_entropy as chunked

    chunk_rows, strides = [], set()  # every logits block the kernel sees: never all N rows at once
    kernel = chunked.cross_entropy_rows
    monkeypatch.setattr(chunked, "cross_entropy_rows", lambda logits, *a, **k: (
        chunk_rows.append(logits.shape[0]), strides.add(logits.stride()), kernel(logits, *a, **k)))
    hidden, weight, bias, labels = random_case()
    row_weights = torch.rand(N) + 0.5
    got = run_op(linear_cross_entropy, hidden, weight, labels, bias, reduction, row_weights, **OPTIONS[options])
    assert max(chunk_rows) == 16 and sum(chunk_rows) == N * (2 if reduction == "none" else 1)
    assert strides == {(304, 1)}  # the odd vocabulary's rows padded to a multiple of 16 elements (301 -> 304)
    ref = float64_reference(hidden, weight, labels, bias, reduction, row_weights, **OPTIONS[options])
    assert_matches_float64(got, ref, torch.float32, reduction)
    if reduction == "none":
        assert got[0].shape == (N,) and (got[0][labels == IGNORE] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_matches_float64(triton_interpret, small_chunks, dtype):
    hidden, weight, bias, labels = random_case(n=80, dtype=dtype)  # 3 chunks of 32 16-bit rows (last one partial)
    got = run_op(linear_cross_entropy, hidden, weight, labels, bias, "mean", **OPTIONS["all"])
    ref = float64_reference(hidden, weight, labels, bias, "mean", **OPTIONS["all"])
    assert_matches_float64(got, ref, dtype, "mean")


def test_loss_positions_with_filler(triton_interpret, small_chunks):
    hidden, weight, bias, labels = random_case(bias=False)
    supervised = (labels != IGNORE).nonzero().squeeze(1).to(torch.int32)
    bucket = torch.full((supervised.numel() + 5,), -1, dtype=torch.int32)  # the loader's filler is -1
    bucket[: supervised.numel()] = supervised
    ref = float64_reference(hidden, weight, labels, None, "sum")
    got = run_op(linear_cross_entropy, hidden, weight, labels, None, "sum", loss_positions=bucket)
    assert_matches_float64(got, ref, torch.float32, "sum")
    assert (got[2][labels == IGNORE] == 0).all()  # d hidden lands only on the supervised positions

    row_weights = torch.rand(bucket.numel()) + 0.5
    loss, num_correct, dh, dw, _ = run_op(linear_cross_entropy, hidden, weight, labels, None, "none", row_weights,
                                          loss_positions=bucket)
    assert loss.shape == bucket.shape and (loss[-5:] == 0).all()  # one loss per bucket entry, 0 on filler
    ref_tokens = torch.zeros(N, dtype=torch.float64)
    ref_tokens[supervised.long()] = row_weights[: supervised.numel()].double()
    _, ref_correct, ref_dh, ref_dw, _, _ = float64_reference(hidden, weight, labels, None, "none", ref_tokens)
    ref_losses = F.cross_entropy(hidden.double() @ weight.double().t(), labels, ignore_index=IGNORE, reduction="none")
    torch.testing.assert_close(loss[: supervised.numel()].double(), ref_losses[supervised.long()], rtol=1e-5, atol=0)
    assert num_correct.item() == ref_correct.item()
    assert_grads_close((dh, dw, None), (ref_dh, ref_dw, None), torch.float32)


def test_partial_bucket_positions_subset(triton_interpret, small_chunks):
    """loss_positions naming only some supervised positions: exactly those tokens count."""
    hidden, weight, bias, labels = random_case()
    supervised = (labels != IGNORE).nonzero().squeeze(1)
    chosen = supervised[::2]
    positions = torch.cat([chosen, torch.full((3,), -1)]).to(torch.int32)
    only_chosen = torch.full_like(labels, IGNORE)
    only_chosen[chosen] = labels[chosen]
    ref = float64_reference(hidden, weight, only_chosen, bias, "mean")
    got = run_op(linear_cross_entropy, hidden, weight, labels, bias, "mean", loss_positions=positions)
    assert_matches_float64(got, ref, torch.float32, "mean")


def test_num_correct_first_maximum_across_blocks_and_chunks(triton_interpret, small_chunks, monkeypatch):
    """Ties broken like torch.argmax (first maximum), with the tied columns in different kernel blocks."""
    from fastsft.kernels import cross_entropy as kernels

    monkeypatch.setattr(kernels, "MAX_BLOCK", 64)  # 301 columns = 4 full blocks + a partial one
    hidden, weight, bias, labels = random_case(bias=False, ignore_every=5)
    direction = torch.ones(H) / H**0.5
    weight[250] = weight[10] = 5 * direction  # identical columns 10 and 250 tie ...
    hidden[:20] += 5 * direction  # ... and win by a wide margin for the first 20 rows
    labels[:20:2] = 250  # the later copy of the maximum: torch.argmax says column 10, so not correct
    labels[1:20:2] = 10  # the first copy: correct
    labels[::5] = IGNORE
    logits = hidden @ weight.t()  # what the op's chunk matmul computes: the tie is exact there too
    assert (logits[:20].argmax(-1) == 10).all() and (logits[:20, 10] == logits[:20, 250]).all()
    expected = ((logits.argmax(-1) == labels) & (labels != IGNORE)).sum().item()
    _, num_correct = linear_cross_entropy(hidden, weight, labels, return_num_correct=True)
    assert num_correct.item() == expected >= 8
    _, ref_correct = linear_cross_entropy_reference(hidden, weight, labels, return_num_correct=True)
    assert ref_correct.item() == expected


def test_all_ignored_batch_and_single_token(triton_interpret, small_chunks):
    hidden, weight, bias, labels = random_case(n=20)
    labels[:] = IGNORE
    for reduction in ("mean", "sum"):
        loss, num_correct, dh, dw, db = run_op(linear_cross_entropy, hidden, weight, labels, bias, reduction,
                                               z_loss=1e-3)
        assert loss.item() == 0.0 and num_correct.item() == 0
        assert (dh == 0).all() and (dw == 0).all() and (db == 0).all()

    hidden, weight, bias, labels = random_case(n=1, ignore_every=2)
    labels[0] = 7
    got = run_op(linear_cross_entropy, hidden, weight, labels, bias, "mean")
    assert_matches_float64(got, float64_reference(hidden, weight, labels, bias, "mean"), torch.float32, "mean")


def test_non_contiguous_and_batched_inputs(triton_interpret, small_chunks):
    base = torch.randn(H, 2, 4, 10)
    hidden = base[:, 0].permute(1, 2, 0)  # [4, 10, H], not contiguous
    weight = (torch.randn(H, V) / H**0.5 * 3).t()  # [V, H] transposed view
    labels = torch.randint(0, V, (4, 20))[:, ::2]  # [4, 10], stride 2
    labels[:, :4] = IGNORE
    assert not hidden.is_contiguous() and not weight.is_contiguous() and not labels.is_contiguous()
    got = run_op(linear_cross_entropy, hidden, weight, labels, None, "mean", softcap=5.0)
    ref = float64_reference(hidden, weight, labels, None, "mean", softcap=5.0)
    assert got[2].shape == hidden.shape
    assert_matches_float64(got, ref, torch.float32, "mean")


def test_num_items_two_micro_batches_equal_one_batch(triton_interpret, small_chunks):
    hidden, weight, bias, labels = random_case(n=48)
    total = (labels != IGNORE).sum()
    big = run_op(linear_cross_entropy, hidden, weight, labels, bias, "mean", label_smoothing=0.1)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    b = bias.clone().requires_grad_()
    loss = sum(linear_cross_entropy(h[s], w, labels[s], b, label_smoothing=0.1, num_items=total)
               for s in (slice(0, 30), slice(30, 48)))
    loss.backward()
    torch.testing.assert_close(loss, big[0], rtol=1e-6, atol=0)
    for g, ref in zip((h.grad, w.grad, b.grad), big[2:], strict=True):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7)


def test_mixed_dtypes_frozen_head_and_no_grad(triton_interpret, small_chunks):
    """fp32 master weights with bf16 hidden (cast like autocast); a frozen lm_head gets no gradient; no_grad works."""
    hidden, weight, bias, labels = random_case(dtype=torch.float32)
    h16 = hidden.to(torch.bfloat16).requires_grad_()
    w = weight.clone().requires_grad_()
    linear_cross_entropy(h16, w, labels).backward()
    assert w.grad.dtype == torch.float32 and h16.grad.dtype == torch.bfloat16
    ref = float64_reference(h16, w.detach().to(torch.bfloat16), labels)
    assert (w.grad.double() - ref[3]).abs().max() <= 2**-6 * ref[3].abs().max()

    h = hidden.clone().requires_grad_()
    linear_cross_entropy(h, weight, labels, bias).backward()  # weight and bias do not require grad
    ref = float64_reference(hidden, weight, labels, bias)
    assert (h.grad.double() - ref[2]).abs().max() <= 1e-5 * ref[2].abs().max()

    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, labels, bias)
    torch.testing.assert_close(loss.double(), ref[0], rtol=1e-5, atol=0)


def test_module_form(triton_interpret):
    hidden, weight, bias, labels = random_case(n=8)
    module = LinearCrossEntropyLoss(reduction="sum", z_loss=1e-3)
    ref = float64_reference(hidden, weight, labels, bias, "sum", z_loss=1e-3)
    torch.testing.assert_close(module(hidden, weight, labels, bias).double(), ref[0], rtol=1e-5, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_reference_matches_float64(reduction):
    hidden, weight, bias, labels = random_case()
    row_weights = torch.rand(N) + 0.5
    got = run_op(linear_cross_entropy_reference, hidden, weight, labels, bias, reduction, row_weights,
                 **OPTIONS["all"])
    ref = float64_reference(hidden, weight, labels, bias, reduction, row_weights, **OPTIONS["all"])
    assert_matches_float64(got, ref, torch.float32, reduction)


def test_chunk_plan():
    from fastsft.kernels.linear_cross_entropy import plan_chunk_rows

    # 512 MiB of bf16 rows of a 128256 vocabulary: 2093 rows, rounded down to a multiple of 128.
    assert plan_chunk_rows(8192, 128256, 2, 512 * 2**20) == 2048
    assert plan_chunk_rows(100, 128256, 2, 512 * 2**20) == 100  # never more than the rows there are
    assert plan_chunk_rows(8192, 262144, 4, 1) == 1  # at least one row whatever the budget
    assert plan_chunk_rows(8192, 1008, 4, 50 * 1008 * 4) == 50  # small chunks are not rounded
    assert plan_chunk_rows(8192, 1001, 4, 50 * 1008 * 4) == 50  # rows of an odd vocabulary take 1008 (padded)


def test_opcheck(triton_interpret, small_chunks):
    from fastsft.ops.cross_entropy import (
        _linear_cross_entropy_rows,
        _linear_cross_entropy_rows_bwd,
        _linear_cross_entropy_sum,
    )

    hidden = torch.randn(20, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    bias = torch.randn(V, requires_grad=True)
    labels = torch.randint(0, V, (20,))
    labels[::4] = IGNORE
    options = (IGNORE, 0.1, 1e-3, 6.0)
    torch.library.opcheck(_linear_cross_entropy_sum, (hidden, weight, labels, bias, *options, True, True, True))
    torch.library.opcheck(_linear_cross_entropy_sum, (hidden, weight, labels, None, *options, True, False, False))
    torch.library.opcheck(_linear_cross_entropy_rows, (hidden, weight, labels, bias, *options))
    lse = torch.rand(20)
    torch.library.opcheck(
        _linear_cross_entropy_rows_bwd,
        (torch.rand(20), hidden.detach(), weight.detach(), labels, bias.detach(), lse, *options, True, True, True),
    )


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=V, hidden=H):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.proj = torch.nn.Linear(hidden, hidden)
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)

    def forward(self, tokens, labels, loss_positions, num_items):
        hidden = torch.tanh(self.proj(self.embed(tokens)))
        return linear_cross_entropy(hidden, self.lm_head.weight, labels, loss_positions=loss_positions,
                                    num_items=num_items, reduction="sum", return_num_correct=True)


def test_compiles_fullgraph_and_matches_eager(triton_interpret, small_chunks):
    """A tiny model -> linear_cross_entropy compiled by inductor with fullgraph=True (the custom op stays opaque),
    matching eager; a new num_items value and new positions reuse the compiled graph (no recompile)."""
    torch._dynamo.reset()
    model = TinyLM()
    compiled = torch.compile(model, fullgraph=True)

    def batch():
        tokens = torch.randint(0, V, (40,))
        labels = torch.randint(0, V, (40,))
        labels[torch.rand(40) < 0.4] = IGNORE
        supervised = (labels != IGNORE).nonzero().squeeze(1).to(torch.int32)
        positions = torch.full((32,), -1, dtype=torch.int32)
        positions[: supervised.numel()] = supervised[:32]
        return tokens, labels, positions, (labels != IGNORE).sum() + 3

    for i in range(2):
        args = batch()
        loss, correct = model(*args)
        (loss / args[3]).backward()
        eager_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        with torch._dynamo.config.patch(error_on_recompile=i > 0), profile() as prof:
            c_loss, c_correct = compiled(*args)
        assert "fastsft::linear_cross_entropy_sum" in {e.key for e in prof.key_averages()}
        (c_loss / args[3]).backward()
        torch.testing.assert_close(c_loss, loss, rtol=1e-6, atol=0)
        assert c_correct.item() == correct.item()
        for p, g in zip(model.parameters(), eager_grads, strict=True):
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
        model.zero_grad()


def test_bad_inputs_name_the_problem():
    hidden, weight, bias, labels = random_case(n=4)
    with pytest.raises(ValueError, match=r"weight must be \[vocab, 32\]"):
        linear_cross_entropy(hidden, weight.t(), labels)
    with pytest.raises(ValueError, match="bias must be"):
        linear_cross_entropy(hidden, weight, labels, bias[:-1])
    with pytest.raises(ValueError, match="labels has 3 entries"):
        linear_cross_entropy(hidden, weight, labels[:3])
    with pytest.raises(ValueError, match="loss_positions"):
        linear_cross_entropy(hidden, weight, labels, loss_positions=torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="num_items"):
        linear_cross_entropy(hidden, weight, labels, num_items=0)


@pytest.mark.gpu
@pytest.mark.parametrize("masked", [0.0, 0.5])
def test_gpu_realistic_shape(masked):
    """N 8192, H 4096, V 128256 in bf16 with default chunks, against fp32 materialized logits (the float64 logits
    would need 8 GiB more)."""
    n, h, v = 8192, 4096, 128256
    hidden = torch.randn(n, h, device="cuda", dtype=torch.bfloat16)
    weight = (torch.randn(v, h, device="cuda") / h**0.5 * 4).to(torch.bfloat16)
    labels = torch.randint(0, v, (n,), device="cuda")
    labels[torch.rand(n, device="cuda") < masked] = IGNORE
    positions = (labels != IGNORE).nonzero().squeeze(1).to(torch.int32)
    x = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any device-to-host sync inside the op raises
    try:
        loss, correct = linear_cross_entropy(x, w, labels, loss_positions=positions, return_num_correct=True)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    xr = hidden.float().requires_grad_()
    wr = weight.float().requires_grad_()
    logits = xr @ wr.t()
    ref = F.cross_entropy(logits, labels, ignore_index=IGNORE)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=2e-3, atol=0)
    ref_correct = ((logits.argmax(-1) == labels) & (labels != IGNORE)).sum()
    assert abs(correct.item() - ref_correct.item()) <= n * 1e-3  # near-ties may flip under bf16 logits
    for g, r in ((x.grad, xr.grad), (w.grad, wr.grad)):
        assert (g.float() - r).norm() <= 2**-6 * r.norm()


class _Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the shape and dtype of every tensor an aten op returns, looking inside fastsft's custom ops too (their
    Python bodies run under this mode instead of being dispatched past it)."""

    def __init__(self, records):
        super().__init__()
        self.records = records

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._library.custom_ops import OPDEFS

        kwargs = kwargs or {}
        if func.namespace == "fastsft":
            with _Allocations(self.records):
                out = OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.records.append((func.__name__, tuple(t.shape), t.dtype, t.untyped_storage().data_ptr()))
        return out


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_vocab_by_hidden_temporary(triton_interpret, monkeypatch, reduction, weight_dtype):
    """bf16 hidden with the fp32 master lm_head weight (what the model passes under autocast): the op casts the weight
    in slices of rows for its GEMMs and accumulates straight into the fp32 gradient, so the only [V, H] tensor
    created in forward and backward is that gradient (no bf16 copy of the weight, no separate accumulator, no scaled
    copy). A bf16 weight over several chunks accumulates in its own bf16 gradient, no fp32 [V, H] buffer either.
    Gradients still match float64 within bf16 GEMM rounding."""
    from fastsft.kernels import linear_cross_entropy as chunked

    monkeypatch.setattr(chunked, "WEIGHT_SLICE_ROWS", 128)  # 301 rows: slices of 128, 128, 45
    monkeypatch.setenv("FASTSFT_LCE_CHUNK_MB", str(16 * chunked.padded_row_stride(V) * 2 / 2**20))  # 4 chunks
    hidden, weight, _, labels = random_case(n=64, bias=False)
    h = hidden.to(torch.bfloat16).requires_grad_()
    w = weight.to(weight_dtype).requires_grad_()
    records = []
    with _Allocations(records):
        loss = linear_cross_entropy(h, w, labels, reduction=reduction)
        (loss.sum() if reduction == "none" else loss).backward()
    # Tensors with a hidden-size dimension and more rows than one weight slice: the weight, its gradient, or a copy.
    big = {(name, shape, dtype, ptr) for name, shape, dtype, ptr in records
           if ptr != w.untyped_storage().data_ptr() and len(shape) == 2 and H in shape
           and shape[0] * shape[1] > chunked.WEIGHT_SLICE_ROWS * H}
    assert {ptr for *_, ptr in big} == {w.grad.untyped_storage().data_ptr()}, big
    assert w.grad.dtype == weight_dtype
    ref = float64_reference(h.detach().float(), w.detach().float(), labels, None, reduction,
                            torch.ones(64) if reduction == "none" else None)
    scale = ref[3].abs().max()
    assert (w.grad.double() - ref[3]).abs().max() <= 2**-6 * scale
    assert (h.grad.double() - ref[2]).abs().max() <= 2**-6 * ref[2].abs().max()


def test_backward_twice_is_a_clear_error(triton_interpret, small_chunks):
    """The summed loss's gradients are scaled in place when handed out, so a second backward through the same
    forward would scale them again: it raises instead of returning wrong gradients."""
    hidden, weight, _, labels = random_case(bias=False)
    loss = linear_cross_entropy(hidden.requires_grad_(), weight.requires_grad_(), labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_chunk_budget_follows_free_device_memory(monkeypatch):
    """Without FASTSFT_LCE_CHUNK_MB the logits buffer takes at most MAX_CHUNK_BYTES, and less when half of the
    device's free memory (what the driver reports plus what torch's allocator holds unused) is less."""
    from fastsft.kernels import linear_cross_entropy as chunked

    monkeypatch.delenv("FASTSFT_LCE_CHUNK_MB", raising=False)
    free = {"driver": 60 * 2**30, "reserved": 0, "allocated": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["driver"], 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: free["reserved"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: free["allocated"])
    cuda = torch.device("cuda", 0)
    assert chunked.chunk_budget_bytes(cuda) == chunked.MAX_CHUNK_BYTES
    free.update(driver=600 * 2**20, reserved=500 * 2**20, allocated=100 * 2**20)  # 600 MiB + 400 MiB cached
    assert chunked.chunk_budget_bytes(cuda) == 500 * 2**20
    assert chunked.chunk_budget_bytes(torch.device("cpu")) == chunked.MAX_CHUNK_BYTES
    # One chunk whenever every row fits; else the largest multiple of 128 rows that does.
    stride = chunked.padded_row_stride(128256) * 2
    assert chunked.plan_chunk_rows(4000, 128256, 2, chunked.MAX_CHUNK_BYTES) == 4000
    assert chunked.plan_chunk_rows(16384, 128256, 2, chunked.MAX_CHUNK_BYTES) == (2**30 // stride) // 128 * 128
