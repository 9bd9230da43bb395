"""The `adapter` section of the train config: which parameter-efficient method trains which modules.

Sits in the config tree (`fastsft.train.config.TrainConfig.adapter`, documented by `fastsft train --help-config`);
`fastsft.adapters.lora.apply_adapters` reads it to turn a loaded `Transformer` into a frozen base plus trainable
adapters, and `fastsft.adapters.peft_io` writes it out as a PEFT `adapter_config.json`.

`METHODS` is the one list of methods: other adapter kinds (prompt tuning, ...) extend it and the section.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path

# Every linear layer of a block (attention q/k/v/o, SwiGLU gate/up/down): PEFT's names, which are ours too.
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_METHODS = ("lora", "dora", "qlora")
PROMPT_METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning")  # fastsft/adapters/prompt.py
METHODS = ("none",) + LORA_METHODS + PROMPT_METHODS


def _option(default, doc: str, choices: tuple | None = None):
    """A config field with its default, one-line doc and allowed values (the metadata fastsft.train.config reads)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"doc": doc, "choices": choices})
    return field(default=default, metadata={"doc": doc, "choices": choices})


@dataclass
class AdapterSection:
    method: str = _option("none", "parameter-efficient fine-tuning: none (train every weight), lora, dora (weight-decomposed LoRA), qlora (LoRA on an NF4 4-bit base), prompt_tuning, p_tuning, prefix_tuning (P-tuning v2)", METHODS)
    rank: int = _option(16, "LoRA rank r of each adapter")
    alpha: float = _option(32.0, "LoRA alpha: the update is scaled by alpha / rank (alpha / sqrt(rank) with use_rslora)")
    dropout: float = _option(0.0, "dropout on the adapter path only (the base projection never sees it)")
    use_rslora: bool = _option(False, "rank-stabilized LoRA: scale by alpha / sqrt(rank)")
    target_modules: list = _option(list(BLOCK_LINEARS), "block linear layers that get adapters: names (q_proj) or glob patterns on paths (layers.[0-3].mlp.*, *_proj)")
    modules_to_save: list = _option([], "modules trained fully and saved with the adapter, e.g. [embed_tokens, lm_head] (new tokens, a new chat template)")
    init_from: str | None = _option(None, "start from an existing PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    num_virtual_tokens: int = _option(20, "prompt_tuning / p_tuning: virtual tokens in front of every document; prefix_tuning: prefix keys/values per layer")
    prompt_init: str = _option("random", "prompt_tuning: initial prompts: random (N(0,1), PEFT's RANDOM), vocab (embeddings of random tokens), text (embeddings of prompt_init_text, repeated or cut)", ("random", "vocab", "text"))
    prompt_init_text: str | None = _option(None, "prompt_tuning with prompt_init=text: the text")
    encoder_type: str = _option("mlp", "p_tuning: the prompt encoder, mlp or lstm (bidirectional)", ("mlp", "lstm"))
    encoder_hidden_size: int = _option(0, "p_tuning encoder / prefix projection width (0: the model's hidden size; for prefixes the key/value width)")
    encoder_num_layers: int = _option(2, "p_tuning with encoder_type=lstm: LSTM layers")
    prefix_projection: bool = _option(False, "prefix_tuning: reparameterize the prefix through Linear-Tanh-Linear (folded away at export)")


def validate_adapter(section: AdapterSection, key: str = "adapter") -> None:
    """Range checks; raises ValueError naming the option and what to do."""
    if section.method not in METHODS:
        raise ValueError(f"{key}.method={section.method!r} is not one of {', '.join(METHODS)}")
    if section.method in PROMPT_METHODS and not section.init_from:
        from fastsft.adapters.prompt import prompt_config_from_section

        prompt_config_from_section(section, key)
    if section.method not in LORA_METHODS:
        return
    if not isinstance(section.rank, int) or section.rank <= 0:
        raise ValueError(f"{key}.rank must be a positive integer, got {section.rank!r}")
    if section.alpha <= 0:
        raise ValueError(f"{key}.alpha must be > 0, got {section.alpha!r}")
    if not 0.0 <= section.dropout < 1.0:
        raise ValueError(f"{key}.dropout must be in [0, 1), got {section.dropout!r}")
    if not section.target_modules:
        raise ValueError(f"{key}.target_modules is empty: name the block linears to adapt, e.g. "
                         f"[{', '.join(BLOCK_LINEARS)}]")


def lora_scaling(section: AdapterSection) -> float:
    """The factor of the low-rank update B @ A: alpha / r, or alpha / sqrt(r) for rsLoRA (as PEFT)."""
    return section.alpha / (section.rank ** 0.5 if section.use_rslora else section.rank)


def module_matches(path: str, pattern: str) -> bool:
    """A target pattern matches a module path (`layers.3.self_attn.q_proj`) when it equals or globs the last name
    (`q_proj`, `*_proj`) or globs the whole path (`layers.[0-3].mlp.*`)."""
    return fnmatch.fnmatchcase(path.rsplit(".", 1)[-1], pattern) or fnmatch.fnmatchcase(path, pattern)


def prompt_row_tokens(section: AdapterSection) -> int:
    """Virtual slots the loader keeps in front of every document (`PackedLoader(virtual_tokens=...)`): the number of
    virtual tokens for prompt_tuning and p_tuning (read from `init_from`'s adapter_config.json when set), else 0."""
    if section.method not in ("prompt_tuning", "p_tuning"):
        return 0
    if section.init_from:
        import json

        config = json.loads((Path(section.init_from) / "adapter_config.json").read_text())
        return int(config["num_virtual_tokens"]) if config.get("peft_type") in ("PROMPT_TUNING", "P_TUNING") else 0
    return section.num_virtual_tokens
