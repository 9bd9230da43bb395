"""Patch a loaded transformers causal LM (Llama, Mistral, Qwen2, Qwen3) to train with fastsft's fused ops.

Where it sits: outside fastsft's own model and trainer. A user who keeps the transformers `Trainer`, TRL or a
hand-written loop calls `apply(model)` once after loading; nothing else changes.

What `apply` does to that one model instance (never to the model classes, so other models are untouched):

- rms_norm=True: every RMSNorm module of the architecture (the per-layer norms, the final norm and, in Qwen3, the
  per-head q/k norms) becomes `fastsft.ops.RMSNorm` holding the very same weight Parameter. Parameter names,
  `state_dict()` keys and `save_pretrained` output are unchanged; optimizers built before or after see the same
  tensors. In fp32 the reference path gives transformers' output bit for bit (the kernels: to fp32 rounding); in
  bf16/fp16 fastsft normalizes and scales in fp32 and rounds once, where transformers rounds the normalized value
  and then multiplies by the weight.
- loss=True: the instance's `forward` is wrapped. In training mode (`model.train()`), a call with `labels` (or
  `shift_labels`) runs the decoder to its last hidden states and computes the loss with
  `fastsft.ops.linear_cross_entropy(hidden, lm_head.weight, shifted labels)`: the [tokens x vocab] logits are never
  materialized, and the returned output has `logits=None`. Every other call (no labels, eval mode, a custom
  `model.loss_function`, `logits_to_keep` set, an lm_head wrapped since) goes to the original forward, so
  generation, evaluation with `compute_metrics` and plain inference return logits exactly as before.

The loss has transformers' `ForCausalLMLoss` semantics: labels are shifted inside (labels[t + 1] is the target of
position t, the last position gets -100), or `shift_labels` is used as given; the mean is over tokens whose target
is not `ignore_index`, or sum / `num_items_in_batch` when that is passed (the `Trainer` passes it when it
accumulates gradients, so N accumulated micro-batches give the loss of one big batch). A batch whose targets are all
ignored gives a loss of 0 (transformers gives NaN).

Padding-free batches (one row of sequences back to back, `position_ids` restarting at 0 per sequence, as
`DataCollatorWithFlattening` produces) need nothing extra, exactly as in transformers: that collator writes -100 as
the first label of every sequence, so after the shift the last token of one sequence has no target and no
prediction crosses a boundary. The attention mask for such rows is built by the model from `position_ids`, as before,
but only without a KV cache: the fused training forward therefore defaults `use_cache` to False (transformers' own
forward takes `config.use_cache`, usually True, and then lets packed sequences attend to each other unless the
caller passes use_cache=False, as the `Trainer` does).

`revert(model)` undoes both patches. The patched forward lives on the instance, so `copy.deepcopy(model)` keeps it
but pickling the whole module (`torch.save(model)`) does not: save with `save_pretrained` or the state_dict, which
are unchanged, and call `apply` again after loading.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from fastsft.ops import RMSNorm, linear_cross_entropy

__all__ = ["SUPPORTED_ARCHITECTURES", "apply", "causal_lm_loss", "is_applied", "revert"]

# model_type -> (modeling module, causal LM class, RMSNorm class). The four share one forward signature and
# one layout: a decoder at `.model` returning `last_hidden_state`, and an `nn.Linear` `.lm_head`.
SUPPORTED_ARCHITECTURES = {
    "llama": ("transformers.models.llama.modeling_llama", "LlamaForCausalLM", "LlamaRMSNorm"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "MistralForCausalLM", "MistralRMSNorm"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2ForCausalLM", "Qwen2RMSNorm"),
    "qwen3": ("transformers.models.qwen3.modeling_qwen3", "Qwen3ForCausalLM", "Qwen3RMSNorm"),
}

_STATE_ATTR = "_fastsft_patch"


@dataclass
class _PatchState:
    """What `apply` changed on one model, so that a second `apply` is a no-op and `revert` can undo it."""

    original_norms: dict[str, nn.Module] = field(default_factory=dict)  # qualified name -> the replaced module
    loss_patched: bool = False
    # Another library's forward already on the instance when we patched; None: the class's forward (not stored, so
    # a pickled model never holds a bound method that would unpickle as the wrong forward).
    instance_forward: object = None


def apply(model: nn.Module, rms_norm: bool = True, loss: bool = True) -> nn.Module:
    """Patch `model` in place to use fastsft's RMSNorm and fused linear cross-entropy; returns the same model.

    Applying twice is harmless, and `revert(model)` undoes it. A PEFT-wrapped model (`peft.get_peft_model`,
    `PeftModel.from_pretrained`) is patched through to its transformers model, whose forward PEFT calls: LoRA/DoRA
    layers stay as they are, the norms and the loss become fastsft's. Otherwise call it before wrapping (DDP, FSDP,
    torch.compile): it patches the transformers model object itself. Returns the model it was given."""
    _apply(_unwrap_peft(model), rms_norm, loss)
    return model


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (PeftModel -> LoraModel -> *ForCausalLM), else `model`."""
    get_base_model = getattr(type(model), "get_base_model", None)
    return model.get_base_model() if callable(get_base_model) else model


