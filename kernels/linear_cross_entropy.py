"""Linear cross-entropy in chunks of tokens: the lm_head matmul fused with the loss, never an [N, V] tensor.

Sits under `fastsft.ops.cross_entropy`, which wraps these launchers as torch.library custom ops; nothing else should
call them. Inputs are already gathered (only the rows that carry loss, plus filler rows labelled ignore_index),
2-D, with hidden and weight in one dtype.

For each chunk of C tokens (C chosen by `plan_chunk_rows` from a memory budget, the one place it is decided):
    logits = h_c @ W^T (+ b)          cuBLAS into one reused [C, V] buffer (16-bit in, fp32 accumulate)
    kernel sweep 1: loss, lse, argmax hit per row (fastsft.kernels.cross_entropy, fp32 arithmetic)
    kernel sweep 2: d loss / d logits written over the logits in the same buffer
    dh_c  = dlogits @ W               straight into the chunk's rows of d hidden
    dW   += dlogits^T @ h_c           accumulated in fp32 (see `_accumulate_dweight`)
    db   += column sums of dlogits    fp32
`fused_forward` does this while computing the loss (gradients of sum(losses), so the backward of a "sum"/"mean" loss
only multiplies them by one scalar: 6 x N x H x V FLOPs in all, the floor). `fused_backward` recomputes each chunk's
logits with lse saved by the forward and per-row upstream gradients (for reduction "none", whose rows can carry
different weights): 8 x N x H x V FLOPs.

Memory beyond the inputs and the returned gradients: the one [C, V] logits buffer (at most the chunk budget), and,
when the weight is 16-bit and there is more than one chunk, the fp32 d weight accumulator (V x H x 4 bytes, alive
during the call; one chunk needs none, fp32 weights accumulate in place). Fewer, larger chunks also mean fewer passes
of the dW GEMM over that accumulator. The budget is FASTSFT_LCE_CHUNK_MB or DEFAULT_CHUNK_BYTES.

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

# Default memory for one chunk of logits. 512 MiB holds 2048 rows of a 128k bf16 vocabulary: GEMMs of that height
# already run at the cuBLAS peak, and the buffer stays a small fraction of an 80 GB GPU. FASTSFT_LCE_CHUNK_MB
# overrides it (tests use it to force several chunks on tiny problems).
DEFAULT_CHUNK_BYTES = 512 * 2**20
# Chunk heights above this are rounded down to a multiple of it, so every chunk GEMM gets tile-friendly shapes.
ROW_ALIGN = 128
# Row stride of the logits buffer, in elements: a multiple of 16 whatever the vocabulary (50257 -> 50272), so every
# row starts 32-byte aligned and the kernel's full blocks compile to vector loads and stores (Triton specialises a
# stride divisible by 16; an odd one makes every access scalar). The padding columns are never read or written.
ROW_STRIDE_MULTIPLE = 16


def padded_row_stride(vocab: int) -> int:
    return -(-vocab // ROW_STRIDE_MULTIPLE) * ROW_STRIDE_MULTIPLE


def chunk_budget_bytes() -> int:
    value = os.environ.get("FASTSFT_LCE_CHUNK_MB", "").strip()
    if not value:
        return DEFAULT_CHUNK_BYTES
    try:
        megabytes = float(value)
    except ValueError:
        raise ValueError(f"FASTSFT_LCE_CHUNK_MB={value!r} is not a number of megabytes (e.g. 512)") from None
    if megabytes <= 0:
        raise ValueError(f"FASTSFT_LCE_CHUNK_MB={value!r} must be positive")
    return int(megabytes * 2**20)


def plan_chunk_rows(n_rows: int, vocab: int, elem_size: int, budget_bytes: int | None = None) -> int:
    """Tokens per chunk: as many [vocab] logit rows as fit the budget, at least 1, at most n_rows."""
    budget = chunk_budget_bytes() if budget_bytes is None else budget_bytes
    rows = max(1, budget // max(padded_row_stride(vocab) * elem_size, 1))
    if rows > ROW_ALIGN:
        rows -= rows % ROW_ALIGN
    return max(1, min(rows, n_rows))


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
        # Older torch: each chunk's product is rounded to 16 bits once, then summed in fp32.
        acc += torch.mm(a, b)
    else:
        # CPU (tests, the interpreter) has no mixed-dtype GEMM: upcast; speed does not matter there.
        acc.addmm_(a.float(), b.float())


class _GradSinks:
    """Where each chunk's d logits goes: rows of d hidden, the d weight accumulator, the d bias accumulator."""

    def __init__(self, dhidden, dweight, dbias, n_chunks: int):
        self.dhidden, self.dweight, self.dbias = dhidden, dweight, dbias
        self.dweight_acc = None
        if dweight is not None:
            if dweight.dtype == torch.float32:
                self.dweight_acc = dweight.zero_()
            elif n_chunks != 1:
                # 16-bit weights: summing per-chunk products in 16 bits would round once per chunk; an fp32
                # accumulator costs V x H x 4 bytes for the duration of the call. (No chunks at all: it is the
                # zeros that get copied out.)
                self.dweight_acc = torch.zeros(dweight.shape, device=dweight.device, dtype=torch.float32)
        self.dbias_acc = None
        if dbias is not None:
            self.dbias_acc = torch.zeros(dbias.shape, device=dbias.device, dtype=torch.float32)

    def add_chunk(self, dlogits, h_chunk, weight, start: int, stop: int) -> None:
        if self.dhidden is not None:
            torch.mm(dlogits, weight, out=self.dhidden[start:stop])
        if self.dweight is not None:
            if self.dweight_acc is None:  # one chunk: a single GEMM, fp32 accumulation inside cuBLAS
                torch.mm(dlogits.t(), h_chunk, out=self.dweight)
            elif self.dweight_acc.dtype == dlogits.dtype:
                self.dweight_acc.addmm_(dlogits.t(), h_chunk)
            else:
                _addmm_fp32_(self.dweight_acc, dlogits.t(), h_chunk)
        if self.dbias_acc is not None:
            self.dbias_acc += dlogits.sum(0, dtype=torch.float32)

    def finish(self) -> None:
        if self.dweight_acc is not None and self.dweight_acc is not self.dweight:
            self.dweight.copy_(self.dweight_acc)
        if self.dbias_acc is not None:
            self.dbias.copy_(self.dbias_acc)


