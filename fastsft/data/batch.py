"""The batch contract: the seam between the loader (`fastsft.data`) and the model (`fastsft.model`).

One micro-batch is one packed row of exactly `seq_len` tokens, no batch dimension (what FlashAttention varlen wants):

- input_ids      [seq_len] int64  documents back to back, padding (PAD_ID) in the tail only.
- position_ids   [seq_len] int32  restart at 0 at every segment (each document, and the padding tail).
- labels         [seq_len] int64  already shifted: labels[t] is the next token of the same document when that token
                                  carries loss, else IGNORE_INDEX. No target crosses a document boundary; padding
                                  never carries loss. The model does no shifting.
- cu_seqlens     [n] int32        cu_seqlens[0] = 0, then the end offset of each document; when the row has padding,
                                  the padding tail is one more segment, so cu_seqlens[-1] == seq_len ALWAYS and every
                                  position lies in exactly one segment (attention output is defined everywhere: no NaN
                                  or uninitialised rows leak into gradients). Unused tail entries repeat seq_len
                                  (empty segments). n is the smallest of `cu_seqlens_lengths(max_docs)` (at most
                                  BOUND_LEVELS values, the largest max_docs + 2) that holds the row's segments, so
                                  attention launches no work for segments that are not there; with
                                  PackedLoader(bound_attention=False), always max_docs + 2.
- max_seqlen     Python int        the smallest of `max_seqlen_levels(seq_len)` (at most BOUND_LEVELS values, the
                                  largest seq_len) >= the row's longest segment: FlashAttention's grid is sized by it.
                                  A few values, so compiled code sees a few shapes and goes dynamic once
                                  (tests/test_loss_bucket_and_bounds.py counts the compilations); seq_len without bounds.
- loss_positions [bucket] int32    the positions t with labels[t] != IGNORE_INDEX, ascending, then LOSS_POSITION_FILL
                                  (-1) up to the fixed bucket size. Ops gather with clamp(min=0) and treat -1 as
                                  ignored, so the loss skips masked tokens with no device-to-host sync, and only
                                  `bucket` rows go through the lm_head (the trainer chooses it from the data:
                                  PackedLoader(loss_bucket="auto")).
- num_loss_tokens Python int       this micro-batch's count of supervised positions (the loader knows it; the trainer
                                  sums it over the optimizer step and all ranks and divides the summed loss by that).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

IGNORE_INDEX = -100
LOSS_POSITION_FILL = -1
PAD_ID = 0

TENSOR_FIELDS = ("input_ids", "position_ids", "labels", "cu_seqlens", "loss_positions")


@dataclass
class Batch:
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    loss_positions: torch.Tensor
    num_loss_tokens: int
    num_tokens: int = 0  # non-padding tokens in the row (for throughput accounting)
    num_docs: int = 0  # documents in the row
    virtual_tokens: int = 0  # slots before each document for prompt/P-tuning (fastsft/adapters/prompt.py)

    def to(self, device, non_blocking: bool = True) -> Batch:
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in TENSOR_FIELDS:
            kw[name] = kw[name].to(device, non_blocking=non_blocking)
        return Batch(**kw)

    def pin_memory(self) -> Batch:
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in TENSOR_FIELDS:
            kw[name] = kw[name].pin_memory()
        return Batch(**kw)

    def model_inputs(self) -> dict:
        """Keyword arguments for `Transformer.forward` / `Transformer.logits`."""
        return dict(
            input_ids=self.input_ids,
            position_ids=self.position_ids,
            cu_seqlens=self.cu_seqlens,
            max_seqlen=self.max_seqlen,
        )


# ------------------------------------------------------------------------------------------- attention bounds

BOUND_LEVELS = 4  # max_seqlen and the cu_seqlens length each take one of this many values per loader configuration


def max_seqlen_levels(seq_len: int) -> list[int]:
    """The values max_seqlen takes: ceil(seq_len / 2**k) for k < BOUND_LEVELS, ascending (seq_len 8192: 1024, 2048,
    4096, 8192)."""
    return sorted({-(-seq_len // (1 << k)) for k in range(BOUND_LEVELS)})


def cu_seqlens_lengths(max_docs: int) -> list[int]:
    """The lengths cu_seqlens takes: ceil(max_docs / 2**k) + 2 for k < BOUND_LEVELS, ascending (max_docs 256: 34, 66,
    130, 258). The largest, max_docs + 2, holds any row."""
    return sorted({-(-max_docs // (1 << k)) + 2 for k in range(BOUND_LEVELS)})


def attention_bounds(cu_seqlens, num_docs: int, seq_len: int, max_docs: int) -> tuple[int, int]:
    """(cu_seqlens length, max_seqlen) for one row: the smallest listed length that holds the row's segments (its
    documents, the padding tail when there is one, and the leading 0), and the smallest listed max_seqlen >= its
    longest segment. `cu_seqlens`: the row's full-length offsets (host memory, numpy or a CPU tensor)."""
    entries = num_docs + 1 + (int(cu_seqlens[num_docs]) < seq_len)
    length = next(n for n in cu_seqlens_lengths(max_docs) if n >= entries)
    ends = np.asarray(cu_seqlens[:entries], dtype=np.int64)
    longest = int(np.diff(ends).max()) if entries > 1 else 0
    max_seqlen = next(m for m in max_seqlen_levels(seq_len) if m >= longest)
    return length, max_seqlen
