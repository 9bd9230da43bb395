"""Triton kernel for masked cross-entropy over rows of logits: loss, logsumexp, argmax hit and the gradient.

Sits under `fastsft.ops.cross_entropy`, which wraps these launchers as torch.library custom ops (autograd, fake
tensors, dispatch); `fastsft.kernels.linear_cross_entropy` calls the same launcher on each chunk of logits it builds.
Nothing else should call them. Inputs here are 2-D [rows, vocab] with unit stride along the vocabulary.

Math per row with target y (all in fp32 whatever the storage dtype; eps = label_smoothing, V = vocab size):
    z      = softcap * tanh(x / softcap) if softcap else x
    lse    = logsumexp(z)
    loss   = (1 - eps) * (lse - z[y]) + eps * (lse - mean(z)) + z_loss * lse^2
    dloss/dx_j = (p_j * (1 + 2 z_loss lse) - (1 - eps) [j == y] - eps / V) * (1 - tanh^2(x_j / softcap))
with p = softmax(z); the last factor only with softcap. Rows whose label is ignore_index get loss 0, lse 0, no hit
and an all-zero gradient row. A label outside [0, V) that is not ignore_index gives a NaN loss and NaN gradient
(a device-side error would need a host sync; NaN is loud and free).

One kernel, three jobs chosen by compile-time flags, one program per row looping over the row in BLOCK columns:
    COMPUTE_LSE  sweep 1: online max / sum of exp and the label's logit (one read of the row, nothing read again
                 after it) -> loss, lse, argmax hit.
                 Without it lse is loaded from LSE (the backward of `cross_entropy`, which saved it).
    WRITE_GRAD   sweep 2: reads the row again and writes the gradient times a per-row scale into GRAD, which may be
                 the logits buffer itself (each block is read before it is overwritten).
So `cross_entropy` reads the logits once in the forward and once (plus one write) in the backward, and the fused
linear cross-entropy does both sweeps back to back on a chunk it just produced (the second read mostly hits L2).
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastsft.kernels._common import cast_rtne

# Columns per loop iteration. A 128k-vocabulary row is ~16 iterations of 8192; the block is capped so registers hold
# it (8192 fp32 over 16 warps = 16 values per thread). Tests lower it to exercise multi-block rows on small vocabs.
MAX_BLOCK = 8192


@triton.jit
def _softcapped(x, softcap, HAS_SOFTCAP: tl.constexpr):
    """softcap * tanh(x / softcap), tanh from one exp of a non-positive number (no overflow, no libdevice)."""
    if HAS_SOFTCAP:
        u = x / softcap
        e = tl.exp(-2.0 * tl.abs(u))
        t = (1.0 - e) / (1.0 + e)
        return softcap * tl.where(u < 0, -t, t)
    else:
        return x


@triton.jit
def _block_values(row_ptr, start, n_cols, softcap, HAS_SOFTCAP: tl.constexpr, MASKED: tl.constexpr,
                  BLOCK: tl.constexpr):
    """(cols, valid, z) for one block of a row: z = the softcapped logits in fp32, -inf past the row's end.

    MASKED=False loads a full block without a mask: Triton keeps a mask `cols < n_cols` constant only over runs that
    divide n_cols, so for an odd vocabulary (50257) a masked loop makes every load and store scalar, not just the
    last block's (see SPLIT_FULL_BLOCKS in the kernel)."""
    cols = start + tl.arange(0, BLOCK)
    if MASKED:
        valid = cols < n_cols
        # Upcast straight after the load: fp32 arithmetic always (and the interpreter mangles bf16 arithmetic).
        x = tl.load(row_ptr + cols, mask=valid, other=0.0).to(tl.float32)
        z = tl.where(valid, _softcapped(x, softcap, HAS_SOFTCAP), float("-inf"))
    else:
        valid = cols < start + BLOCK  # all true
        x = tl.load(row_ptr + cols).to(tl.float32)
        z = _softcapped(x, softcap, HAS_SOFTCAP)
    return cols, valid, z


