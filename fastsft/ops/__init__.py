"""Public ops: each Triton kernel wrapped as a torch.library custom op, with a plain-PyTorch reference of the same
signature. Without CUDA the references run; FASTSFT_BACKEND=triton|reference forces one (see `_backend`)."""

from fastsft.ops.cross_entropy import (
    CrossEntropyLoss,
    LinearCrossEntropyLoss,
    cross_entropy,
    cross_entropy_reference,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)
from fastsft.ops.rms_norm import RMSNorm, add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference

__all__ = [
    "CrossEntropyLoss",
    "LinearCrossEntropyLoss",
    "RMSNorm",
    "add_rms_norm",
    "add_rms_norm_reference",
    "cross_entropy",
    "cross_entropy_reference",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "rms_norm",
    "rms_norm_reference",
]
