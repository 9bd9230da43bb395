"""Which implementation an op runs: the Triton kernels or the plain-PyTorch reference.

FASTSFT_BACKEND=triton forces the kernels (tests set TRITON_INTERPRET=1 to run them on CPU tensors),
FASTSFT_BACKEND=reference forces the references; unset (or "auto") uses the kernels for CUDA tensors only.
Read at call time so tests can switch it with monkeypatch. The kernels are imported when the ops are (triton picks
interpreter or compiler at decoration time, so TRITON_INTERPRET must be set before Python starts).
"""

from __future__ import annotations

import importlib.util
import os

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None  # a Linux-only dependency (pyproject)

_CHOICES = ("auto", "triton", "reference")


def backend() -> str:
    value = os.environ.get("FASTSFT_BACKEND", "auto").strip().lower() or "auto"
    if value not in _CHOICES:
        raise ValueError(f"FASTSFT_BACKEND={value!r} is not one of {', '.join(_CHOICES)}")
    return value


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernels should run for these inputs."""
    choice = backend()
    if choice == "reference":
        return False
    if not HAS_TRITON:
        if choice == "triton":
            raise RuntimeError("FASTSFT_BACKEND=triton was asked for but triton is not installed (pip install triton, "
                               "Linux only), or unset FASTSFT_BACKEND to use the PyTorch references")
        return False
    if choice == "triton":
        on_cpu = [t for t in tensors if isinstance(t, torch.Tensor) and not t.is_cuda]
        if on_cpu and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError(
                f"FASTSFT_BACKEND=triton was asked for with tensors on {on_cpu[0].device}: the Triton kernels run on "
                "CPU tensors only in the interpreter. Set TRITON_INTERPRET=1 before starting Python, move the "
                "tensors to CUDA, or unset FASTSFT_BACKEND to use the PyTorch reference on CPU."
            )
        return True
    return all(t.is_cuda for t in tensors if isinstance(t, torch.Tensor))
