"""Parameter-efficient fine-tuning: adapters attached to a frozen fastsft Transformer.

`config` holds the `adapter` section of the train config; `lora` the adapted projections (LoRA, DoRA, QLoRA) and
`apply_adapters`; `peft_io` reading and writing PEFT adapter directories and merged checkpoints; `prompt` and
`prefix` prompt tuning, P-tuning and prefix tuning. The trainer calls `peft_io.build_adapters` once after loading the
base model, and saves/loads `lora.adapter_state` in its checkpoints.
"""

from __future__ import annotations

from fastsft.adapters.config import AdapterSection, validate_adapter

__all__ = ["AdapterSection", "validate_adapter"]
