"""Triton kernels for RMSNorm and RMSNorm fused with the residual add, forward and backward.

Sits under `fastsft.ops.rms_norm`, which wraps these launchers as torch.library custom ops (autograd, fake tensors,
dispatch); nothing else should call them. Inputs here are already 2-D [rows, hidden] with unit stride along hidden.

Math (per row, over the hidden dimension, all in fp32 whatever the storage dtype):
    s     = x (+ residual, rounded to the storage dtype: the tensor handed on as the new residual stream)
    rstd  = 1 / sqrt(mean(s^2) + eps)
    y     = s * rstd * (offset + weight)
Backward with xhat = s * rstd and g = dy * (offset + weight):
    ds      = rstd * (g - xhat * mean(g * xhat))  (+ the incoming gradient of the sum output, for the add form)
    dweight = sum over rows of dy * xhat
Forward keeps only rstd (fp32, one per row). The backward runs a persistent grid: each program walks a contiguous
chunk of rows and writes one fp32 row of dweight partial sums; the launcher reduces the partials.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastsft.kernels._common import cast_rtne

# Largest hidden size one program holds in registers (the whole row is one block).
MAX_HIDDEN = 65536
# Persistent backward grid: programs per SM on a GPU (one, as planned; not yet tuned on hardware: more programs
# per SM would raise occupancy for small hidden sizes at the cost of more dweight partials), and the count when
# there is no GPU (the interpreter runs programs one after another).
PROGRAMS_PER_SM = 1
INTERPRETER_PROGRAMS = 4
# Backward: rows up to this block keep the weight in registers; longer ones re-read it per row (see launch_config).
HOLD_WEIGHT_MAX_BLOCK = 4096


@triton.jit
def _rms_norm_fwd_kernel(
    X, R, S, Y, W, RSTD,
    stride_x, stride_r, stride_s, stride_y,
    n_cols, eps, offset,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    # Upcast straight after each load: fp32 arithmetic always (and the interpreter mangles bf16 arithmetic).
    s = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        # Normalise the sum as stored (rounded to the storage dtype), exactly what an unfused `x + residual`
        # followed by RMSNorm computes, and what the backward recomputes from the saved sum.
        s_stored = cast_rtne(s + r, S.dtype.element_ty)
        tl.store(S + row * stride_s + cols, s_stored, mask=mask)
        s = s_stored.to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / n_cols + eps)
    y = s * rstd * (w + offset)
    tl.store(Y + row * stride_y + cols, cast_rtne(y, Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, S, W, RSTD, DSUM, DX, DW_PARTIAL,
    stride_dy, stride_s, stride_dsum, stride_dx,
    n_rows, n_cols, rows_per_program, offset,
    HAS_DSUM: tl.constexpr,
    HOLD_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    if HOLD_WEIGHT:  # small rows: keep the weight in registers for the whole walk
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
    dw_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    # int64 row bounds so row * stride cannot overflow on large activations.
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row64 in range(row_start, row_end):
        dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(S + row64 * stride_s + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row64)
        xhat = s * rstd
        if not HOLD_WEIGHT:  # long rows: re-read the weight (an L1/L2 hit) rather than spill registers holding it
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
        g = dy * w
        ds = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / n_cols))
        if HAS_DSUM:
            ds += tl.load(DSUM + row64 * stride_dsum + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row64 * stride_dx + cols, cast_rtne(ds, DX.dtype.element_ty), mask=mask)
        dw_acc += dy * xhat
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw_acc, mask=mask)


def launch_config(n_cols: int, backward: bool = False) -> tuple[int, int]:
    """(BLOCK, num_warps) for a row of `n_cols` elements: the one place launch shapes are chosen.

    One program holds a whole row, so BLOCK is the next power of two (masked); warps grow with the row so each
    thread keeps a handful of elements in registers (8 fp32 values per thread per row array up to 4096 columns, 16
    up to 16384 in the forward). The backward keeps four row arrays live (dy, s, the dweight accumulator and, for
    rows up to HOLD_WEIGHT_MAX_BLOCK, the weight), so from 8192 columns it takes 32 warps: with 16 it hit the
    128-register cap and spilled (bench/kernel_resources.py, compiled for sm_90).
    """
    if not 1 <= n_cols <= MAX_HIDDEN:
        raise ValueError(f"rms_norm: hidden size {n_cols} is outside the supported range 1..{MAX_HIDDEN}")
    block = triton.next_power_of_2(n_cols)
    num_warps = min(max(block // 256, 1), 16) if block <= 16384 else 32
    if backward and block >= 8192:
        num_warps = 32
    return block, num_warps


def holds_weight(block: int) -> bool:
    """Whether the backward keeps the weight row in registers across its rows (else it re-reads it per row)."""
    return block <= HOLD_WEIGHT_MAX_BLOCK


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def persistent_programs(device: torch.device, n_rows: int) -> int:
    """Backward grid size: PROGRAMS_PER_SM per SM on a GPU, a few under the interpreter; never more than rows."""
    if device.type == "cuda":
        programs = PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        programs = INTERPRETER_PROGRAMS
    return max(1, min(programs, n_rows))


def rms_norm_fwd(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, offset: float,
    y: torch.Tensor, s: torch.Tensor | None, rstd: torch.Tensor,
) -> None:
    """Fill y [rows, n], rstd [rows] (and s = x + residual when residual is given). 2-D, unit column stride."""
    n_rows, n_cols = x.shape
    if n_rows == 0:
        return
    block, num_warps = launch_config(n_cols)
    has_residual = residual is not None
    _rms_norm_fwd_kernel[(n_rows,)](
        x, residual if has_residual else x, s if has_residual else y, y, weight, rstd,
        x.stride(0), residual.stride(0) if has_residual else 0, s.stride(0) if has_residual else 0, y.stride(0),
        n_cols, eps, offset,
        HAS_RESIDUAL=has_residual, BLOCK=block, num_warps=num_warps,
    )


def rms_norm_bwd(
    dy: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, offset: float,
    dsum: torch.Tensor | None, dx: torch.Tensor,
) -> torch.Tensor:
    """Fill dx [rows, n] (plus dsum when given) and return dweight in fp32 (the reduced per-program partials)."""
    n_rows, n_cols = s.shape
    if n_rows == 0:
        return torch.zeros(n_cols, device=s.device, dtype=torch.float32)
    block, num_warps = launch_config(n_cols, backward=True)
    programs = persistent_programs(s.device, n_rows)
    rows_per_program = triton.cdiv(n_rows, programs)
    programs = triton.cdiv(n_rows, rows_per_program)  # drop programs that would get no rows
    dw_partial = torch.empty(programs, n_cols, device=s.device, dtype=torch.float32)
    has_dsum = dsum is not None
    _rms_norm_bwd_kernel[(programs,)](
        dy, s, weight, rstd, dsum if has_dsum else dy, dx, dw_partial,
        dy.stride(0), s.stride(0), dsum.stride(0) if has_dsum else 0, dx.stride(0),
        n_rows, n_cols, rows_per_program, offset,
        HAS_DSUM=has_dsum, HOLD_WEIGHT=holds_weight(block), BLOCK=block, num_warps=num_warps,
    )
    return dw_partial.sum(0)
