"""Prompt tuning, P-tuning and prefix tuning adapters in PEFT's directory format, out and in.

Where it sits: `save_peft_prompt_adapter` writes what `peft.PeftModel.from_pretrained(AutoModelForCausalLM
.from_pretrained(BASE), DIR)` loads (`fastsft export` and the trainer's export call it); `load_peft_prompt_adapter`
attaches such a directory to a fastsft Transformer so training can start from it.

The format, as PEFT 0.1x writes it for these methods: adapter_config.json (peft_type PROMPT_TUNING, P_TUNING or
PREFIX_TUNING, task_type CAUSAL_LM, num_virtual_tokens, token_dim, num_layers, num_attention_heads, ...) and
adapter_model.safetensors with ONE tensor, `prompt_embeddings`: what the model consumes at inference. For prompt
tuning the embeddings themselves; for P-tuning the output of the prompt encoder (PEFT folds the MLP/LSTM away:
a loaded P-tuning adapter is its prompts); for prefix tuning the flat prefix [n, layers * 2 * token_dim] after the
projection when there was one, token_dim = kv heads x head_dim (grouped-query attention). The folded forms are
written with prefix_projection false, so PEFT loads them trainable too. Loading a P_TUNING directory therefore
continues as prompt tuning from its folded prompts, and a projected prefix continues without its projection.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fastsft.adapters.prompt import (
    PrefixTuning,
    PromptConfig,
    PromptTuning,
    PTuning,
    apply_prompt_adapter,
    prompt_config_from_section,
    text_init_ids,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY = "prompt_embeddings"
PEFT_TYPES = {"prompt_tuning": "PROMPT_TUNING", "p_tuning": "P_TUNING", "prefix_tuning": "PREFIX_TUNING"}


def peft_prompt_config(model, base_model_name_or_path: str | None = None) -> dict:
    """adapter_config.json for the adapter attached to `model`."""
    adapter, c = model.prompt_adapter, model.config
    config = adapter.config
    cfg = {
        "auto_mapping": None, "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
        "modules_to_save": None, "num_layers": c.num_hidden_layers, "num_transformer_submodules": 1,
        "num_virtual_tokens": config.num_virtual_tokens, "peft_type": PEFT_TYPES[config.method], "revision": None,
        "task_type": "CAUSAL_LM",
    }
    if isinstance(adapter, PrefixTuning):
        cfg.update(token_dim=c.num_key_value_heads * c.head_dim, num_attention_heads=c.num_key_value_heads,
                   encoder_hidden_size=config.encoder_hidden_size or c.num_key_value_heads * c.head_dim,
                   prefix_projection=False, init_weights=None)
    else:
        cfg.update(token_dim=c.hidden_size, num_attention_heads=c.num_attention_heads)
    if isinstance(adapter, PromptTuning):  # the init is history: the trained embeddings are in the weights
        cfg.update(prompt_tuning_init="RANDOM", prompt_tuning_init_text=None, tokenizer_name_or_path=None,
                   tokenizer_kwargs=None)
    if isinstance(adapter, PTuning):
        cfg.update(encoder_reparameterization_type=config.encoder_type.upper(),
                   encoder_hidden_size=config.encoder_hidden_size or c.hidden_size,
                   encoder_num_layers=config.encoder_num_layers, encoder_dropout=0.0)
    return cfg


@torch.no_grad()
def peft_prompt_embeddings(adapter) -> torch.Tensor:
    """The one tensor PEFT saves (fp32, on the CPU): prompts, folded P-tuning prompts, or the flat prefix."""
    folded = adapter.flat() if isinstance(adapter, PrefixTuning) else adapter.prompts()
    if hasattr(folded, "full_tensor"):  # FSDP2 DTensor
        folded = folded.full_tensor()
    return folded.detach().float().contiguous().cpu()


def save_peft_prompt_adapter(model, path, base_model_name_or_path: str | None = None) -> Path:
    """Write `model.prompt_adapter` as a PEFT adapter directory; returns the path."""
    from safetensors.torch import save_file

    if getattr(model, "prompt_adapter", None) is None:
        raise ValueError("save_peft_prompt_adapter: the model has no prompt adapter (apply_prompt_adapter first)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({KEY: peft_prompt_embeddings(model.prompt_adapter)}, str(path / WEIGHTS_NAME),
              metadata={"format": "pt"})
    cfg = peft_prompt_config(model, base_model_name_or_path)
    (path / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return path


def load_peft_prompt_adapter(model, path) -> torch.nn.Module:
    """Attach the PEFT prompt-learning adapter in directory `path` to `model` (base frozen, adapter trainable) and
    return it. A config that does not fit the model is an error naming the field."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    for file in (cfg_file, weights_file):
        if not file.exists():
            raise FileNotFoundError(f"{file} not found: expected a PEFT adapter directory ({CONFIG_NAME} and "
                                    f"{WEIGHTS_NAME})")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}, line {e.lineno}: invalid JSON: {e.msg}") from None
    methods = {v: k for k, v in PEFT_TYPES.items()}
    peft_type = cfg.get("peft_type")
    if peft_type not in methods:
        raise ValueError(f"{cfg_file}: peft_type {peft_type!r} is not a prompt-learning type this loader reads "
                         f"({', '.join(methods)})")
    if cfg.get("num_transformer_submodules", 1) != 1:
        raise ValueError(f"{cfg_file}: num_transformer_submodules {cfg['num_transformer_submodules']} (an "
                         f"encoder-decoder adapter); supported: 1 (decoder-only)")
    c = model.config
    prefix = peft_type == "PREFIX_TUNING"
    token_dim = c.num_key_value_heads * c.head_dim if prefix else c.hidden_size
    expected = {"num_layers": c.num_hidden_layers, "token_dim": token_dim}
    for field, value in expected.items():
        if cfg.get(field, value) != value:
            raise ValueError(f"{cfg_file}: {field} is {cfg[field]} but the model needs {value}: the adapter was "
                             f"trained on another base model")
    n = cfg.get("num_virtual_tokens")
    weights = load_file(str(weights_file))
    if KEY not in weights:
        raise ValueError(f"{weights_file}: no tensor {KEY!r} (found {', '.join(sorted(weights)) or 'none'})")
    embeddings = weights[KEY]
    width = c.num_hidden_layers * 2 * token_dim if prefix else token_dim
    if tuple(embeddings.shape) != (n, width):
        raise ValueError(f"{weights_file}: {KEY} has shape {tuple(embeddings.shape)}, the config and model imply "
                         f"({n}, {width})")
    method = "prefix_tuning" if prefix else "prompt_tuning"  # P-tuning's encoder is folded into its prompts
    config = PromptConfig(method=method, num_virtual_tokens=n)
    device = model.embed_tokens.weight.device
    if prefix:
        adapter = PrefixTuning(config, c.num_hidden_layers, c.num_key_value_heads, c.head_dim)
    else:
        adapter = PromptTuning(config, c.hidden_size)
    with torch.no_grad():
        adapter.embedding.weight.copy_(embeddings.float())
    return apply_prompt_adapter(model, adapter.to(device=device, dtype=torch.float32))


def build_from_section(model, section, tokenizer=None, seed: int = 0, key: str = "adapter") -> torch.nn.Module:
    """Attach the prompt adapter the `adapter` section asks for (from `section.init_from`, a PEFT directory, when
    set); `tokenizer` encodes prompt_init_text for init 'text'. Returns the adapter."""
    if section.init_from:
        return load_peft_prompt_adapter(model, section.init_from)
    config = prompt_config_from_section(section, key)
    ids = None
    if config.init == "text":
        if tokenizer is None:
            raise ValueError(f"{key}.prompt_init=text needs the run's tokenizer")
        ids = text_init_ids(tokenizer.encode(config.init_text), config.num_virtual_tokens)
    return apply_prompt_adapter(model, config, init_token_ids=ids, seed=seed)