def _chunk_logits(h_chunk, weight, bias, out) -> torch.Tensor:
    if bias is None:
        return torch.mm(h_chunk, weight.t(), out=out)
    return torch.addmm(bias, h_chunk, weight.t(), out=out)


def _logit_chunks(hidden, weight, bias):
    """Plan the chunks of rows (from the memory budget) and return (generator, number of chunks). The generator
    yields (start, stop, hidden rows, their logits) with every chunk's logits written into one reused buffer, so
    at most chunk x V logits exist at a time (rows padded to `padded_row_stride`; cuBLAS writes through the stride)."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    chunk = plan_chunk_rows(n_rows, vocab, hidden.element_size())

    def chunks():
        rows = min(chunk, n_rows)
        buffer = torch.empty(rows, padded_row_stride(vocab), device=hidden.device, dtype=hidden.dtype)[:, :vocab]
        for start in range(0, n_rows, chunk):
            stop = min(start + chunk, n_rows)
            h_chunk = hidden[start:stop]
            yield start, stop, h_chunk, _chunk_logits(h_chunk, weight, bias, buffer[: stop - start])

    return chunks(), -(-n_rows // chunk)


def fused_forward(
    hidden, weight, labels, bias, ignore_index: int, label_smoothing: float, z_loss: float, softcap: float,
    losses, lse, hits, dhidden=None, dweight=None, dbias=None,
) -> None:
    """Fill losses, lse (fp32 [M]) and hits (int32 [M]); when dhidden [M, H], dweight [V, H] or dbias [V] are given,
    fill them with the gradients of sum(losses)."""
    want_grad = dhidden is not None or dweight is not None or dbias is not None
    chunks, n_chunks = _logit_chunks(hidden, weight, bias)
    sinks = _GradSinks(dhidden, dweight, dbias, n_chunks) if want_grad else None
    for start, stop, h_chunk, logits in chunks:
        cross_entropy_rows(
            logits, labels[start:stop], ignore_index, label_smoothing, z_loss, softcap,
            loss=losses[start:stop], lse=lse[start:stop], hit=hits[start:stop],
            grad=logits if want_grad else None,
        )
        if want_grad:
            sinks.add_chunk(logits, h_chunk, weight, start, stop)
    if want_grad:
        sinks.finish()


def fused_backward(
    grad_losses, hidden, weight, labels, bias, lse, ignore_index: int, label_smoothing: float, z_loss: float,
    softcap: float, dhidden=None, dweight=None, dbias=None,
) -> None:
    """Fill whichever of dhidden, dweight, dbias are given with the gradients of sum(grad_losses * losses),
    recomputing each chunk's logits (lse comes from the forward, so only the gradient sweep runs)."""
    chunks, n_chunks = _logit_chunks(hidden, weight, bias)
    sinks = _GradSinks(dhidden, dweight, dbias, n_chunks)
    for start, stop, h_chunk, logits in chunks:
        cross_entropy_rows(
            logits, labels[start:stop], ignore_index, label_smoothing, z_loss, softcap,
            lse=lse[start:stop], grad=logits, row_scale=grad_losses[start:stop],
        )
        sinks.add_chunk(logits, h_chunk, weight, start, stop)
    sinks.finish()
