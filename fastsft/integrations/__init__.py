"""Integrations: put fastsft's fused ops into models and trainers that are not fastsft's own.

`fastsft.integrations.transformers.apply(model)` patches one loaded transformers causal LM (Llama, Mistral, Qwen2,
Qwen3) in place: fastsft's RMSNorm modules, and a training forward whose loss is `fastsft.ops.linear_cross_entropy`
(no [tokens x vocab] logits). The patched model then trains unchanged in the transformers `Trainer` or a
hand-written loop, and in TRL's `SFTTrainer` (which computes the loss with its own fused LM head; fastsft's RMSNorm
still runs there). Submodules are imported on demand, so `import fastsft.integrations` needs neither transformers'
Trainer nor TRL.
"""
