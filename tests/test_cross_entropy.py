"""Tests for `fastsft.ops.cross_entropy` (loss on logits): the Triton kernel under the interpreter and the reference,
against an independent float64 computation (F.cross_entropy in float64, autograd for the gradients).

Tolerances: the kernel does fp32 arithmetic on exactly the input values, so losses match float64 to 1e-5 relative for
every input dtype; gradients are stored in the logits' dtype, so bf16 gradients are compared elementwise within one
bf16 rounding (2^-8 relative, RTNE gives 2^-9) and fp32 gradients within 1e-5 of the largest entry.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import reduce_and_backward
from torch.profiler import profile

from fastsft.ops import CrossEntropyLoss, cross_entropy, cross_entropy_reference

IGNORE = -100
N, V = 48, 1001  # V odd, not a multiple of any block size


def float64_token_losses(logits, labels, label_smoothing=0.0, z_loss=0.0, softcap=None, ignore_index=IGNORE):
    """Per-token losses in float64 from torch's own cross-entropy (independent of the code under test)."""
    z = logits.double()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    losses = F.cross_entropy(z, labels, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    if z_loss:
        losses = losses + z_loss * torch.logsumexp(z, -1).square() * (labels != ignore_index)
    return losses


def float64_loss_and_grad(logits, labels, reduction, row_weights=None, num_items=None, **options):
    """(loss, d loss / d logits) in float64; for reduction "none" the backward seeds row_weights."""
    x = logits.detach().double().requires_grad_()
    losses = float64_token_losses(x, labels.reshape(-1) if x.dim() == 2 else labels, **options)
    loss = reduce_and_backward(losses, labels != IGNORE, reduction, row_weights, num_items)
    return loss, x.grad


def random_case(n=N, v=V, dtype=torch.float32, ignore_every=4):
    logits = (torch.randn(n, v) * 3).to(dtype)
    labels = torch.randint(0, v, (n,))
    labels[::ignore_every] = IGNORE
    return logits, labels


def run_op(fn, logits, labels, reduction, row_weights=None, **kwargs):
    """Loss and d logits through `fn` (the op or the reference)."""
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, labels, reduction=reduction, **kwargs)
    (loss * row_weights if reduction == "none" else loss).sum().backward()
    return loss.detach(), x.grad


def assert_loss_close(loss, ref, rtol=1e-5):
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss.double(), ref, rtol=rtol, atol=rtol * ref.abs().max().item() + 1e-12)


def assert_grad_close(grad, ref, dtype):
    assert grad.dtype == dtype
    assert torch.isfinite(grad).all()
    err = (grad.double() - ref).abs()
    if dtype == torch.float32:
        assert err.max() <= 1e-5 * ref.abs().max() + 1e-12, err.max()
    else:
        assert (err <= 2**-8 * ref.abs() + 1e-6 * ref.abs().max()).all(), (err / ref.abs().clamp(min=1e-12)).max()


OPTIONS = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-3},
    "softcap": {"softcap": 5.0},
    "all": {"label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 8.0},
}


