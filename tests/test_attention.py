"""fastsft.attention: every backend against independent per-document attention in float64.

The reference here is written from the definition (softmax(q k^T / sqrt(D)) v per document, causal), not from the
module's code; CPU backends (sdpa, loop) run everywhere, the CUDA ones (flash, torch_varlen) under the gpu marker.
"""

import logging
import math

import pytest
import torch

from fastsft import attention
from fastsft.attention import block_diagonal_mask, segment_ids, select_backend, varlen_attention


def reference_attention(q, k, v, doc_lengths, causal=True):
    """float64, one document at a time, GQA by explicit head mapping."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    start = 0
    for length in doc_lengths:
        end = start + length
        for h in range(q.shape[1]):
            scores = q[start:end, h] @ k[start:end, h // group].T / math.sqrt(q.shape[-1])
            if causal:
                scores = scores + torch.full((length, length), -math.inf, dtype=scores.dtype).triu(1)
            out[start:end, h] = scores.softmax(-1) @ v[start:end, h // group]
        start = end
    return out


def packed_row(doc_lengths, pad, max_docs, hq=4, hkv=2, d=16, dtype=torch.float32, device="cpu"):
    """q, k, v for documents back to back plus a padding segment, and the contract's fixed-length cu_seqlens
    (padding tail its own segment, unused entries repeating the end)."""
    total = sum(doc_lengths) + pad
    lengths = list(doc_lengths) + ([pad] if pad else [])
    ends = torch.tensor(lengths).cumsum(0).tolist()
    cu = [0] + ends + [total] * (max_docs + 1 - len(lengths))
    cu_seqlens = torch.tensor(cu, dtype=torch.int32, device=device)
    q = torch.randn(total, hq, d, dtype=dtype, device=device)
    k = torch.randn(total, hkv, d, dtype=dtype, device=device)
    v = torch.randn(total, hkv, d, dtype=dtype, device=device)
    return q, k, v, cu_seqlens, lengths


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("backend", ["sdpa", "loop"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hkv", [4, 2, 1])
def test_cpu_backends_match_per_document_reference(backend, causal, hkv):
    q, k, v, cu, lengths = packed_row([7, 1, 13, 5], pad=6, max_docs=6, hkv=hkv)
    out = varlen_attention(q, k, v, cu, max_seqlen=32, causal=causal, backend=backend)
    ref = reference_attention(q, k, v, lengths, causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("backend", ["sdpa", "loop"])
def test_gradients_match_reference(backend):
    q, k, v, cu, lengths = packed_row([9, 4, 11], pad=0, max_docs=4, hkv=2)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    grad_out = torch.randn_like(q)
    (varlen_attention(q, k, v, cu, 24, backend=backend) * grad_out).sum().backward()
    got = [t.grad.clone() for t in (q, k, v)]
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    (reference_attention(q64, k64, v64, lengths) * grad_out.double()).sum().backward()
    for mine, ref in zip(got, (q64.grad, k64.grad, v64.grad), strict=True):
        assert rel_err(mine, ref) < 1e-5


def test_no_leakage_across_documents():
    """Changing one document's keys/values leaves every other document's output bit-for-bit unchanged."""
    q, k, v, cu, _ = packed_row([6, 8, 5], pad=3, max_docs=4)
    before = varlen_attention(q, k, v, cu, 22, backend="sdpa")
    k2, v2 = k.clone(), v.clone()
    k2[6:14] = torch.randn_like(k2[6:14])
    v2[6:14] = torch.randn_like(v2[6:14])
    after = varlen_attention(q, k2, v2, cu, 22, backend="sdpa")
    assert torch.equal(before[:6], after[:6]) and torch.equal(before[14:], after[14:])
    assert not torch.allclose(before[6:14], after[6:14])


def test_segment_ids_and_mask_with_empty_segments():
    cu = torch.tensor([0, 3, 3, 5, 8, 8, 8], dtype=torch.int32)  # an empty document, then repeated tail
    assert segment_ids(cu, 8).tolist() == [0, 0, 0, 2, 2, 3, 3, 3]
    mask = block_diagonal_mask(cu, 8)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    for start, end in [(0, 3), (3, 5), (5, 8)]:
        expected[start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool).tril()
    assert torch.equal(mask, expected)


def test_single_token_documents():
    q, k, v, cu, lengths = packed_row([1, 1, 1, 2], pad=1, max_docs=5, hkv=1)
    for backend in ("sdpa", "loop"):
        out = varlen_attention(q, k, v, cu, 6, backend=backend)
        assert rel_err(out, reference_attention(q, k, v, lengths)) < 1e-5
    # A one-token document attends only to itself: its output is its own value row (each query head's kv head).
    assert torch.allclose(out[0], v[0].expand(4, -1), atol=1e-6)


def test_backend_selection(monkeypatch, caplog):
    monkeypatch.delenv(attention.ENV_VAR, raising=False)
    assert select_backend("cpu") == "sdpa"
    monkeypatch.setenv(attention.ENV_VAR, "loop")
    assert select_backend("cpu") == "loop"
    assert select_backend("cpu", "sdpa") == "sdpa"  # the argument wins over the environment
    monkeypatch.setenv(attention.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="FASTSFT_ATTENTION.*not one of"):
        select_backend("cpu")
    with pytest.raises(ValueError, match="not usable on cpu"):
        select_backend("cpu", "flash")
    assert "flash" not in attention.available_backends("cuda", torch.float32)  # FlashAttention: fp16/bf16 only
    assert "torch_varlen" not in attention.available_backends("cuda", torch.float32)


def test_choice_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(attention, "_logged_choices", set())
    q, k, v, cu, _ = packed_row([5, 3], pad=0, max_docs=2)
    with caplog.at_level(logging.INFO, logger="fastsft.attention"):
        for _ in range(3):
            varlen_attention(q, k, v, cu, 8, backend="loop")
    assert [r.getMessage() for r in caplog.records].count("fastsft attention on cpu: loop backend") == 1


def test_shape_errors():
    q, k, v, cu, _ = packed_row([4, 4], pad=0, max_docs=2, hq=3, hkv=2)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        varlen_attention(q, k, v, cu, 8)
    with pytest.raises(ValueError, match=r"\[T, heads, D\]"):
        varlen_attention(q[None], k, v, cu, 8)


def test_compiles_without_graph_breaks():
    """fullgraph tracing through backend selection and mask construction; new cu_seqlens contents reuse the graph."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    fn = torch.compile(lambda q, k, v, cu: varlen_attention(q, k, v, cu, 16), backend=counter, fullgraph=True)
    for lengths in ([5, 6, 3], [10, 2, 2], [1, 1, 12]):
        q, k, v, cu, ref_lengths = packed_row(lengths, pad=2, max_docs=4)
        assert rel_err(fn(q, k, v, cu), reference_attention(q, k, v, ref_lengths)) < 1e-5
    assert counter.frame_count == 1


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash", "torch_varlen", "sdpa"])
@pytest.mark.parametrize("hkv", [8, 2])
def test_cuda_backends_match_reference(backend, hkv):
    if backend not in attention.available_backends("cuda"):
        pytest.skip(f"{backend} not available here")
    q, k, v, cu, lengths = packed_row([100, 1, 257, 31], pad=123, max_docs=8, hq=8, hkv=hkv, d=64,
                                      dtype=torch.bfloat16, device="cuda")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = varlen_attention(q, k, v, cu, 512, backend=backend)
    ref = reference_attention(q.detach().cpu(), k.detach().cpu(), v.detach().cpu(), lengths)
    assert rel_err(out.cpu(), ref) < 2e-2
    grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    (varlen_attention(q, k, v, cu, 512, backend="loop") * grad_out).sum().backward()
    for mine, ref_grad in zip(got, (q.grad, k.grad, v.grad), strict=True):
        assert rel_err(mine, ref_grad) < 3e-2


def test_loop_reference_refuses_to_run_compiled():
    """The loop reference syncs with the host (cu_seqlens.tolist()): it is never auto-selected and refuses a compiled
    step instead of silently breaking the graph."""
    assert "loop" not in select_backend("cpu") and "loop" not in select_backend("cuda", dtype=torch.bfloat16)
    q, k, v = (torch.randn(8, 2, 4) for _ in range(3))
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    eager = attention.loop_attention(q, k, v, cu)
    assert eager.shape == q.shape
    compiled = torch.compile(attention.loop_attention, fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="cannot run under torch.compile"):
        compiled(q, k, v, cu)