def _apply(model: nn.Module, rms_norm: bool, loss: bool) -> None:
    classes = _architecture_classes(model)
    state = model.__dict__.get(_STATE_ATTR)
    if state is None:
        state = _PatchState()
        model.__dict__[_STATE_ATTR] = state
    if rms_norm:
        _swap_rms_norms(model, classes["rms_norm"], state)
    if loss and not state.loss_patched:
        _patch_forward(model, state)


def revert(model: nn.Module) -> nn.Module:
    """Undo `apply`: the original RMSNorm modules (holding the current weight Parameters) and the original forward."""
    wrapper, model = model, _unwrap_peft(model)
    _revert(model)
    return wrapper


def _revert(model: nn.Module) -> None:
    state = model.__dict__.get(_STATE_ATTR)
    if state is None:
        return
    if state.loss_patched:
        if not _forward_is_ours(model):
            raise RuntimeError(
                "fastsft.integrations.transformers.revert: model.forward was wrapped again after fastsft's patch "
                "(by another library); revert that wrapper first, or reload the model."
            )
        if state.instance_forward is not None:
            model.forward = state.instance_forward
        else:
            del model.forward
    for name, original in state.original_norms.items():
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        original.weight = getattr(parent, child_name).weight  # keep the Parameter the optimizer may hold
        setattr(parent, child_name, original)
    del model.__dict__[_STATE_ATTR]


def is_applied(model: nn.Module) -> bool:
    return _STATE_ATTR in _unwrap_peft(model).__dict__


def causal_lm_loss(
    hidden: torch.Tensor,
    lm_head: nn.Linear,
    labels: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch=None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """transformers' ForCausalLMLoss(lm_head(hidden), labels) without the logits.

    hidden [batch, seq, hidden_size]; labels [batch, seq] (shifted here, the last position gets no target) or
    shift_labels [batch, seq] (used as given). Mean over non-ignored targets, or sum / num_items_in_batch."""
    weight = lm_head.weight
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    # With a device_map the decoder may end on another device than the head.
    hidden = hidden.to(weight.device)
    shift_labels = shift_labels.to(weight.device)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(weight.device)
    return linear_cross_entropy(
        hidden, weight, shift_labels, bias=lm_head.bias, ignore_index=ignore_index, reduction="mean",
        num_items=num_items_in_batch,
    )


def _architecture_classes(model: nn.Module) -> dict:
    """The causal LM and RMSNorm classes for `model`, or a ValueError naming what is supported."""
    supported = ", ".join(cls for _, cls, _ in SUPPORTED_ARCHITECTURES.values())
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    entry = SUPPORTED_ARCHITECTURES.get(model_type)
    if entry is None:
        raise ValueError(
            f"fastsft.integrations.transformers.apply: {type(model).__name__} (model_type={model_type!r}) is not "
            f"supported; supported: {supported}. Load one of those causal LMs (AutoModelForCausalLM), and apply "
            "before wrapping it with PEFT or a distributed wrapper."
        )
    module = importlib.import_module(entry[0])
    causal_lm, norm = getattr(module, entry[1]), getattr(module, entry[2])
    if not isinstance(model, causal_lm):
        raise ValueError(
            f"fastsft.integrations.transformers.apply: expected a {entry[1]} (the causal LM with an lm_head) for "
            f"model_type={model_type!r}, got {type(model).__name__}; supported: {supported}."
        )
    if type(model.lm_head) is not nn.Linear:
        raise ValueError(
            f"fastsft.integrations.transformers.apply: model.lm_head is a {type(model.lm_head).__name__}, not "
            "nn.Linear (an adapter or quantized head?); apply fastsft before wrapping or quantizing the lm_head."
        )
    return {"causal_lm": causal_lm, "rms_norm": norm}


def _swap_rms_norms(model: nn.Module, norm_class: type, state: _PatchState) -> None:
    """Replace each `norm_class` module by fastsft's RMSNorm holding the same weight Parameter."""
    targets = [(name, module) for name, module in model.named_modules() if type(module) is norm_class]
    for name, original in targets:
        replacement = RMSNorm(original.weight.shape[0], eps=original.variance_epsilon, device="meta")
        replacement.weight = original.weight  # the same Parameter: same state_dict key, same optimizer slot
        replacement.train(original.training)
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, replacement)
        state.original_norms[name] = original


