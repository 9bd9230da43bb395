"""RMSNorm and RMSNorm fused with the residual add: the public ops, their references, and the `RMSNorm` module.

Where it sits: the model calls `add_rms_norm` twice per block (before attention and before the MLP) and `rms_norm`
once at the end. `use_triton` picks per call (see `_backend`): the Triton path goes through the torch.library custom
ops below (the only way the kernels in `fastsft.kernels.rms_norm` are reached, so `torch.compile(fullgraph=True)`
traces through them); otherwise the plain-PyTorch reference runs and autograd differentiates it.

Custom ops (inputs of any leading shape; arithmetic in fp32; outputs in x's dtype, dweight in weight's dtype):
    fastsft::rms_norm_fwd(x, weight, eps, offset)               -> (y, rstd)
    fastsft::add_rms_norm_fwd(x, residual, weight, eps, offset) -> (y, x + residual, rstd)
    fastsft::rms_norm_bwd(dy, s, weight, rstd, offset, dsum)    -> (ds, dweight)
rstd is fp32, one value per row, and is all the forward saves besides its input (x, or the sum) and the weight.

The fused add normalises the sum *as stored* (x + residual rounded to the storage dtype), not the fp32 sum. That is
what the unfused Hugging Face block computes (`hidden = residual + hidden` in bf16, then LlamaRMSNorm), it costs
nothing, and the backward recomputes from exactly the tensor the forward normalised. In fp32 the two are the same.
"""

from __future__ import annotations

import torch
from torch import nn

from fastsft.ops._backend import HAS_TRITON, use_triton

if HAS_TRITON:  # a Linux-only dependency: without it every op runs its reference (see _backend)
    from fastsft.kernels import rms_norm as rms_norm_kernels

# ---------------------------------------------------------------------------------------------------------------
# References (plain PyTorch, differentiated by autograd; also the ground truth the kernels are tested against)
# ---------------------------------------------------------------------------------------------------------------


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0) -> torch.Tensor:
    """y = x * rsqrt(mean(x^2) + eps) * (offset + weight) over the last dimension, computed in fp32."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * (offset + weight.float())).to(x.dtype)


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the sum is formed in fp32, rounded to x.dtype, and that stored sum
    is what gets normalised (see the module docstring)."""
    s32 = x.float() + residual.float()
    # Value: the stored (rounded) sum. Gradient: straight into the fp32 sum, so the normalisation's gradient and
    # the sum output's gradient meet in fp32 and are rounded once, as in the kernel (autograd would otherwise add
    # them in x.dtype after rounding each).
    s = s32 + (s32.to(x.dtype).float() - s32).detach()
    return rms_norm_reference(s, weight, eps, offset).to(x.dtype), s.to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Custom ops around the Triton kernels
