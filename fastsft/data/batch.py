"""The batch contract: the seam between the loader (`fastsft.data`) and the model (`fastsft.model`).

One micro-batch is one packed row of exactly `seq_len` tokens, no batch dimension (what FlashAttention varlen wants):

- input_ids      [seq_len] int64  documents back to back, padding (PAD_ID) in the tail only.
- position_ids   [seq_len] int32  restart at 0 at every segment (each document, and the padding tail).
- labels         [seq_len] int64  already shifted: labels[t] is the next token of the same document when that token
                                  carries loss, else IGNORE_INDEX. No target crosses a document boundary; padding
                                  never carries loss. The model does no shifting.
- cu_seqlens     [max_docs + 2] int32  FIXED length. cu_seqlens[0] = 0, then the end offset of each document; when the
                                  row has padding, the padding tail is one more segment, so cu_seqlens[-1] == seq_len
                                  ALWAYS and every position lies in exactly one segment (attention output is defined
                                  everywhere: no NaN or uninitialised rows leak into gradients). Unused tail entries
                                  repeat seq_len (empty segments). Length is max_docs + 2: up to max_docs documents,
                                  one padding segment, and the leading 0.
- max_seqlen     Python int        a fixed bound (seq_len), so compiled code stays static.
- loss_positions [bucket] int32    the positions t with labels[t] != IGNORE_INDEX, ascending, then LOSS_POSITION_FILL
                                  (-1) up to the fixed bucket size. Ops gather with clamp(min=0) and treat -1 as
                                  ignored, so the loss skips masked tokens with no device-to-host sync.
- num_loss_tokens Python int       this micro-batch's count of supervised positions (the loader knows it; the trainer
                                  sums it over the optimizer step and all ranks and divides the summed loss by that).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

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
