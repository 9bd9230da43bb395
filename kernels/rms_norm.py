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
Forward keeps only rstd (fp32, one per row). Both kernels work on tiles of ROWS rows x BLOCK columns: one row per
tile for wide rows, several for narrow ones (Qwen3's per-head q/k norms have rows of 128: one row per program would
leave most lanes of a warp idle and pay a program's fixed cost per 256 bytes). The backward runs a persistent grid:
as many programs as fit on the GPU at once (`programs_per_sm`, from the compiled kernel's registers and shared
memory), each walking a contiguous range of rows and writing one fp32 row of dweight partial sums, which the launcher
reduces.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastsft.kernels._common import cast_rtne

# Largest hidden size one program holds in registers (the whole row is one block).
MAX_HIDDEN = 65536
# Elements per tile (ROWS x BLOCK) for narrow rows: rows narrower than this are stacked up to it, so a program
# always moves at least TILE_ELEMENTS values per step (4 KiB of bf16 per array) whatever the width.
TILE_ELEMENTS = 2048
# Backward: rows up to this block keep the weight in registers; longer ones re-read it per row (see launch_config).
HOLD_WEIGHT_MAX_BLOCK = 4096
# Persistent backward grid without a GPU (the interpreter runs programs one after another): a few programs, so tests
# exercise programs that walk several tiles.
INTERPRETER_PROGRAMS = 4
# Hardware limits per SM of compute capability 9.0 (H100/H200) used by `programs_per_sm` when it is given no device
# properties (the ahead-of-time compile, tests): threads, 32-bit registers, shared memory bytes, resident blocks.
SM90_LIMITS = {"threads": 2048, "registers": 65536, "shared_bytes": 228 * 1024, "blocks": 32}
# Registers are allocated per warp in units of 256 (8 per thread).
REGISTER_GRANULE = 8


@triton.jit
def _rms_norm_fwd_kernel(
    X, R, S, Y, W, RSTD,
    stride_x, stride_r, stride_s, stride_y,
    n_rows, n_cols, eps, offset,
    HAS_RESIDUAL: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_mask[None, :]
    r2, c2 = rows[:, None], cols[None, :]
    # Upcast straight after each load: fp32 arithmetic always (and the interpreter mangles bf16 arithmetic).
    s = tl.load(X + r2 * stride_x + c2, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + r2 * stride_r + c2, mask=mask, other=0.0).to(tl.float32)
        # Normalise the sum as stored (rounded to the storage dtype), exactly what an unfused `x + residual`
        # followed by RMSNorm computes, and what the backward recomputes from the saved sum.
        s_stored = cast_rtne(s + r, S.dtype.element_ty)
        tl.store(S + r2 * stride_s + c2, s_stored, mask=mask)
        s = s_stored.to(tl.float32)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=1) / n_cols + eps)
    y = s * rstd[:, None] * (w + offset)[None, :]
    tl.store(Y + r2 * stride_y + c2, cast_rtne(y, Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rows < n_rows)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, S, W, RSTD, DSUM, DX, DW_PARTIAL,
    stride_dy, stride_s, stride_dsum, stride_dx,
    n_rows, n_cols, rows_per_program, offset,
    HAS_DSUM: tl.constexpr,
    HOLD_WEIGHT: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < n_cols
    c2 = cols[None, :]
    if HOLD_WEIGHT:  # small rows: keep the weight in registers for the whole walk
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
    dw_acc = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
    # int64 row bounds so row * stride cannot overflow on large activations. rows_per_program is a multiple of
    # ROWS, so tiles never straddle two programs.
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for first in range(row_start, row_end, ROWS):
        rows = first + tl.arange(0, ROWS)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        r2 = rows[:, None]
        dy = tl.load(DY + r2 * stride_dy + c2, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(S + r2 * stride_s + c2, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)[:, None]
        xhat = s * rstd
        if not HOLD_WEIGHT:  # long rows: re-read the weight (an L1/L2 hit) rather than spill registers holding it
            w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
        g = dy * w[None, :]
        ds = rstd * (g - xhat * (tl.sum(g * xhat, axis=1) / n_cols)[:, None])
        if HAS_DSUM:
            ds += tl.load(DSUM + r2 * stride_dsum + c2, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + r2 * stride_dx + c2, cast_rtne(ds, DX.dtype.element_ty), mask=mask)
        dw_acc += dy * xhat  # zero on masked rows and columns (dy and s load as 0 there)
    tl.store(DW_PARTIAL + pid * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_mask)


def launch_config(n_cols: int, backward: bool = False) -> tuple[int, int, int]:
    """(BLOCK, ROWS, num_warps) for rows of `n_cols` elements: the one place launch shapes are chosen.

    A tile is ROWS whole rows: BLOCK is the next power of two of the width (masked), and rows narrower than
    TILE_ELEMENTS are stacked to fill it (128 -> 16 rows, 2048 -> 1). Warps grow with the tile so each thread keeps a
    handful of elements in registers (8 fp32 values per thread per array up to 4096 elements, 16 up to 16384 in the
    forward). The backward keeps four tile arrays live (dy, s, the dweight accumulator and, for rows up to
    HOLD_WEIGHT_MAX_BLOCK, the weight), so from 8192 columns it takes 32 warps: with 16 it hit the 128-register cap
    and spilled (bench/kernel_resources.py, compiled for sm_90).
    """
    if not 1 <= n_cols <= MAX_HIDDEN:
        raise ValueError(f"rms_norm: hidden size {n_cols} is outside the supported range 1..{MAX_HIDDEN}")
    block = triton.next_power_of_2(n_cols)
    rows = max(1, TILE_ELEMENTS // block)
    tile = rows * block
    num_warps = min(max(tile // 256, 1), 16) if tile <= 16384 else 32
    if backward and block >= 8192:
        num_warps = 32
    return block, rows, num_warps


def holds_weight(block: int) -> bool:
    """Whether the backward keeps the weight row in registers across its rows (else it re-reads it per row)."""
    return block <= HOLD_WEIGHT_MAX_BLOCK


def programs_per_sm(registers: int, num_warps: int, shared_bytes: int, limits: dict | None = None) -> int:
    """How many programs of a compiled kernel one SM holds at once: the least of what its threads, registers
    (allocated per warp in granules), shared memory and resident-block limit allow; at least 1."""
    limits = SM90_LIMITS if limits is None else limits
    threads = 32 * num_warps
    regs_per_warp = -(-max(registers, 1) // REGISTER_GRANULE) * REGISTER_GRANULE * 32
    fits = [limits["threads"] // threads, limits["registers"] // (regs_per_warp * num_warps), limits["blocks"]]
    if shared_bytes:
        fits.append(limits["shared_bytes"] // shared_bytes)
    return max(1, min(fits))


@functools.cache
def _device_limits(device_index: int) -> tuple[int, dict]:
    props = torch.cuda.get_device_properties(device_index)
    limits = {
        "threads": props.max_threads_per_multi_processor,
        "registers": getattr(props, "regs_per_multiprocessor", SM90_LIMITS["registers"]),
        "shared_bytes": getattr(props, "shared_memory_per_multiprocessor", SM90_LIMITS["shared_bytes"]),
        "blocks": SM90_LIMITS["blocks"],
    }
    return props.multi_processor_count, limits


_GPU_PROGRAMS: dict = {}


def _gpu_programs(args: tuple, kwargs: dict, device: torch.device) -> int:
    """Programs that fit on the whole GPU at once for this specialisation of the backward kernel: compiled (or found
    in triton's cache) without a launch, its registers and shared memory read, the answer cached per signature."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, kwargs["HAS_DSUM"], kwargs["HOLD_WEIGHT"], kwargs["ROWS"], kwargs["BLOCK"], kwargs["num_warps"],
           args[0].dtype, args[1].dtype, args[2].dtype, args[5].dtype)
    if key not in _GPU_PROGRAMS:
        sm_count, limits = _device_limits(index)
        try:
            compiled = _rms_norm_bwd_kernel.warmup(*args, grid=(1,), **kwargs)
            compiled._init_handles()
            per_sm = programs_per_sm(compiled.n_regs, kwargs["num_warps"], compiled.metadata.shared, limits)
        except Exception:  # a triton without warmup / n_regs: fall back to what the threads allow
            per_sm = programs_per_sm(0, kwargs["num_warps"], 0, limits)
        _GPU_PROGRAMS[key] = sm_count * per_sm
    return _GPU_PROGRAMS[key]


def rms_norm_fwd(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, offset: float,
    y: torch.Tensor, s: torch.Tensor | None, rstd: torch.Tensor,
) -> None:
    """Fill y [rows, n], rstd [rows] (and s = x + residual when residual is given). 2-D, unit column stride."""
    n_rows, n_cols = x.shape
    if n_rows == 0:
        return
    block, rows, num_warps = launch_config(n_cols)
    has_residual = residual is not None
    _rms_norm_fwd_kernel[(triton.cdiv(n_rows, rows),)](
        x, residual if has_residual else x, s if has_residual else y, y, weight, rstd,
        x.stride(0), residual.stride(0) if has_residual else 0, s.stride(0) if has_residual else 0, y.stride(0),
        n_rows, n_cols, eps, offset,
        HAS_RESIDUAL=has_residual, ROWS=rows, BLOCK=block, num_warps=num_warps,
    )


def rms_norm_bwd(
    dy: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, offset: float,
    dsum: torch.Tensor | None, dx: torch.Tensor,
) -> torch.Tensor:
    """Fill dx [rows, n] (plus dsum when given) and return dweight in fp32 (the reduced per-program partials)."""
    n_rows, n_cols = s.shape
    if n_rows == 0:
        return torch.zeros(n_cols, device=s.device, dtype=torch.float32)
    block, rows, num_warps = launch_config(n_cols, backward=True)
    has_dsum = dsum is not None
    kwargs = dict(HAS_DSUM=has_dsum, HOLD_WEIGHT=holds_weight(block), ROWS=rows, BLOCK=block, num_warps=num_warps)

    def args(programs, rows_per_program, dw_partial):
        return (dy, s, weight, rstd, dsum if has_dsum else dy, dx, dw_partial,
                dy.stride(0), s.stride(0), dsum.stride(0) if has_dsum else 0, dx.stride(0),
                n_rows, n_cols, rows_per_program, offset)

    if s.device.type == "cuda":
        placeholder = torch.empty(0, device=s.device, dtype=torch.float32)  # dw_partial's dtype, for the compile
        programs = _gpu_programs(args(1, 3 * rows, placeholder), kwargs, s.device)
    else:
        programs = INTERPRETER_PROGRAMS
    tiles = triton.cdiv(n_rows, rows)
    rows_per_program = triton.cdiv(tiles, max(1, min(programs, tiles))) * rows  # whole tiles per program
    programs = triton.cdiv(n_rows, rows_per_program)  # drop programs that would get no rows
    dw_partial = torch.empty(programs, n_cols, device=s.device, dtype=torch.float32)
    _rms_norm_bwd_kernel[(programs,)](*args(programs, rows_per_program, dw_partial), **kwargs)
    return dw_partial.sum(0)