@pytest.mark.parametrize("options", list(OPTIONS))
def test_kernel_options_match_float64(triton_interpret, options):
    logits, labels = random_case()
    loss, grad = run_op(cross_entropy, logits, labels, "mean", **OPTIONS[options])
    ref_loss, ref_grad = float64_loss_and_grad(logits, labels, "mean", **OPTIONS[options])
    assert_loss_close(loss, ref_loss)
    assert_grad_close(grad, ref_grad, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_kernel_dtypes_and_reductions_match_float64(triton_interpret, dtype, reduction):
    logits, labels = random_case(dtype=dtype)
    row_weights = torch.rand(N) + 0.5  # distinct upstream gradients per row exercise the per-row backward scale
    options = OPTIONS["all"] if dtype == torch.bfloat16 else {}
    loss, grad = run_op(cross_entropy, logits, labels, reduction, row_weights, **options)
    ref_loss, ref_grad = float64_loss_and_grad(logits, labels, reduction, row_weights, **options)
    assert_loss_close(loss, ref_loss)
    assert_grad_close(grad, ref_grad, dtype)
    if reduction == "none":
        assert (loss[labels == IGNORE] == 0).all()


@pytest.mark.parametrize("v", [1001, 1024])
def test_multi_block_rows(triton_interpret, monkeypatch, v):
    """Rows longer than one block: the online logsumexp across unmasked full blocks, then a masked partial last
    block (1001 = 3 x 256 + 233) or none (1024 = 4 x 256)."""
    from fastsft.kernels import cross_entropy as kernels

    monkeypatch.setattr(kernels, "MAX_BLOCK", 256)
    logits, labels = random_case(n=16, v=v, dtype=torch.bfloat16)
    logits[3, 900] = 40.0  # the row maximum in the last block
    labels[5] = v - 1
    options = OPTIONS["all"]
    loss, grad = run_op(cross_entropy, logits, labels, "sum", **options)
    ref_loss, ref_grad = float64_loss_and_grad(logits, labels, "sum", **options)
    assert_loss_close(loss, ref_loss)
    assert_grad_close(grad, ref_grad, torch.bfloat16)


def test_ignored_rows_and_all_ignored_batch(triton_interpret):
    logits, labels = random_case(n=12)
    labels[4:8] = IGNORE
    loss, grad = run_op(cross_entropy, logits, labels, "none", torch.rand(12) + 0.5)
    assert (loss[4:8] == 0).all() and (grad[4:8] == 0).all()
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()

    labels[:] = IGNORE
    for reduction in ("mean", "sum"):
        loss, grad = run_op(cross_entropy, logits, labels, reduction, z_loss=1e-3)
        assert loss.item() == 0.0
        assert (grad == 0).all()


def test_single_row_and_label_at_both_ends(triton_interpret):
    for label in (0, V - 1):
        logits = torch.randn(1, V)
        labels = torch.tensor([label])
        loss, grad = run_op(cross_entropy, logits, labels, "mean", label_smoothing=0.1)
        ref_loss, ref_grad = float64_loss_and_grad(logits, labels, "mean", label_smoothing=0.1)
        assert_loss_close(loss, ref_loss)
        assert_grad_close(grad, ref_grad, torch.float32)


def test_non_contiguous_inputs(triton_interpret):
    # Rows with a stride larger than V (a slice of a wider buffer: no copy), labels with stride 2, and a column-strided
    # view (copied to unit stride), all against the same float64 result.
    wide = torch.randn(N, V + 7) * 3
    labels_wide = torch.randint(0, V, (2 * N,))
    labels_wide[::8] = IGNORE
    logits, labels = wide[:, :V], labels_wide[::2]
    assert not logits.is_contiguous() and not labels.is_contiguous()
    ref_loss, ref_grad = float64_loss_and_grad(logits, labels, "mean")
    loss, grad = run_op(cross_entropy, logits, labels, "mean")
    assert_loss_close(loss, ref_loss)
    assert_grad_close(grad, ref_grad, torch.float32)

    strided = torch.randn(V, N).t()  # column stride N
    loss, grad = run_op(cross_entropy, strided, labels, "sum")
    ref_loss, ref_grad = float64_loss_and_grad(strided, labels, "sum")
    assert_loss_close(loss, ref_loss)
    assert_grad_close(grad, ref_grad, torch.float32)


def test_batched_shape(triton_interpret):
    logits = torch.randn(3, 8, 257)
    labels = torch.randint(0, 257, (3, 8), dtype=torch.int32)  # int32 labels work as well as int64
    labels[:, :3] = IGNORE
    loss, grad = run_op(cross_entropy, logits, labels, "mean")
    ref_loss, ref_grad = float64_loss_and_grad(logits.reshape(-1, 257), labels.reshape(-1).long(), "mean")
    torch.testing.assert_close(cross_entropy_reference(logits, labels).double(), ref_loss, rtol=1e-5, atol=0)
    assert_loss_close(loss, ref_loss)
    assert grad.shape == logits.shape
    assert_grad_close(grad.reshape(-1, 257), ref_grad, torch.float32)


def test_inplace_backward_writes_gradient_into_logits(triton_interpret):
    hidden = torch.randn(N, 16, requires_grad=True)
    proj = torch.randn(16, V)
    labels = random_case()[1]

    logits = hidden @ proj  # a non-leaf: its buffer is the one overwritten
    cross_entropy(logits, labels, z_loss=1e-3, inplace_backward=True).backward()
    grad_inplace = hidden.grad.clone()
    overwritten = logits.detach().clone()
    hidden.grad = None

    logits_ref = (hidden @ proj).detach().requires_grad_()
    cross_entropy(logits_ref, labels, z_loss=1e-3).backward()
    ref_hidden_grad = logits_ref.grad @ proj.t()
    torch.testing.assert_close(overwritten, logits_ref.grad, rtol=0, atol=0)  # the buffer now holds d logits
    torch.testing.assert_close(grad_inplace, ref_hidden_grad, rtol=1e-5, atol=1e-6)


def test_num_items_two_micro_batches_equal_one_batch(triton_interpret):
    logits, labels = random_case(n=32)
    total = (labels != IGNORE).sum()  # a 0-d tensor, as the trainer passes it
    big_loss, big_grad = run_op(cross_entropy, logits, labels, "mean", label_smoothing=0.1)
    x = logits.clone().requires_grad_()
    loss = sum(cross_entropy(x[s], labels[s], label_smoothing=0.1, num_items=total)
               for s in (slice(0, 20), slice(20, 32)))
    loss.backward()
    torch.testing.assert_close(loss, big_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(x.grad, big_grad, rtol=1e-6, atol=1e-9)
    ref_loss, _ = float64_loss_and_grad(logits, labels, "mean", num_items=total.item(), label_smoothing=0.1)
    assert_loss_close(loss, ref_loss)


def test_module_form(triton_interpret):
    logits, labels = random_case(n=8, v=97)
    module = CrossEntropyLoss(reduction="sum", label_smoothing=0.1, softcap=4.0)
    torch.testing.assert_close(
        module(logits, labels).double(),
        float64_token_losses(logits, labels, label_smoothing=0.1, softcap=4.0).sum(),
        rtol=1e-5, atol=0,
    )


def test_label_out_of_range_gives_nan_not_a_crash(triton_interpret):
    logits, labels = random_case(n=4, v=50)
    labels[1] = 50
    loss = cross_entropy(logits, labels, reduction="none")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2, 3]]).all()


