"""Causal attention over a packed row of documents (varlen): the one place the model's attention math happens.

Sits inside every transformer block (`fastsft.model.Attention`): q [T, Hq, D], k/v [T, Hkv, D] for one packed row of
T tokens, with `cu_seqlens` (the batch contract's fixed-length document offsets, unused tail entries repeating the last
offset) saying where each document starts and ends. Tokens attend only to earlier tokens of their own document.

Backends, picked automatically in this order and overridable (the `backend` argument, else the environment variable
FASTSFT_ATTENTION=flash|torch_varlen|sdpa|loop); the choice is logged once per (device type, backend):
- "flash":        flash-attn's `flash_attn_varlen_func` (CUDA, when the package is installed). GQA natively.
- "torch_varlen": `torch.nn.attention.varlen.varlen_attn` (PyTorch 2.10+, CUDA; FlashAttention inside PyTorch).
                  GQA through its `enable_gqa` flag when the installed version has it, else kv heads are expanded.
- "sdpa":         `scaled_dot_product_attention` with a block-diagonal causal mask built on the device from
                  `cu_seqlens` (segment ids by searchsorted: no host sync, fixed shapes). O(T^2) memory for the
                  mask: the CPU path and a fallback, not the fast one.
- "loop":         a per-document loop with explicit softmax(q k^T) v in fp32. Reads `cu_seqlens` on the host:
                  a test reference only, never picked automatically.
Empty segments (repeated offsets) are harmless in every backend: they own no tokens.

Separate key offsets (`cu_seqlens_k`, `max_seqlen_k`): k/v may hold more rows than q, document i's keys lying at
cu_seqlens_k[i]:cu_seqlens_k[i+1] (prefix tuning puts a learned prefix in front of each document's own keys,
fastsft/adapters/prefix.py). Causal attention then aligns each document's queries with the END of its keys, as
FlashAttention does: query i of a document with Lq queries and Lk keys sees its keys 0 .. i + Lk - Lq. Every backend
implements this same rule.
"""

from __future__ import annotations

import inspect
import logging
import math
import os

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

BACKENDS = ("flash", "torch_varlen", "sdpa", "loop")
ENV_VAR = "FASTSFT_ATTENTION"

_logged_choices: set[tuple[str, str]] = set()


def _import_flash_attn_varlen_func():
    """flash-attn's varlen entry point, or None when the package is absent or broken."""
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:  # ImportError, or a wheel built against another torch (undefined symbol)
        return None
    return flash_attn_varlen_func


def _import_torch_varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:  # PyTorch < 2.10
        return None
    return varlen_attn


# Resolved once at import: the traced attention code then only reads module globals (dynamo-friendly).
FLASH_ATTN_VARLEN_FUNC = _import_flash_attn_varlen_func()
TORCH_VARLEN_ATTN = _import_torch_varlen_attn()
_TORCH_VARLEN_PARAMS = frozenset(inspect.signature(TORCH_VARLEN_ATTN).parameters) if TORCH_VARLEN_ATTN else frozenset()


def available_backends(device_type: str, dtype: torch.dtype | None = None) -> list[str]:
    """Backends usable on this device type (and dtype: the FlashAttention kernels take fp16/bf16 only), fastest
    first."""
    names = []
    flash_dtype = dtype is None or dtype in (torch.float16, torch.bfloat16)
    if device_type == "cuda" and flash_dtype and FLASH_ATTN_VARLEN_FUNC is not None:
        names.append("flash")
    if device_type == "cuda" and flash_dtype and TORCH_VARLEN_ATTN is not None:
        names.append("torch_varlen")
    return names + ["sdpa", "loop"]


