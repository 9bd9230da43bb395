"""Parameter-efficient fine-tuning: adapters attached to a frozen fastsft Transformer.

`config` holds the `adapter` section of the train config; `lora` the adapted projections (LoRA, DoRA, QLoRA) and
`apply_adapters`; `peft_io` reading and writing PEFT adapter directories and merged checkpoints; `prompt` and
`prefix` prompt tuning, P-tuning and prefix tuning. The trainer calls `build_adapters` once after loading the base
model, and saves/loads `adapter_state` in its checkpoints.
"""

from __future__ import annotations

from fastsft.adapters.config import LORA_METHODS, AdapterSection, validate_adapter

__all__ = ["AdapterSection", "adapter_state", "build_adapters", "load_adapter_state", "validate_adapter"]


def build_adapters(model, section: AdapterSection, base_dtype=None, key: str = "adapter"):
    """(model, the section actually used): `model` turned into frozen base + adapters in place. With
    `section.init_from` the shapes (rank, targets, modules_to_save...) come from that PEFT directory and its tensors
    are loaded; otherwise adapters start at PEFT's init (step 0 equals the base)."""
    from fastsft.adapters.lora import apply_adapters
    from fastsft.adapters.peft_io import load_peft_adapter, section_from_adapter_dir

    if section.method not in LORA_METHODS:
        raise ValueError(f"{key}.method={section.method!r}: build_adapters builds {', '.join(LORA_METHODS)}")
    if section.init_from:
        section = section_from_adapter_dir(section.init_from, model, section)
        apply_adapters(model, section, base_dtype, key)
        load_peft_adapter(model, section.init_from)
    else:
        apply_adapters(model, section, base_dtype, key)
    return model, section


def adapter_state(model) -> dict:
    """What a checkpoint keeps of an adapted model: the trainable tensors only (adapters + modules_to_save)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_adapter_state(model, state: dict, where: str = "checkpoint") -> None:
    """Load `adapter_state` output back; the keys must be exactly the model's trainable parameters."""
    import torch

    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"{where}: adapter tensors do not match the adapted model (same adapter.* options?): "
                         f"missing {missing[:6]}, unexpected {unexpected[:6]}")
    with torch.no_grad():
        for name, tensor in state.items():
            model.get_parameter(name).copy_(tensor)
