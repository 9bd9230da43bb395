"""Linear cross-entropy in chunks of tokens: the lm_head matmul fused with the loss, never an [N, V] tensor.

Sits under `fastsft.ops.cross_entropy`, which wraps these launchers as torch.library custom ops; nothing else should
call them. Inputs are already gathered (only the rows that carry loss, plus filler rows labelled ignore_index),
2-D. The GEMMs run in hidden's dtype; the weight may be wider (the fp32 master lm_head weight under bf16 autocast).

For each chunk of C tokens (C chosen by `plan_chunk_rows` from a memory budget, the one place it is decided), and
within it each slice of the vocabulary's weight rows (`_weight_slices`: the whole weight when its dtype is hidden's,
else WEIGHT_SLICE_ROWS rows at a time cast to hidden's dtype into one reused buffer):
    logits[:, slice] = h_c @ W_slice^T (+ b)   cuBLAS into one reused [C, V] buffer (16-bit in, fp32 accumulate)
    kernel sweep 1: loss, lse, argmax hit per row (fastsft.kernels.cross_entropy, fp32 arithmetic)
    kernel sweep 2: d loss / d logits written over the logits in the same buffer
    dh_c  = sum over slices dlogits[:, slice] @ W_slice    (fp32 accumulator [C, H] when there are several slices)
    dW[slice] += dlogits[:, slice]^T @ h_c                  in the returned gradient (`_GradSinks`)
    db   += column sums of dlogits                          fp32
`fused_forward` does this while computing the loss (gradients of sum(losses), so the backward of a "sum"/"mean" loss
only multiplies them by one scalar: 6 x N x H x V FLOPs in all, the floor). `fused_backward` recomputes each chunk's
logits with lse saved by the forward and per-row upstream gradients (for reduction "none", whose rows can carry
different weights): 8 x N x H x V FLOPs.

Memory beyond the inputs and the returned gradients: the one [C, V] logits buffer (at most the chunk budget); with a
wider weight, one [WEIGHT_SLICE_ROWS, H] 16-bit slice and a [C, H] fp32 d hidden accumulator. d weight accumulates in
the returned gradient itself (see `_GradSinks`): no [V, H] temporary at all. The budget is FASTSFT_LCE_CHUNK_MB, else `chunk_budget_bytes` (free device
memory, capped); fewer, larger chunks mean fewer passes of the dW GEMM over its accumulator.

Masked tokens: rows labelled ignore_index skip both kernel sweeps (one scalar load and a zeroed gradient row), but
they still go through the three matmuls: cuBLAS cannot skip rows without the host knowing how many, and asking would
be a device-to-host sync. So masked tokens cost nothing only when the caller gathered them out first, which is what
`loss_positions` from the loader does (the gather happens before this file is reached); without it every token pays
the matmuls and only the loss arithmetic is skipped.
"""

from __future__ import annotations

import functools
import os

import torch

from fastsft.kernels.cross_entropy import cross_entropy_rows

# Largest logits buffer by default: 1 GiB holds 4096 rows of a 128k bf16 vocabulary (GEMMs of that height run at the
# cuBLAS peak) and keeps the op within its target of 1.5 GB beyond inputs and outputs. Less when the device has less
# free memory (FREE_MEMORY_SHARE of it); one chunk whenever every row fits. FASTSFT_LCE_CHUNK_MB overrides both
# (tests use it to force several chunks on tiny problems).
MAX_CHUNK_BYTES = 2**30
FREE_MEMORY_SHARE = 0.5
# Chunk heights above this are rounded down to a multiple of it, so every chunk GEMM gets tile-friendly shapes.
ROW_ALIGN = 128
# Row stride of the logits buffer, in elements: a multiple of 16 whatever the vocabulary (50257 -> 50272), so every
# row starts 32-byte aligned and the kernel's full blocks compile to vector loads and stores (Triton specialises a
# stride divisible by 16; an odd one makes every access scalar). The padding columns are never read or written.
ROW_STRIDE_MULTIPLE = 16
# Vocabulary rows of a wider (fp32) weight cast to hidden's dtype at a time: 8192 x 4096 x 2 bytes = 64 MiB, GEMMs
# still large. Tests lower it to exercise several slices.
WEIGHT_SLICE_ROWS = 8192


