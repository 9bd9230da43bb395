"""Masked cross-entropy on logits, and linear cross-entropy fused with the lm_head matmul.

Where it sits: the model's last step. `linear_cross_entropy(hidden, lm_head.weight, labels, loss_positions=...)` turns
the final hidden states into the loss (and the count of correct next-token predictions) without ever building the
[tokens x vocab] logits; `cross_entropy` is the same loss on logits someone already has. `use_triton` picks per call
(see `_backend`): the Triton path goes through the torch.library custom ops below, the only way the kernels in
`fastsft.kernels.cross_entropy` / `fastsft.kernels.linear_cross_entropy` are reached, so `torch.compile(fullgraph=True)`
traces through them; otherwise the plain-PyTorch reference runs and autograd differentiates it.

Semantics shared by every implementation (per non-ignored token t with target y):
    z      = softcap * tanh(logits / softcap) if softcap else logits
    lse    = logsumexp(z)
    loss_t = (1 - label_smoothing) * (lse - z[y]) + label_smoothing * (lse - mean(z)) + z_loss * lse^2
Ignored tokens (label == ignore_index, or loss_positions == -1) contribute 0 loss and 0 gradient.
reduction: "none" -> per-token [N] (0 where ignored); "sum"; "mean" -> sum / num_items if given, else
sum / max(count of non-ignored tokens, 1) (so a batch with every token ignored gives 0, never NaN).
num_items may be a number or a 0-d tensor (pass a tensor under torch.compile: a Python number is specialised).
Losses are fp32 whatever the input dtype; gradients come back in the inputs' dtypes.

Custom ops (softcap 0.0 = off; labels any integer dtype; every input already flattened to rows):
    fastsft::cross_entropy_fwd(logits, labels, ignore_index, label_smoothing, z_loss, softcap, inplace_backward)
        -> (losses [N], lse [N])                    one read of the logits
    fastsft::cross_entropy_bwd(grad_losses, logits, labels, lse, ...) -> dlogits      one read, one write
    fastsft::cross_entropy_bwd_inplace(grad_losses, logits!, labels, lse, ...)  the same, dlogits written over the
        logits (inplace_backward=True: the caller promises the logits are not needed after the loss)
  The gradient is computed in the backward from the saved logits and lse rather than in the forward: it needs the
  upstream gradient anyway, so computing it early would cost an extra read and write of [N, V] to scale it later.
    fastsft::linear_cross_entropy_sum(hidden, weight, labels, bias, ..., grad_hidden, grad_weight, grad_bias)
        -> (sum of losses, num_correct, dhidden, dweight, dbias)
  For reductions "sum" and "mean": the gradients of the summed loss are computed in the forward, chunk by chunk,
  while each chunk's logits exist (the only time they do); the backward multiplies them by the upstream scalar (one
  elementwise pass over d hidden and d weight: without a host sync the op cannot know that scalar is 1).
  Which gradients are computed follows requires_grad at the call (nothing when grad is disabled).
    fastsft::linear_cross_entropy_rows(hidden, weight, labels, bias, ...) -> (losses [M], lse [M], num_correct)
    fastsft::linear_cross_entropy_rows_bwd(grad_losses, hidden, weight, labels, bias, lse, ...) -> (dh, dW, db)
  For reduction "none", where each row's upstream gradient can differ: the backward recomputes the logits chunk by
  chunk (8 instead of 6 x N x H x V FLOPs).
Masked tokens: with `loss_positions` only those rows are gathered before any matmul (fixed shape: the bucket); the
kernels skip rows labelled ignore_index (filler, or every masked token when no loss_positions is given), but the
matmuls of those rows are still paid - see fastsft/kernels/linear_cross_entropy.py for why.

(Over 500 lines on purpose: both losses share the semantics above, the backend switch and the reference; splitting them
would repeat that contract.)
"""

from __future__ import annotations

import torch
from torch import nn

