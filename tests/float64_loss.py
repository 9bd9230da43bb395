"""Shared by the cross-entropy tests: reduce float64 per-token losses like the ops do, and run the backward."""



def reduce_and_backward(losses, valid, reduction, row_weights=None, num_items=None):
    """The loss for `reduction` ("none" seeds the backward with row_weights; "mean" divides by num_items or the
    count of valid tokens, at least 1), after calling backward on it. Returns the detached loss."""
    if reduction == "none":
        loss = losses
        (losses * row_weights.double()).sum().backward()
    else:
        loss = losses.sum()
        if reduction == "mean":
            loss = loss / (num_items if num_items is not None else valid.sum().clamp(min=1))
        loss.backward()
    return loss.detach()