# Run once per trace under torch.compile and baked in as a constant: dynamo cannot trace logging calls, and the
# choice depends only on the device type and the environment, never on tensor values.
@torch._dynamo.assume_constant_result
def select_backend(device_type: str, requested: str | None = None, dtype: torch.dtype | None = None) -> str:
    """The backend for `device_type` and `dtype`: `requested`, else $FASTSFT_ATTENTION, else the fastest usable."""
    source = "argument"
    if requested is None:
        requested = os.environ.get(ENV_VAR, "").strip().lower() or None
        source = f"${ENV_VAR}"
    usable = available_backends(device_type, dtype)
    if requested is None:
        choice = usable[0]
    elif requested not in BACKENDS:
        raise ValueError(f"attention backend {requested!r} (from {source}) is not one of {', '.join(BACKENDS)}")
    elif requested not in usable:
        raise ValueError(
            f"attention backend {requested!r} (from {source}) is not usable on {device_type} with {dtype}: usable "
            f"here are {', '.join(usable)} (flash needs CUDA, fp16/bf16 and `pip install flash-attn`; torch_varlen "
            f"needs CUDA, fp16/bf16 and PyTorch 2.10+)"
        )
    else:
        choice = requested
    if (device_type, choice) not in _logged_choices:
        _logged_choices.add((device_type, choice))
        logger.info("fastsft attention on %s: %s backend", device_type, choice)
    return choice


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool = True,
    backend: str | None = None,
    scale: float | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_k: int | None = None,
) -> torch.Tensor:
    """Attention within each document of a packed row. q [T, Hq, D], k/v [T, Hkv, D] (Hq a multiple of Hkv),
    cu_seqlens [N + 1] int32 with cu_seqlens[-1] == T; returns [T, Hq, D] in q's dtype. scale defaults to D^-0.5.
    With cu_seqlens_k ([N + 1], last entry Tk) k/v are [Tk, Hkv, D] with document i's keys at
    cu_seqlens_k[i]:cu_seqlens_k[i+1] (see the module docstring); max_seqlen_k bounds their lengths."""
    _check_shapes(q, k, v, cu_seqlens, cu_seqlens_k)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if cu_seqlens_k is None:
        cu_seqlens_k, max_seqlen_k = cu_seqlens, max_seqlen
    elif max_seqlen_k is None:
        raise ValueError("varlen_attention: cu_seqlens_k needs max_seqlen_k (a bound on every document's keys)")
    choice = select_backend(q.device.type, backend, q.dtype)
    if choice == "flash":
        return _flash_attention(q, k, v, cu_seqlens, max_seqlen, causal, scale, cu_seqlens_k, max_seqlen_k)
    if choice == "torch_varlen":
        return _torch_varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal, scale, cu_seqlens_k, max_seqlen_k)
    if choice == "sdpa":
        return sdpa_attention(q, k, v, cu_seqlens, causal, scale, cu_seqlens_k)
    return loop_attention(q, k, v, cu_seqlens, causal, scale, cu_seqlens_k)


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                  cu_seqlens_k: torch.Tensor | None = None) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"varlen_attention wants q, k, v as [T, heads, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    same_length = cu_seqlens_k is not None or q.shape[0] == k.shape[0]
    if k.shape != v.shape or not same_length or q.shape[2] != k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: k and v must match, and "
                         f"share T (unless cu_seqlens_k is given) and D with q")
    if cu_seqlens_k is not None and cu_seqlens_k.shape != cu_seqlens.shape:
        raise ValueError(f"cu_seqlens_k {tuple(cu_seqlens_k.shape)} must have the shape of cu_seqlens "
                         f"{tuple(cu_seqlens.shape)} (one key range per document)")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")


