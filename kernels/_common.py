"""Small Triton helpers shared by the kernels in this package."""

from __future__ import annotations

import os

import triton
import triton.language as tl

# The Triton interpreter (TRITON_INTERPRET=1, how the CPU tests run the kernels) truncates on an fp32 -> bf16 cast,
# so there the rounding is done by hand to check the same numbers a GPU produces. A compiled kernel uses the
# hardware's round-to-nearest-even cast and pays nothing. Read once: triton.jit picks interpreter or compiler at
# decoration time too.
ROUND_BF16_BY_HAND = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def cast_rtne(x, DTYPE: tl.constexpr):
    """fp32 -> DTYPE, rounded to nearest even (exact for every finite value and inf)."""
    if ROUND_BF16_BY_HAND and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return x.to(DTYPE)