from fastsft.ops._backend import HAS_TRITON, use_triton

if HAS_TRITON:  # a Linux-only dependency: without it every op runs its reference (see _backend)
    from fastsft.kernels import cross_entropy as cross_entropy_kernels
    from fastsft.kernels import linear_cross_entropy as linear_cross_entropy_kernels

REDUCTIONS = ("mean", "sum", "none")

# ---------------------------------------------------------------------------------------------------------------
# References (plain PyTorch, differentiated by autograd)
# ---------------------------------------------------------------------------------------------------------------


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
    target = torch.where(valid, labels, torch.zeros_like(labels)).long()
    lse = torch.logsumexp(z, dim=-1)
    nll = lse - z.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    loss = nll
    if label_smoothing:
        loss = (1.0 - label_smoothing) * nll + label_smoothing * (lse - z.mean(-1))
    if z_loss:
        loss = loss + z_loss * lse.square()
    return torch.where(valid, loss, torch.zeros_like(loss)), valid


def _mean(total: torch.Tensor, valid: torch.Tensor, num_items) -> torch.Tensor:
    """total / num_items, or / the count of valid tokens (at least 1): computed on the device, no sync."""
    if num_items is None:
        return total / valid.sum().clamp(min=1)
    return total / num_items


def _reduce(losses: torch.Tensor, valid: torch.Tensor, reduction: str, num_items) -> torch.Tensor:
    if reduction == "none":
        return losses
    total = losses.sum()
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return _mean(total, valid, num_items)


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