def _patch_forward(model: nn.Module, state: _PatchState) -> None:
    state.instance_forward = model.__dict__.get("forward")
    state.loss_patched = True
    model.forward = FusedForward(model)


class FusedForward:
    """The patched `forward` of one model instance.

    A small object rather than a bound closure so that the patch survives pickling and deep copies. It reports the
    original signature: `generate()` validates its kwargs against it, and the Trainer looks for **kwargs there to
    decide whether to pass num_items_in_batch."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args, **kwargs):
        return _fused_forward(self.model, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        signature = inspect.signature(type(self.model).forward)
        return signature.replace(parameters=list(signature.parameters.values())[1:])  # without self

    @property
    def __doc__(self):
        return type(self.model).forward.__doc__


def _forward_is_ours(model: nn.Module) -> bool:
    return isinstance(model.__dict__.get("forward"), FusedForward)


def _uses_fused_loss(model, labels, shift_labels, logits_to_keep) -> bool:
    """Fuse only where nothing can ask for the logits: training with labels, transformers' own causal-LM loss."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    if labels is None and shift_labels is None:
        return False
    if not model.training or not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        return False
    # An lm_head wrapped after apply (a LoRA adapter on it, say) is no longer one weight matrix: unfused is right.
    return model.loss_function is ForCausalLMLoss and type(model.lm_head) is nn.Linear


def _fused_forward(
    self,
    input_ids=None,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    inputs_embeds=None,
    labels=None,
    use_cache=None,
    logits_to_keep=0,
    **kwargs,
):
    state: _PatchState = self.__dict__[_STATE_ATTR]
    if not _uses_fused_loss(self, labels, kwargs.get("shift_labels"), logits_to_keep):
        original = state.instance_forward or type(self).forward.__get__(self)
        return original(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
            logits_to_keep=logits_to_keep, **kwargs,
        )
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    # A training forward never needs a KV cache. Leaving it to config.use_cache (True in most checkpoints) would
    # also build one, and a cache turns off transformers' detection of padding-free rows from position_ids, so
    # sequences would attend across their boundaries (the Trainer avoids that by setting use_cache=False).
    if use_cache is None:
        use_cache = False
    # The loss kwargs also travel to the decoder, as in transformers' own forward (its layers ignore them).
    outputs = self.model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs,
    )
    loss = causal_lm_loss(
        outputs.last_hidden_state, self.lm_head, labels, shift_labels=kwargs.get("shift_labels"),
        num_items_in_batch=kwargs.get("num_items_in_batch"), ignore_index=kwargs.get("ignore_index", -100),
    )
    result = CausalLMOutputWithPast(
        loss=loss, logits=None, past_key_values=outputs.past_key_values, hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
    )
    return result if return_dict else result.to_tuple()