def padded_row_stride(vocab: int) -> int:
    return -(-vocab // ROW_STRIDE_MULTIPLE) * ROW_STRIDE_MULTIPLE


def chunk_budget_bytes(device: torch.device | None = None) -> int:
    """Bytes the logits buffer may take: FASTSFT_LCE_CHUNK_MB if set, else MAX_CHUNK_BYTES or FREE_MEMORY_SHARE of
    what the device has free (including memory torch's allocator holds unused), whichever is less."""
    value = os.environ.get("FASTSFT_LCE_CHUNK_MB", "").strip()
    if value:
        try:
            megabytes = float(value)
        except ValueError:
            raise ValueError(f"FASTSFT_LCE_CHUNK_MB={value!r} is not a number of megabytes (e.g. 512)") from None
        if megabytes <= 0:
            raise ValueError(f"FASTSFT_LCE_CHUNK_MB={value!r} must be positive")
        return int(megabytes * 2**20)
    if device is None or device.type != "cuda":
        return MAX_CHUNK_BYTES
    free, _total = torch.cuda.mem_get_info(device)  # a driver query, not a stream synchronisation
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return max(1, min(MAX_CHUNK_BYTES, int(FREE_MEMORY_SHARE * (free + cached))))


def plan_chunk_rows(n_rows: int, vocab: int, elem_size: int, budget_bytes: int | None = None) -> int:
    """Tokens per chunk: as many [vocab] logit rows as fit the budget, at least 1, at most n_rows (one chunk)."""
    budget = chunk_budget_bytes() if budget_bytes is None else budget_bytes
    rows = max(1, budget // max(padded_row_stride(vocab) * elem_size, 1))
    if rows >= n_rows:
        return max(1, n_rows)
    if rows > ROW_ALIGN:
        rows -= rows % ROW_ALIGN
    return rows


@functools.cache
def _cuda_has_fp32_accumulating_addmm(dtype: torch.dtype) -> bool:
    """Whether this torch's cuBLAS addmm takes 16-bit inputs with an fp32 C and D (`out_dtype`, newer torch only).
    Asked once per dtype on a 1x1 problem."""
    acc = torch.zeros(1, 1, device="cuda", dtype=torch.float32)
    one = torch.ones(1, 1, device="cuda", dtype=dtype)
    try:
        torch.addmm(acc, one, one, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError):
        return False
    return True


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b for 16-bit a, b, accumulating in fp32 without an fp32 copy of a or b."""
    if acc.is_cuda and _cuda_has_fp32_accumulating_addmm(a.dtype):
        # cuBLAS reads and writes the fp32 accumulator directly (bf16/fp16 inputs, fp32 C and D).
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    elif acc.is_cuda:
        # Older torch: each product is rounded to 16 bits once (a [rows of a, cols of b] temporary), then summed in
        # fp32.
        acc += torch.mm(a, b)
    else:
        # CPU (tests, the interpreter) has no mixed-dtype GEMM: upcast the (slice-sized) operands.
        acc.addmm_(a.float(), b.float())


def _weight_slices(weight: torch.Tensor, dtype: torch.dtype):
    """A function yielding (start, stop, weight[start:stop] in `dtype`). The weight itself, in one slice, when it
    already has that dtype; else WEIGHT_SLICE_ROWS rows at a time cast into one reused buffer, so a wider weight
    never gets a whole 16-bit copy. Each call of the function walks the slices again (cast again)."""
    vocab = weight.shape[0]
    if weight.dtype == dtype:
        return lambda: iter([(0, vocab, weight)])
    rows = min(WEIGHT_SLICE_ROWS, vocab)
    buffer = torch.empty(rows, weight.shape[1], device=weight.device, dtype=dtype)

    def slices():
        for start in range(0, vocab, rows):
            stop = min(start + rows, vocab)
            yield start, stop, buffer[: stop - start].copy_(weight[start:stop])

    return slices


class _GradSinks:
    """Where each chunk's d logits goes: rows of d hidden, d weight, the d bias accumulator.

    d weight sums one product per chunk. An fp32 weight's gradient is its own fp32 accumulator. A weight in the
    GEMMs' 16-bit dtype takes the first chunk's product and then accumulates in place (cuBLAS adds in fp32 and rounds
    once per chunk, as Liger does): an fp32 accumulator would be V x H x 4 bytes more (2.1 GB at V=128256,
    H=4096), over the op's memory target; pass the fp32 master weight for fp32 accumulation. Only a 16-bit weight in
    another 16-bit dtype than hidden's gets an fp32 accumulator."""

    def __init__(self, dhidden, dweight, dbias, n_slices: int, chunk_rows: int, compute_dtype: torch.dtype):
        self.dhidden, self.dweight, self.dbias = dhidden, dweight, dbias
        self.dweight_acc = None
        self.first_chunk = True
        if dweight is not None:
            if dweight.dtype == torch.float32:
                self.dweight_acc = dweight.zero_()
            elif dweight.dtype == compute_dtype:
                self.dweight_acc = dweight  # written by the first chunk, then accumulated into
            else:
                self.dweight_acc = torch.zeros(dweight.shape, device=dweight.device, dtype=torch.float32)
        self.dhidden_acc = None
        if dhidden is not None and n_slices > 1:
            # d hidden sums one product per weight slice: in fp32, rounded once into d hidden.
            self.dhidden_acc = torch.empty(chunk_rows, dhidden.shape[1], device=dhidden.device, dtype=torch.float32)
        self.dbias_acc = None
        if dbias is not None:
            self.dbias_acc = torch.zeros(dbias.shape, device=dbias.device, dtype=torch.float32)

    def add_chunk(self, dlogits, h_chunk, weight_slices, start: int, stop: int) -> None:
        dh_acc = None if self.dhidden_acc is None else self.dhidden_acc[: stop - start].zero_()
        for v0, v1, w in weight_slices():
            d = dlogits[:, v0:v1]
            if self.dhidden is not None:
                if dh_acc is None:
                    torch.mm(d, w, out=self.dhidden[start:stop])
                else:
                    _addmm_fp32_(dh_acc, d, w)
            if self.dweight is not None:
                acc = self.dweight_acc[v0:v1]
                if acc.dtype != d.dtype:
                    _addmm_fp32_(acc, d.t(), h_chunk)
                elif self.first_chunk and acc.dtype != torch.float32:
                    torch.mm(d.t(), h_chunk, out=acc)
                else:
                    acc.addmm_(d.t(), h_chunk)
        self.first_chunk = False
        if dh_acc is not None:
            self.dhidden[start:stop].copy_(dh_acc)
        if self.dbias_acc is not None:
            self.dbias_acc += dlogits.sum(0, dtype=torch.float32)

    def finish(self) -> None:
        if self.first_chunk and self.dweight is not None:  # no rows at all: nothing was written
            self.dweight_acc.zero_()
        if self.dweight_acc is not None and self.dweight_acc is not self.dweight:
            self.dweight.copy_(self.dweight_acc)
        if self.dbias_acc is not None:
            self.dbias.copy_(self.dbias_acc)


def _logit_chunks(hidden, weight_slices, vocab: int, bias):
    """Plan the chunks of rows (from the memory budget) and return (generator, rows per chunk).
    The generator yields (start, stop, hidden rows, their logits) with every chunk's logits written into one reused
    buffer, so at most chunk x V logits exist at a time (rows padded to `padded_row_stride`; cuBLAS writes through
    the stride)."""
    n_rows = hidden.shape[0]
    chunk = plan_chunk_rows(n_rows, vocab, hidden.element_size(), chunk_budget_bytes(hidden.device))

    def chunks():
        rows = min(chunk, n_rows)
        buffer = torch.empty(rows, padded_row_stride(vocab), device=hidden.device, dtype=hidden.dtype)[:, :vocab]
        for start in range(0, n_rows, chunk):
            stop = min(start + chunk, n_rows)
            h_chunk, logits = hidden[start:stop], buffer[: stop - start]
            for v0, v1, w in weight_slices():
                if bias is None:
                    torch.mm(h_chunk, w.t(), out=logits[:, v0:v1])
                else:
                    torch.addmm(bias[v0:v1], h_chunk, w.t(), out=logits[:, v0:v1])
            yield start, stop, h_chunk, logits

    return chunks(), chunk


def _plan(hidden, weight, bias, dhidden, dweight, dbias, want_grad: bool):
    weight_slices = _weight_slices(weight, hidden.dtype)
    n_slices = -(-weight.shape[0] // min(WEIGHT_SLICE_ROWS, weight.shape[0])) if weight.dtype != hidden.dtype else 1
    chunks, chunk = _logit_chunks(hidden, weight_slices, weight.shape[0], bias)
    sinks = _GradSinks(dhidden, dweight, dbias, n_slices, chunk, hidden.dtype) if want_grad else None
    return chunks, weight_slices, sinks


def fused_forward(
    hidden, weight, labels, bias, ignore_index: int, label_smoothing: float, z_loss: float, softcap: float,
    losses, lse, hits, dhidden=None, dweight=None, dbias=None,
) -> None:
    """Fill losses, lse (fp32 [M]) and hits (int32 [M]); when dhidden [M, H], dweight [V, H] or dbias [V] are given,
    fill them with the gradients of sum(losses)."""
    want_grad = dhidden is not None or dweight is not None or dbias is not None
    chunks, weight_slices, sinks = _plan(hidden, weight, bias, dhidden, dweight, dbias, want_grad)
    for start, stop, h_chunk, logits in chunks:
        cross_entropy_rows(
            logits, labels[start:stop], ignore_index, label_smoothing, z_loss, softcap,
            loss=losses[start:stop], lse=lse[start:stop], hit=hits[start:stop],
            grad=logits if want_grad else None,
        )
        if want_grad:
            sinks.add_chunk(logits, h_chunk, weight_slices, start, stop)
    if want_grad:
        sinks.finish()


def fused_backward(
    grad_losses, hidden, weight, labels, bias, lse, ignore_index: int, label_smoothing: float, z_loss: float,
    softcap: float, dhidden=None, dweight=None, dbias=None,
) -> None:
    """Fill whichever of dhidden, dweight, dbias are given with the gradients of sum(grad_losses * losses),
    recomputing each chunk's logits (lse comes from the forward, so only the gradient sweep runs)."""
    chunks, weight_slices, sinks = _plan(hidden, weight, bias, dhidden, dweight, dbias, True)
    for start, stop, h_chunk, logits in chunks:
        cross_entropy_rows(
            logits, labels[start:stop], ignore_index, label_smoothing, z_loss, softcap,
            lse=lse[start:stop], grad=logits, row_scale=grad_losses[start:stop],
        )
        sinks.add_chunk(logits, h_chunk, weight_slices, start, stop)
    sinks.finish()