# ---------------------------------------------------------------------------------------------------------------
# Custom ops around the Triton kernels
# ---------------------------------------------------------------------------------------------------------------


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """2-D [rows, last dim] with unit stride along the last dim; a view (no copy) whenever the layout allows one."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])


def _per_row(t: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(t.shape[0], device=t.device, dtype=dtype)


@torch.library.custom_op("fastsft::cross_entropy_fwd", mutates_args=())
def _cross_entropy_fwd(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
    softcap: float, inplace_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    losses, lse = _per_row(logits), _per_row(logits)
    cross_entropy_kernels.cross_entropy_rows(
        _as_rows(logits), labels, ignore_index, label_smoothing, z_loss, softcap, loss=losses, lse=lse
    )
    return losses, lse


@_cross_entropy_fwd.register_fake
def _(logits, labels, ignore_index, label_smoothing, z_loss, softcap, inplace_backward):
    return _per_row(logits), _per_row(logits)


@torch.library.custom_op("fastsft::cross_entropy_bwd", mutates_args=())
def _cross_entropy_bwd(
    grad_losses: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, ignore_index: int,
    label_smoothing: float, z_loss: float, softcap: float,
) -> torch.Tensor:
    dlogits = torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)
    cross_entropy_kernels.cross_entropy_rows(
        _as_rows(logits), labels, ignore_index, label_smoothing, z_loss, softcap,
        lse=lse, grad=dlogits, row_scale=grad_losses,
    )
    return dlogits


@_cross_entropy_bwd.register_fake
def _(grad_losses, logits, labels, lse, ignore_index, label_smoothing, z_loss, softcap):
    return torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)


@torch.library.custom_op("fastsft::cross_entropy_bwd_inplace", mutates_args=("logits",))
def _cross_entropy_bwd_inplace(
    grad_losses: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, ignore_index: int,
    label_smoothing: float, z_loss: float, softcap: float,
) -> None:
    if logits.dim() != 2 or logits.stride(-1) != 1:
        raise ValueError("fastsft::cross_entropy_bwd_inplace: logits must be 2-D with unit column stride, got shape "
                         f"{tuple(logits.shape)} and strides {logits.stride()}")
    cross_entropy_kernels.cross_entropy_rows(
        logits, labels, ignore_index, label_smoothing, z_loss, softcap, lse=lse, grad=logits, row_scale=grad_losses
    )


@_cross_entropy_bwd_inplace.register_fake
def _(grad_losses, logits, labels, lse, ignore_index, label_smoothing, z_loss, softcap):
    return None


def _cross_entropy_setup(ctx, inputs, output):
    logits, labels, ignore_index, label_smoothing, z_loss, softcap, inplace_backward = inputs
    _losses, lse = output
    ctx.save_for_backward(logits, labels, lse)
    ctx.options = (ignore_index, label_smoothing, z_loss, softcap)
    ctx.inplace_backward = inplace_backward
    ctx.mark_non_differentiable(lse)


def _cross_entropy_backward(ctx, grad_losses, _grad_lse):
    logits, labels, lse = ctx.saved_tensors
    if ctx.inplace_backward:
        _cross_entropy_bwd_inplace(grad_losses, logits, labels, lse, *ctx.options)
        dlogits = logits.detach()
    else:
        dlogits = _cross_entropy_bwd(grad_losses, logits, labels, lse, *ctx.options)
    return dlogits, None, None, None, None, None, None


_cross_entropy_fwd.register_autograd(_cross_entropy_backward, setup_context=_cross_entropy_setup)


def _grad_buffer(like: torch.Tensor | None, wanted: bool, device: torch.device) -> torch.Tensor:
    """A gradient output shaped like `like`, or an empty placeholder when that gradient is not computed."""
    if like is None or not wanted:
        return torch.empty(0, device=device)
    return torch.empty(like.shape, device=device, dtype=like.dtype)


def _grad_buffers(hidden, weight, bias, grad_hidden: bool, grad_weight: bool, grad_bias: bool):
    device = hidden.device
    return (_grad_buffer(hidden, grad_hidden, device), _grad_buffer(weight, grad_weight, device),
            _grad_buffer(bias, grad_bias, device))


@torch.library.custom_op("fastsft::linear_cross_entropy_sum", mutates_args=())
def _linear_cross_entropy_sum(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None, ignore_index: int,
    label_smoothing: float, z_loss: float, softcap: float, grad_hidden: bool, grad_weight: bool, grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_bias = grad_bias and bias is not None
    losses, lse, hits = _per_row(hidden), _per_row(hidden), _per_row(hidden, torch.int32)
    dhidden, dweight, dbias = _grad_buffers(hidden, weight, bias, grad_hidden, grad_weight, grad_bias)
    linear_cross_entropy_kernels.fused_forward(
        hidden, weight, labels, bias, ignore_index, label_smoothing, z_loss, softcap, losses, lse, hits,
        dhidden if grad_hidden else None, dweight if grad_weight else None, dbias if grad_bias else None,
    )
    return losses.sum(), hits.sum(dtype=torch.int64), dhidden, dweight, dbias


@_linear_cross_entropy_sum.register_fake
def _(hidden, weight, labels, bias, ignore_index, label_smoothing, z_loss, softcap, grad_hidden, grad_weight,
      grad_bias):
    return (hidden.new_empty((), dtype=torch.float32), hidden.new_empty((), dtype=torch.int64),
            *_grad_buffers(hidden, weight, bias, grad_hidden, grad_weight, grad_bias))


def _linear_cross_entropy_sum_setup(ctx, inputs, output):
    _total, num_correct, dhidden, dweight, dbias = output
    ctx.save_for_backward(dhidden, dweight, dbias)
    ctx.computed = inputs[-3:]  # grad_hidden, grad_weight, grad_bias
    ctx.handed_out = False
    ctx.mark_non_differentiable(num_correct, dhidden, dweight, dbias)
    # The backward reads only the loss's gradient; materialising zeros for the other outputs would allocate another
    # [V, H] (and [N, H]) tensor in every backward.
    ctx.set_materialize_grads(False)


def _scaled(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """grad * scale, in place when running eagerly: the buffer exists only to be returned, and a scaled copy of
    d weight would be another [V, H] tensor. While torch.compile / AOT autograd traces (functional or fake tensor
    subclasses) out of place: mutating a saved tensor in a traced backward is rejected, and Inductor reuses the dead
    buffer by itself."""
    if type(grad) is torch.Tensor and type(scale) is torch.Tensor:
        return grad.mul_(scale)
    return grad * scale


def _linear_cross_entropy_sum_backward(ctx, grad_total, *_unused):
    if ctx.handed_out:
        raise RuntimeError("linear_cross_entropy: backward ran twice through one forward (retain_graph=True); its "
                           "gradients are scaled in place and handed out once. Run the forward again instead.")
    ctx.handed_out = True
    dhidden, dweight, dbias = ctx.saved_tensors
    grad_hidden, grad_weight, grad_bias = ctx.computed
    # The forward computed the gradients of the summed loss; the upstream gradient is one scalar.
    return (
        _scaled(dhidden, grad_total) if grad_hidden else None,
        _scaled(dweight, grad_total) if grad_weight else None,
        None,
        _scaled(dbias, grad_total) if grad_bias else None,
        None, None, None, None, None, None, None,
    )


_linear_cross_entropy_sum.register_autograd(
    _linear_cross_entropy_sum_backward, setup_context=_linear_cross_entropy_sum_setup
)


@torch.library.custom_op("fastsft::linear_cross_entropy_rows", mutates_args=())
def _linear_cross_entropy_rows(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None, ignore_index: int,
    label_smoothing: float, z_loss: float, softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    losses, lse, hits = _per_row(hidden), _per_row(hidden), _per_row(hidden, torch.int32)
    linear_cross_entropy_kernels.fused_forward(
        hidden, weight, labels, bias, ignore_index, label_smoothing, z_loss, softcap, losses, lse, hits
    )
    return losses, lse, hits.sum(dtype=torch.int64)


@_linear_cross_entropy_rows.register_fake
def _(hidden, weight, labels, bias, ignore_index, label_smoothing, z_loss, softcap):
    return _per_row(hidden), _per_row(hidden), hidden.new_empty((), dtype=torch.int64)


@torch.library.custom_op("fastsft::linear_cross_entropy_rows_bwd", mutates_args=())
def _linear_cross_entropy_rows_bwd(
    grad_losses: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
    bias: torch.Tensor | None, lse: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
    softcap: float, grad_hidden: bool, grad_weight: bool, grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_bias = grad_bias and bias is not None
    dhidden, dweight, dbias = _grad_buffers(hidden, weight, bias, grad_hidden, grad_weight, grad_bias)
    linear_cross_entropy_kernels.fused_backward(
        grad_losses, hidden, weight, labels, bias, lse, ignore_index, label_smoothing, z_loss, softcap,
        dhidden if grad_hidden else None, dweight if grad_weight else None, dbias if grad_bias else None,
    )
    return dhidden, dweight, dbias


@_linear_cross_entropy_rows_bwd.register_fake
def _(grad_losses, hidden, weight, labels, bias, lse, ignore_index, label_smoothing, z_loss, softcap, grad_hidden,
      grad_weight, grad_bias):
    return _grad_buffers(hidden, weight, bias, grad_hidden, grad_weight, grad_bias)


def _linear_cross_entropy_rows_setup(ctx, inputs, output):
    hidden, weight, labels, bias, ignore_index, label_smoothing, z_loss, softcap = inputs
    _losses, lse, num_correct = output
    ctx.save_for_backward(hidden, weight, labels, bias, lse)
    ctx.options = (ignore_index, label_smoothing, z_loss, softcap)
    ctx.mark_non_differentiable(lse, num_correct)


def _linear_cross_entropy_rows_backward(ctx, grad_losses, _grad_lse, _grad_num_correct):
    hidden, weight, labels, bias, lse = ctx.saved_tensors
    need_hidden, need_weight, _, need_bias = ctx.needs_input_grad[:4]
    dhidden, dweight, dbias = _linear_cross_entropy_rows_bwd(
        grad_losses, hidden, weight, labels, bias, lse, *ctx.options, need_hidden, need_weight, need_bias
    )
    return (dhidden if need_hidden else None, dweight if need_weight else None, None,
            dbias if need_bias and bias is not None else None, None, None, None, None)


_linear_cross_entropy_rows.register_autograd(
    _linear_cross_entropy_rows_backward, setup_context=_linear_cross_entropy_rows_setup
)


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------


def _check_options(op: str, reduction: str, label_smoothing: float, z_loss: float, softcap, num_items) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction={reduction!r}; use one of {', '.join(map(repr, REDUCTIONS))}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"{op}: label_smoothing={label_smoothing} must be in [0, 1)")
    if z_loss < 0.0:
        raise ValueError(f"{op}: z_loss={z_loss} must be >= 0 (0 turns it off)")
    if softcap is not None and not softcap > 0.0:
        raise ValueError(f"{op}: softcap={softcap} must be > 0, or None to turn it off")
    if isinstance(num_items, torch.Tensor):
        if num_items.dim() != 0:
            raise ValueError(f"{op}: num_items must be a number or a 0-d tensor, got shape {tuple(num_items.shape)}")
    elif num_items is not None and not num_items > 0:
        raise ValueError(f"{op}: num_items={num_items} must be positive (the supervised-token count of the step)")


def _check_labels(op: str, labels: torch.Tensor, n_rows: int, what: str, device: torch.device) -> None:
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{op}: labels must be an integer tensor (token ids, ignore_index where masked), got "
                         f"{labels.dtype}")
    if labels.numel() != n_rows:
        raise ValueError(f"{op}: labels has {labels.numel()} entries (shape {tuple(labels.shape)}) but {what} has "
                         f"{n_rows} rows; pass one label per row (already shifted: the batch contract)")
    if labels.device != device:
        raise ValueError(f"{op}: labels are on {labels.device} but the inputs on {device}; move them to one device")


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
    """Cross-entropy of logits [..., V] against labels [...] (see the module docstring for the exact loss).

    inplace_backward=True writes d logits over the logits buffer in the backward (saves an [N, V] allocation); only
    when nothing else reads those logits after the loss (autograd raises if a saved copy of them is touched later).
    Returns fp32: [N] per row for reduction "none", else a 0-d tensor."""
    if logits.dim() == 0 or not logits.is_floating_point():
        raise ValueError(f"cross_entropy: logits must be a floating-point tensor [..., vocab], got {logits.dtype} of "
                         f"shape {tuple(logits.shape)}")
    _check_options("cross_entropy", reduction, label_smoothing, z_loss, softcap, num_items)
    _check_labels("cross_entropy", labels, logits.numel() // max(logits.shape[-1], 1), "logits", logits.device)
    if not use_triton(logits, labels):
        return cross_entropy_reference(
            logits, labels, ignore_index, reduction, label_smoothing, z_loss, softcap, num_items, inplace_backward
        )
    rows, labels = _as_rows(logits), labels.reshape(-1)
    losses, _lse = _cross_entropy_fwd(
        rows, labels, ignore_index, float(label_smoothing), float(z_loss), float(softcap or 0.0), inplace_backward
    )
    return _reduce(losses, labels != ignore_index, reduction, num_items)


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
    """cross_entropy(hidden @ weight.T + bias, labels) without building the logits.

    hidden [..., H], weight [V, H] (the lm_head), labels [...] already shifted, bias [V] or None. loss_positions
    [bucket] int (the loader's: supervised positions, then -1 filler) restricts the work to those rows before any
    matmul; reduction "none" then returns one loss per bucket entry. With return_num_correct, returns
    (loss, num_correct): int64 0-d count of supervised tokens whose argmax logit (first maximum) is the label.
    The matmuls run in hidden's dtype, like autocast: a wider weight (fp32 master weights) is cast slice by slice
    inside the op and its gradient comes back in its own dtype, accumulated there directly."""
    op = "linear_cross_entropy"
    if hidden.dim() == 0 or not hidden.is_floating_point():
        raise ValueError(f"{op}: hidden must be a floating-point tensor [..., hidden_size], got {hidden.dtype} of "
                         f"shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{op}: weight has shape {tuple(weight.shape)} but hidden has shape {tuple(hidden.shape)}; "
                         f"weight must be [vocab, {hidden.shape[-1]}] (the lm_head weight, not transposed)")
    if weight.device != hidden.device:
        raise ValueError(f"{op}: weight is on {weight.device} but hidden on {hidden.device}; move both to one device")
    if bias is not None and (bias.shape != weight.shape[:1] or bias.device != hidden.device):
        raise ValueError(f"{op}: bias must be [{weight.shape[0]}] on {hidden.device}, got shape {tuple(bias.shape)} "
                         f"on {bias.device}")
    _check_options(op, reduction, label_smoothing, z_loss, softcap, num_items)
    _check_labels(op, labels, hidden.numel() // max(hidden.shape[-1], 1), "hidden", hidden.device)
    if loss_positions is not None and (loss_positions.dim() != 1 or loss_positions.is_floating_point()):
        raise ValueError(f"{op}: loss_positions must be a 1-D integer tensor [bucket] (positions, then -1 filler), "
                         f"got {loss_positions.dtype} of shape {tuple(loss_positions.shape)}")
    if not use_triton(hidden, weight, labels):
        return linear_cross_entropy_reference(
            hidden, weight, labels, bias, ignore_index, reduction, label_smoothing, z_loss, softcap,
            loss_positions, num_items, return_num_correct,
        )
    h, y = gather_loss_positions(hidden, labels, loss_positions, ignore_index)
    # A wider weight (the fp32 master lm_head weight under bf16 autocast) goes in as it is: the op casts it in slices
    # for its GEMMs and accumulates straight into its fp32 gradient, never a [V, H] copy. The bias is small: cast.
    if bias is not None and bias.dtype != h.dtype:
        bias = bias.to(h.dtype)
    options = (ignore_index, float(label_smoothing), float(z_loss), float(softcap or 0.0))
    if reduction == "none":
        loss, _lse, num_correct = _linear_cross_entropy_rows(h, weight, y, bias, *options)
    else:
        grad_on = torch.is_grad_enabled()
        total, num_correct, _dh, _dw, _db = _linear_cross_entropy_sum(
            h, weight, y, bias, *options,
            grad_on and h.requires_grad, grad_on and weight.requires_grad,
            grad_on and bias is not None and bias.requires_grad,
        )
        loss = total if reduction == "sum" else _mean(total, y != ignore_index, num_items)
    return (loss, num_correct) if return_num_correct else loss


class CrossEntropyLoss(nn.Module):
    """`cross_entropy` with its options fixed at construction; forward(logits, labels, num_items=None)."""

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
    """`linear_cross_entropy` with its options fixed at construction; forward(hidden, weight, labels, bias=None,
    loss_positions=None, num_items=None, return_num_correct=False). Holds no weight: pass the lm_head's."""

    def __init__(self, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None):
        super().__init__()
        self.ignore_index, self.reduction = ignore_index, reduction
        self.label_smoothing, self.z_loss, self.softcap = label_smoothing, z_loss, softcap

    def forward(self, hidden, weight, labels, bias=None, loss_positions=None, num_items=None,
                return_num_correct=False):
        return linear_cross_entropy(hidden, weight, labels, bias, self.ignore_index, self.reduction,
                                    self.label_smoothing, self.z_loss, self.softcap, loss_positions, num_items,
                                    return_num_correct)
