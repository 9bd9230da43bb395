"""Masked cross-entropy on logits, and linear cross-entropy fused with the lm_head matmul.

Public functional API (`cross_entropy`, `linear_cross_entropy`), plain-PyTorch references with the same
signatures, and the `CrossEntropyLoss` / `LinearCrossEntropyLoss` modules. Triton kernels live in
`fastsft.kernels.cross_entropy` and `fastsft.kernels.linear_cross_entropy`.

Semantics shared by every implementation (per non-ignored token t with target y):
    z      = softcap * tanh(logits / softcap) if softcap else logits
    lse    = logsumexp(z)
    loss_t = (1 - label_smoothing) * (lse - z[y]) + label_smoothing * (lse - mean(z)) + z_loss * lse^2
Ignored tokens (label == ignore_index, or loss_positions == -1) contribute 0 loss and 0 gradient.
reduction: "none" -> per-token [N] (0 where ignored); "sum"; "mean" -> sum / num_items if given, else
sum / max(count of non-ignored tokens, 1) (so a batch with every token ignored gives 0, never NaN).
num_items may be a number or a 0-d tensor (pass a tensor under torch.compile: a Python number is specialised).

TODO(issue 3): the Triton paths as torch.library.custom_op with fake + autograd registrations.
"""

from __future__ import annotations

import torch
from torch import nn


def _token_losses(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token losses [N] in fp32 (0 where ignored) and the mask of valid tokens."""
    z = logits.float()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    valid = labels != ignore_index
    target = torch.where(valid, labels, torch.zeros_like(labels))
    lse = torch.logsumexp(z, dim=-1)
    nll = lse - z.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    loss = nll
    if label_smoothing:
        loss = (1.0 - label_smoothing) * nll + label_smoothing * (lse - z.mean(-1))
    if z_loss:
        loss = loss + z_loss * lse.square()
    return torch.where(valid, loss, torch.zeros_like(loss)), valid


def _reduce(losses: torch.Tensor, valid: torch.Tensor, reduction: str, num_items) -> torch.Tensor:
    if reduction == "none":
        return losses
    total = losses.sum()
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if num_items is None:
        return total / valid.sum().clamp(min=1)
    return total / num_items


def cross_entropy_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    num_items=None,
    inplace_backward: bool = False,
) -> torch.Tensor:
    logits = logits.reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1)
    losses, valid = _token_losses(logits, labels, ignore_index, label_smoothing, z_loss, softcap)
    return _reduce(losses, valid, reduction, num_items)


def gather_loss_positions(
    hidden: torch.Tensor, labels: torch.Tensor, loss_positions: torch.Tensor | None, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten to [N, H] / [N]; with loss_positions ([bucket], -1 = filler) gather only those rows."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    if loss_positions is None:
        return hidden, labels
    idx = loss_positions.long().clamp(min=0)
    keep = loss_positions >= 0
    picked = labels.index_select(0, idx)
    return hidden.index_select(0, idx), torch.where(keep, picked, torch.full_like(picked, ignore_index))


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    loss_positions: torch.Tensor | None = None,
    num_items=None,
    return_num_correct: bool = False,
):
    """cross_entropy(hidden @ weight.T + bias, labels), materializing the logits (fp32). With return_num_correct,
    returns (loss, num_correct) where num_correct is an int64 0-d tensor: argmax(logits) == label over valid tokens.
    With loss_positions and reduction="none", the per-token losses are per bucket entry ([bucket])."""
    h, y = gather_loss_positions(hidden, labels, loss_positions, ignore_index)
    logits = h.float() @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    losses, valid = _token_losses(logits, y, ignore_index, label_smoothing, z_loss, softcap)
    loss = _reduce(losses, valid, reduction, num_items)
    if not return_num_correct:
        return loss
    num_correct = ((logits.argmax(-1) == y) & valid).sum()
    return loss, num_correct


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    num_items=None,
    inplace_backward: bool = False,
) -> torch.Tensor:
    return cross_entropy_reference(
        logits, labels, ignore_index, reduction, label_smoothing, z_loss, softcap, num_items, inplace_backward
    )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    loss_positions: torch.Tensor | None = None,
    num_items=None,
    return_num_correct: bool = False,
):
    return linear_cross_entropy_reference(
        hidden, weight, labels, bias, ignore_index, reduction, label_smoothing, z_loss, softcap,
        loss_positions, num_items, return_num_correct,
    )


class CrossEntropyLoss(nn.Module):
    def __init__(self, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None,
                 inplace_backward=False):
        super().__init__()
        self.ignore_index, self.reduction = ignore_index, reduction
        self.label_smoothing, self.z_loss, self.softcap = label_smoothing, z_loss, softcap
        self.inplace_backward = inplace_backward

    def forward(self, logits, labels, num_items=None):
        return cross_entropy(logits, labels, self.ignore_index, self.reduction, self.label_smoothing, self.z_loss,
                             self.softcap, num_items, self.inplace_backward)


class LinearCrossEntropyLoss(nn.Module):
    def __init__(self, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None):
        super().__init__()
        self.ignore_index, self.reduction = ignore_index, reduction
        self.label_smoothing, self.z_loss, self.softcap = label_smoothing, z_loss, softcap

    def forward(self, hidden, weight, labels, bias=None, loss_positions=None, num_items=None,
                return_num_correct=False):
        return linear_cross_entropy(hidden, weight, labels, bias, self.ignore_index, self.reduction,
                                    self.label_smoothing, self.z_loss, self.softcap, loss_positions, num_items,
                                    return_num_correct)
