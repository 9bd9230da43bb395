"""RMSNorm and RMSNorm fused with the residual add.

Public functional API (`rms_norm`, `add_rms_norm`), their plain-PyTorch references with the same signatures, and
the `RMSNorm` module. The Triton kernels live in `fastsft.kernels.rms_norm`.

TODO(issue 4): register the Triton path as torch.library.custom_op with fake + autograd registrations.
"""

from __future__ import annotations

import torch
from torch import nn


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0) -> torch.Tensor:
    """y = x * rsqrt(mean(x^2) + eps) * (offset + weight) over the last dimension, computed in fp32."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * (offset + weight.float())).to(x.dtype)


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual); the sum is formed in fp32 and stored in x.dtype."""
    s = x.float() + residual.float()
    rstd = torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)
    return (s * rstd * (offset + weight.float())).to(x.dtype), s.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0) -> torch.Tensor:
    return rms_norm_reference(x, weight, eps, offset)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    return add_rms_norm_reference(x, residual, weight, eps, offset)


class RMSNorm(nn.Module):
    """Drop-in for Hugging Face's LlamaRMSNorm: same state_dict (`weight`), same math."""

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