# ---------------------------------------------------------------------------------------------------------------


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """2-D [rows, hidden] with unit stride along hidden; a view (no copy) whenever the layout allows one."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])


def _rstd_like(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape[:-1], device=x.device, dtype=torch.float32)


@torch.library.custom_op("fastsft::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    y, rstd = torch.empty(x.shape, device=x.device, dtype=x.dtype), _rstd_like(x)
    rms_norm_kernels.rms_norm_fwd(_as_rows(x), None, weight, eps, offset, y.view(-1, x.shape[-1]), None, rstd.view(-1))
    return y, rstd


@_rms_norm_fwd.register_fake
def _(x, weight, eps, offset):
    return x.new_empty(x.shape), _rstd_like(x)


@torch.library.custom_op("fastsft::add_rms_norm_fwd", mutates_args=())
def _add_rms_norm_fwd(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, offset: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = x.shape[-1]
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    s = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    rstd = _rstd_like(x)
    rms_norm_kernels.rms_norm_fwd(
        _as_rows(x), _as_rows(residual), weight, eps, offset, y.view(-1, n), s.view(-1, n), rstd.view(-1)
    )
    return y, s, rstd


@_add_rms_norm_fwd.register_fake
def _(x, residual, weight, eps, offset):
    return x.new_empty(x.shape), x.new_empty(x.shape), _rstd_like(x)


@torch.library.custom_op("fastsft::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd(
    dy: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, offset: float,
    dsum: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    ds = torch.empty(s.shape, device=s.device, dtype=s.dtype)
    dweight = rms_norm_kernels.rms_norm_bwd(
        _as_rows(dy), _as_rows(s), weight, rstd.reshape(-1), offset,
        None if dsum is None else _as_rows(dsum), ds.view(-1, s.shape[-1]),
    )
    return ds, dweight.to(weight.dtype)


@_rms_norm_bwd.register_fake
def _(dy, s, weight, rstd, offset, dsum):
    return s.new_empty(s.shape), weight.new_empty(weight.shape)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, _eps, offset = inputs
    _y, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    ctx.offset = offset
    ctx.mark_non_differentiable(rstd)


def _rms_norm_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dweight = _rms_norm_bwd(dy, x, weight, rstd, ctx.offset, None)
    return dx, dweight, None, None


_rms_norm_fwd.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)


def _add_rms_norm_setup(ctx, inputs, output):
    _x, _residual, weight, _eps, offset = inputs
    _y, s, rstd = output
    ctx.save_for_backward(s, weight, rstd)
    ctx.offset = offset
    ctx.mark_non_differentiable(rstd)


def _add_rms_norm_backward(ctx, dy, dsum, _drstd):
    s, weight, rstd = ctx.saved_tensors
    # d(x + residual) = the normalisation's gradient + the gradient of the sum output; x and residual share it.
    ds, dweight = _rms_norm_bwd(dy, s, weight, rstd, ctx.offset, dsum)
    return ds, ds, dweight, None, None


_add_rms_norm_fwd.register_autograd(_add_rms_norm_backward, setup_context=_add_rms_norm_setup)


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------


def _check_inputs(op: str, x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> None:
    if x.dim() == 0 or not x.is_floating_point():
        raise ValueError(f"{op}: x must be a floating-point tensor [..., hidden_size], got {x.dtype} of shape "
                         f"{tuple(x.shape)}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"{op}: weight has shape {tuple(weight.shape)} but x has shape {tuple(x.shape)}; weight must "
                         f"be 1-D with x's last dimension ({x.shape[-1]}) as its length")
    if weight.device != x.device:
        raise ValueError(f"{op}: weight is on {weight.device} but x is on {x.device}; move both to one device")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                 or residual.device != x.device):
        raise ValueError(f"{op}: residual ({residual.dtype}, shape {tuple(residual.shape)}, {residual.device}) must "
                         f"match x ({x.dtype}, shape {tuple(x.shape)}, {x.device})")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0) -> torch.Tensor:
    """y = x * rsqrt(mean(x^2) + eps) * (offset + weight) over the last dimension (offset 1 for Gemma-style weights).

    fp32 arithmetic; y in x's dtype, the weight's gradient in the weight's dtype (fp32 master weights are fine)."""
    _check_inputs("rms_norm", x, weight)
    if use_triton(x, weight):
        return _rms_norm_fwd(x, weight, eps, offset)[0]
    return rms_norm_reference(x, weight, eps, offset)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass; the stored sum is what is normalised."""
    _check_inputs("add_rms_norm", x, weight, residual)
    if use_triton(x, residual, weight):
        y, s, _rstd = _add_rms_norm_fwd(x, residual, weight, eps, offset)
        return y, s
    return add_rms_norm_reference(x, residual, weight, eps, offset)


class RMSNorm(nn.Module):
    """Drop-in for Hugging Face's LlamaRMSNorm: same state_dict (`weight`), same math.

    `forward(x)` returns the normalised x; `forward(x, residual)` returns (normalised x + residual, x + residual)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, offset: float = 0.0, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.offset = offset
        init = 0.0 if offset else 1.0
        self.weight = nn.Parameter(torch.full((hidden_size,), init, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return rms_norm(x, self.weight, self.eps, self.offset)
        return add_rms_norm(x, residual, self.weight, self.eps, self.offset)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, offset={self.offset}"