@pytest.mark.parametrize("options", ["plain", "all"])
def test_reference_matches_float64(options):
    logits, labels = random_case(dtype=torch.bfloat16)
    row_weights = torch.rand(N) + 0.5
    for reduction in ("mean", "none"):
        loss, grad = run_op(cross_entropy_reference, logits, labels, reduction, row_weights, **OPTIONS[options])
        ref_loss, ref_grad = float64_loss_and_grad(logits, labels, reduction, row_weights, **OPTIONS[options])
        assert_loss_close(loss, ref_loss)
        assert_grad_close(grad, ref_grad, torch.bfloat16)


def test_cpu_without_backend_override_runs_the_reference(monkeypatch):
    monkeypatch.delenv("FASTSFT_BACKEND", raising=False)
    logits, labels = random_case(n=6, v=33)
    with profile() as prof:
        cross_entropy(logits, labels)
    assert not [e.key for e in prof.key_averages() if e.key.startswith("fastsft::")]


def test_opcheck(triton_interpret):
    from fastsft.ops.cross_entropy import _cross_entropy_bwd, _cross_entropy_bwd_inplace, _cross_entropy_fwd

    logits = torch.randn(6, 37, requires_grad=True)
    labels = torch.tensor([3, IGNORE, 0, 36, 5, 7])
    torch.library.opcheck(_cross_entropy_fwd, (logits, labels, IGNORE, 0.1, 1e-3, 6.0, False))
    lse = torch.logsumexp(logits.detach(), -1)
    grad_losses = torch.rand(6)
    torch.library.opcheck(_cross_entropy_bwd, (grad_losses, logits.detach(), labels, lse, IGNORE, 0.1, 1e-3, 6.0))
    torch.library.opcheck(
        _cross_entropy_bwd_inplace, (grad_losses, logits.detach().clone(), labels, lse, IGNORE, 0.0, 0.0, 0.0)
    )