@triton.jit
def _lse_block(row_ptr, start, n_cols, label, softcap, running_max, running_sum, sum_z, z_label, best, best_col,
               HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, WRITE_HIT: tl.constexpr,
               MASKED: tl.constexpr, BLOCK: tl.constexpr):
    """Sweep 1 over one block: the online max / sum of exp, the label's logit, the sum of z, the first argmax.

    The label's logit is taken here, from the block already in registers, by the one block that holds it: reading it
    back from memory after the sweep would race with the gradient sweep when GRAD is this same buffer (other warps
    may already have overwritten it), and would cost a second read."""
    cols, valid, z = _block_values(row_ptr, start, n_cols, softcap, HAS_SOFTCAP, MASKED, BLOCK)
    block_max = tl.max(z, axis=0)
    if WRITE_HIT:
        # Strictly greater keeps the earlier block on ties: the first maximum, like torch.argmax.
        block_best_col = start + tl.argmax(z, axis=0, tie_break_left=True)
        best_col = tl.where(block_max > best, block_best_col, best_col)
        best = tl.maximum(best, block_max)
    new_max = tl.maximum(running_max, block_max)
    running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
    if (label >= start) & (label < start + BLOCK):
        z_label = tl.sum(tl.where((cols == label) & valid, z, 0.0), axis=0)
    if HAS_SMOOTHING:
        sum_z += tl.sum(tl.where(valid, z, 0.0), axis=0)
    return new_max, running_sum, sum_z, z_label, best, best_col