def expand_kv_heads(x: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """[T, Hkv, D] -> [T, Hq, D], each kv head repeated for its group of query heads (GQA as plain attention)."""
    groups = num_q_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def segment_ids(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[T] index of the segment each position lies in. Counting the document ends <= t gives it; repeated tail
    offsets (empty segments) equal T, so they never count. On the device, no host sync."""
    positions = torch.arange(num_tokens, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)


def block_diagonal_mask(cu_seqlens: torch.Tensor, num_tokens: int, causal: bool = True,
                        cu_seqlens_k: torch.Tensor | None = None, num_keys: int | None = None) -> torch.Tensor:
    """[T, Tk] bool: True where query i may attend to key j (same segment, and j <= i when causal). With separate
    key offsets, causal aligns the ends: j - cu_seqlens_k[s + 1] <= i - cu_seqlens[s + 1] in segment s."""
    seg = segment_ids(cu_seqlens, num_tokens)
    if cu_seqlens_k is None:
        mask = seg[:, None] == seg[None, :]
        if causal:
            mask = mask & torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=seg.device).tril()
        return mask
    seg_k = segment_ids(cu_seqlens_k, num_keys)
    mask = seg[:, None] == seg_k[None, :]
    if causal:
        # distance of each query / key from the end of its segment (the ends are aligned)
        query_from_end = torch.arange(num_tokens, device=seg.device) - cu_seqlens[1:][seg.clamp(max=len(cu_seqlens) - 2)]
        key_from_end = torch.arange(num_keys, device=seg.device) - cu_seqlens_k[1:][seg_k.clamp(max=len(cu_seqlens) - 2)]
        mask = mask & (key_from_end[None, :] <= query_from_end[:, None])
    return mask


def sdpa_attention(q, k, v, cu_seqlens, causal: bool = True, scale: float | None = None,
                   cu_seqlens_k: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA over the whole row with a block-diagonal (causal) mask. Every query sees at least itself (with separate
    key offsets: at least as many keys of its own document as it is far from that document's start, so a document
    with at least as many keys as queries never has an empty row), so no NaN appears."""
    num_tokens, num_heads, _ = q.shape
    mask = block_diagonal_mask(cu_seqlens, num_tokens, causal, cu_seqlens_k, k.shape[0])
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale,
        enable_gqa=k.shape[1] != num_heads,
    )
    return out.transpose(0, 1)


def loop_attention(q, k, v, cu_seqlens, causal: bool = True, scale: float | None = None,
                   cu_seqlens_k: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: each document on its own, softmax(q k^T * scale) v computed explicitly in fp32. Host sync on
    cu_seqlens (tests only)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k, v = expand_kv_heads(k, q.shape[1]), expand_kv_heads(v, q.shape[1])
    out = torch.zeros_like(q)
    # Host sync, on purpose: this is the per-document reference (tests, debugging). select_backend never picks it on
    # its own (sdpa always comes first); it runs only when asked for by name or FASTSFT_ATTENTION=loop, and it refuses
    # to run inside a compiled step, where the sync would break the graph.
    if torch.compiler.is_compiling():
        raise RuntimeError("attention backend 'loop' is the per-document reference and syncs with the host: it cannot "
                           "run under torch.compile; use sdpa (CPU) or flash / torch_varlen (CUDA)")
    offsets = cu_seqlens.tolist()
    key_offsets = offsets if cu_seqlens_k is None else cu_seqlens_k.tolist()
    for i, (start, end) in enumerate(zip(offsets[:-1], offsets[1:], strict=True)):
        if end <= start:
            continue
        key_start, key_end = key_offsets[i], key_offsets[i + 1]
        qd = q[start:end].transpose(0, 1).float()  # [H, L, D]
        kd, vd = (t[key_start:key_end].transpose(0, 1).float() for t in (k, v))  # [H, Lk, D]
        scores = qd @ kd.transpose(1, 2) * scale
        if causal:  # ends aligned: query i sees keys up to i + Lk - L
            future = torch.ones(end - start, key_end - key_start, dtype=torch.bool, device=q.device).triu(
                1 + (key_end - key_start) - (end - start))
            scores = scores.masked_fill(future, -math.inf)
        out[start:end] = (scores.softmax(-1) @ vd).transpose(0, 1).to(q.dtype)
    return out


def _flash_attention(q, k, v, cu_seqlens, max_seqlen, causal, scale, cu_seqlens_k, max_seqlen_k):
    cu, cu_k = cu_seqlens.to(torch.int32), cu_seqlens_k.to(torch.int32)
    return FLASH_ATTN_VARLEN_FUNC(q, k, v, cu, cu_k, max_seqlen, max_seqlen_k, dropout_p=0.0, softmax_scale=scale,
                                  causal=causal)


def _torch_varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal, scale, cu_seqlens_k, max_seqlen_k):
    params = _TORCH_VARLEN_PARAMS
    cu, cu_k = cu_seqlens.to(torch.int32), cu_seqlens_k.to(torch.int32)
    kwargs = {}
    if "scale" in params:
        kwargs["scale"] = scale
    elif scale != q.shape[-1] ** -0.5:
        raise ValueError("this PyTorch's varlen_attn has no scale argument; use FASTSFT_ATTENTION=sdpa or flash")
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k, v = expand_kv_heads(k, q.shape[1]), expand_kv_heads(v, q.shape[1])
    # PyTorch 2.10 took is_causal= (and no scale or GQA); 2.12+ express causality as window_size=(-1, 0).
    if "is_causal" in params:
        kwargs["is_causal"] = causal
    elif causal:
        kwargs["window_size"] = (-1, 0)
    return TORCH_VARLEN_ATTN(q, k, v, cu, cu_k, max_seqlen, max_seqlen_k, **kwargs)