@pytest.mark.parametrize("inplace_backward", [False, True])
def test_compiles_fullgraph(triton_interpret, inplace_backward):
    """embedding -> linear -> cross_entropy traced whole (aot_eager: the AOT autograd graphs, no C++ build)."""
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Embedding(64, 16), torch.nn.Linear(16, 97))
    tokens = torch.randint(0, 64, (24,))
    labels = torch.randint(0, 97, (24,))
    labels[::3] = IGNORE

    def step(tokens, labels, num_items):
        logits = model(tokens)
        return cross_entropy(logits, labels, num_items=num_items, inplace_backward=inplace_backward, z_loss=1e-3)

    num_items = (labels != IGNORE).sum()
    eager = step(tokens, labels, num_items)
    eager.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with profile() as prof:
        loss = compiled(tokens, labels, num_items)
        loss.backward()
    ops = {e.key for e in prof.key_averages()}
    assert "fastsft::cross_entropy_fwd" in ops
    assert ("fastsft::cross_entropy_bwd_inplace" if inplace_backward else "fastsft::cross_entropy_bwd") in ops
    torch.testing.assert_close(loss, eager, rtol=1e-6, atol=0)
    for p, g in zip(model.parameters(), eager_grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


def test_bad_inputs_name_the_problem():
    logits, labels = random_case(n=4, v=10)
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(logits, labels, reduction="avg")
    with pytest.raises(ValueError, match="labels has 3 entries"):
        cross_entropy(logits, labels[:3])
    with pytest.raises(ValueError, match="integer"):
        cross_entropy(logits, labels.float())
    with pytest.raises(ValueError, match="softcap"):
        cross_entropy(logits, labels, softcap=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy(logits, labels, label_smoothing=1.5)
    with pytest.raises(ValueError, match="num_items"):
        cross_entropy(logits, labels, num_items=torch.ones(2))


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [32000, 50257, 128256, 151936, 262144])
def test_gpu_realistic_vocab_sizes(vocab):
    n = 8192 if vocab <= 128256 else 2048
    logits = (torch.randn(n, vocab, device="cuda") * 4).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (n,), device="cuda")
    labels[: n // 2] = IGNORE  # half the tokens are prompt
    for inplace in (False, True):
        x = logits.clone().requires_grad_()
        z = x * 1  # a non-leaf buffer for the in-place gradient
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any device-to-host sync inside the op raises
        try:
            loss = cross_entropy(z, labels, z_loss=1e-4, inplace_backward=inplace)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        ref = logits.float().requires_grad_()
        ref_loss = F.cross_entropy(ref, labels, ignore_index=IGNORE, reduction="sum")
        ref_loss = (ref_loss + 1e-4 * (torch.logsumexp(ref, -1).square() * (labels != IGNORE)).sum())
        ref_loss = ref_loss / (labels != IGNORE).sum()
        ref_loss.backward()
        torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=0)
        err = (x.grad.float() - ref.grad).abs()
        assert (err <= 2**-8 * ref.grad.abs() + 1e-6 * ref.grad.abs().max()).all()


@pytest.mark.parametrize("v", [1001, 1024])
def test_fused_sweeps_read_each_logit_once_per_sweep(triton_interpret, monkeypatch, v):
    """Loss and gradient in one launch, the gradient written over the logits (what the fused linear cross-entropy
    does): every logit of a supervised row is read exactly twice, once per sweep, and ignored rows not at all.

    A third read of the label's logit after sweep 1 is a race on a GPU: the gradient sweep of other warps may already
    have overwritten it, giving a wrong loss for that row. The interpreter runs one thread, so the race cannot show
    here; the read count can. The loss is checked against float64 too, with the label in the first and last block."""
    import numpy as np
    from triton.runtime import interpreter

    from fastsft.kernels import cross_entropy as kernels

    monkeypatch.setattr(kernels, "MAX_BLOCK", 256)  # 4 blocks: 3 unmasked + a masked tail (1001), or all masked (1024)
    logits, labels = random_case(n=6, v=v)
    labels[1], labels[2], labels[3] = 0, v - 1, 777
    ref_losses = float64_token_losses(logits, labels, z_loss=1e-3)
    buffer = logits.clone()
    base, itemsize = buffer.data_ptr(), buffer.element_size()
    reads = np.zeros(buffer.numel(), dtype=np.int64)
    real_load = interpreter.InterpreterBuilder.create_masked_load

    def counting_load(self, ptrs, mask, other, cache_policy, is_volatile):
        addresses = np.asarray(ptrs.data).astype(np.int64)[np.broadcast_to(mask.data, ptrs.data.shape)]
        inside = (addresses >= base) & (addresses < base + buffer.numel() * itemsize)
        np.add.at(reads, (addresses[inside] - base) // itemsize, 1)
        return real_load(self, ptrs, mask, other, cache_policy, is_volatile)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", counting_load)
    losses, lse = torch.empty(6), torch.empty(6)
    hits = torch.empty(6, dtype=torch.int32)
    kernels.cross_entropy_rows(buffer, labels, IGNORE, 0.0, 1e-3, 0.0, loss=losses, lse=lse, hit=hits, grad=buffer)
    reads = torch.from_numpy(reads).view(6, v)
    supervised = labels != IGNORE
    assert (reads[supervised] == 2).all(), reads[supervised].unique()
    assert (reads[~supervised] == 0).all()
    torch.testing.assert_close(losses.double(), ref_losses, rtol=1e-5, atol=1e-6)