@triton.jit
def _grad_block(row_ptr, grad_ptr, start, n_cols, label, softcap, lse, p_scale, label_coef, uniform,
                HAS_SOFTCAP: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    """Sweep 2 over one block: read the logits, write d loss / d logits times the row's scale."""
    cols, valid, z = _block_values(row_ptr, start, n_cols, softcap, HAS_SOFTCAP, MASKED, BLOCK)
    g = tl.exp(z - lse) * p_scale - uniform
    g = tl.where(cols == label, g - label_coef, g)
    if HAS_SOFTCAP:
        t = z / softcap
        g = g * (1.0 - t * t)
    g = cast_rtne(g, grad_ptr.dtype.element_ty)
    if MASKED:
        tl.store(grad_ptr + cols, g, mask=valid)
    else:
        tl.store(grad_ptr + cols, g)


@triton.jit
def _cross_entropy_kernel(
    LOGITS, GRAD, LABELS, LOSS, LSE, HIT, ROW_SCALE,
    stride_logits, stride_grad, stride_labels, stride_scale,
    n_cols, ignore_index, label_smoothing, z_loss, softcap,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_LSE: tl.constexpr,
    WRITE_HIT: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr,
    SPLIT_FULL_BLOCKS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = LOGITS + row * stride_logits
    grad_row = GRAD + row * stride_grad
    label = tl.load(LABELS + row * stride_labels)
    # Every sweep: with SPLIT_FULL_BLOCKS (a vocabulary that is not a multiple of 16) the full blocks unmasked, then
    # the partial last block masked; else every block masked (the mask is then constant over 16-column runs, loads
    # and stores stay vectorised, and one loop body keeps fewer registers).
    n_full = (n_cols // BLOCK) * BLOCK if SPLIT_FULL_BLOCKS else 0

    if label == ignore_index:
        # Nothing to read: filler and prompt rows cost one scalar load (plus zeroing their gradient row).
        if COMPUTE_LSE:
            tl.store(LOSS + row, 0.0)
            tl.store(LSE + row, 0.0)
        if WRITE_HIT:
            tl.store(HIT + row, 0)
        if WRITE_GRAD:
            zeros = tl.zeros([BLOCK], dtype=tl.float32).to(GRAD.dtype.element_ty)
            if SPLIT_FULL_BLOCKS:
                for start in range(0, n_full, BLOCK):
                    tl.store(grad_row + start + tl.arange(0, BLOCK), zeros)
            for start in range(n_full, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                tl.store(grad_row + cols, zeros, mask=cols < n_cols)
        return

    label_ok = (label >= 0) & (label < n_cols)
    if COMPUTE_LSE:
        running_max = float("-inf")
        running_sum = 0.0
        sum_z = 0.0
        z_label = 0.0
        best = float("-inf")
        best_col = 0
        if SPLIT_FULL_BLOCKS:
            for start in range(0, n_full, BLOCK):
                running_max, running_sum, sum_z, z_label, best, best_col = _lse_block(
                    logits_row, start, n_cols, label, softcap, running_max, running_sum, sum_z, z_label, best,
                    best_col, HAS_SOFTCAP, HAS_SMOOTHING, WRITE_HIT, False, BLOCK)
        for start in range(n_full, n_cols, BLOCK):
            running_max, running_sum, sum_z, z_label, best, best_col = _lse_block(
                logits_row, start, n_cols, label, softcap, running_max, running_sum, sum_z, z_label, best, best_col,
                HAS_SOFTCAP, HAS_SMOOTHING, WRITE_HIT, True, BLOCK)
        lse = running_max + tl.log(running_sum)
        loss = lse - z_label
        if HAS_SMOOTHING:
            loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - sum_z / n_cols)
        if HAS_Z_LOSS:
            loss += z_loss * lse * lse
        tl.store(LOSS + row, tl.where(label_ok, loss, float("nan")))
        tl.store(LSE + row, lse)
        if WRITE_HIT:
            tl.store(HIT + row, (best_col == label).to(tl.int32))
    else:
        lse = tl.load(LSE + row)

    if WRITE_GRAD:
        scale = 1.0
        if HAS_ROW_SCALE:
            scale = tl.load(ROW_SCALE + row * stride_scale).to(tl.float32)
        scale = tl.where(label_ok, scale, float("nan"))
        p_scale = scale
        if HAS_Z_LOSS:
            p_scale = scale * (1.0 + 2.0 * z_loss * lse)
        label_coef = scale
        uniform = 0.0
        if HAS_SMOOTHING:
            label_coef = scale * (1.0 - label_smoothing)
            uniform = scale * label_smoothing / n_cols
        if SPLIT_FULL_BLOCKS:
            for start in range(0, n_full, BLOCK):
                _grad_block(logits_row, grad_row, start, n_cols, label, softcap, lse, p_scale, label_coef, uniform,
                            HAS_SOFTCAP, False, BLOCK)
        for start in range(n_full, n_cols, BLOCK):
            _grad_block(logits_row, grad_row, start, n_cols, label, softcap, lse, p_scale, label_coef, uniform,
                        HAS_SOFTCAP, True, BLOCK)


def launch_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of `n_cols` logits: the one place launch shapes are chosen.

    Rows shorter than MAX_BLOCK are one masked block; longer rows loop. Warps grow with the block so each thread keeps
    about 16 fp32 values per live array. Not yet tuned on a GPU.
    """
    block = min(triton.next_power_of_2(max(n_cols, 1)), MAX_BLOCK)
    num_warps = min(max(block // 512, 1), 16)
    return block, num_warps


def cross_entropy_rows(
    logits, labels, ignore_index: int, label_smoothing: float, z_loss: float, softcap: float,
    loss=None, lse=None, hit=None, grad=None, row_scale=None,
) -> None:
    """Run the kernel over every row of `logits` [rows, V] (unit column stride) with `labels` [rows] (any stride).

    loss, lse: fp32 [rows] outputs, given together -> sweep 1 runs (otherwise lse must be given and is read).
    hit: int32 [rows] output (argmax == label), needs loss.  grad: [rows, V] output (may be `logits` itself).
    row_scale: [rows] multiplier of each gradient row (any stride, 0 broadcasts one value); None means 1.
    softcap <= 0 means no softcap.
    """
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    compute_lse = loss is not None
    if lse is None:
        raise ValueError("cross_entropy_rows: lse is always needed (written by sweep 1, or read by the gradient sweep)")
    if not compute_lse and grad is None:
        raise ValueError("cross_entropy_rows: without loss outputs there is nothing to do unless lse and grad are given")
    if hit is not None and not compute_lse:
        raise ValueError("cross_entropy_rows: the argmax hit is found in sweep 1, so it needs the loss outputs too")
    block, num_warps = launch_config(n_cols)
    dummy = logits  # any pointer: a disabled flag means the kernel never touches it
    _cross_entropy_kernel[(n_rows,)](
        logits, grad if grad is not None else dummy, labels,
        loss if compute_lse else dummy, lse, hit if hit is not None else dummy,
        row_scale if row_scale is not None else dummy,
        logits.stride(0), grad.stride(0) if grad is not None else 0, labels.stride(0),
        row_scale.stride(0) if row_scale is not None else 0,
        n_cols, ignore_index, label_smoothing, z_loss, softcap,
        HAS_SMOOTHING=label_smoothing != 0.0,
        HAS_Z_LOSS=z_loss != 0.0,
        HAS_SOFTCAP=softcap > 0.0,
        COMPUTE_LSE=compute_lse,
        WRITE_HIT=hit is not None,
        WRITE_GRAD=grad is not None,
        HAS_ROW_SCALE=row_scale is not None,
        SPLIT_FULL_BLOCKS=n_cols % 16 != 0,
        BLOCK=block,
        num_warps=num_warps,
    )
