"""Hugging Face model directories in and out: config.json translation, the one explicit name map, safetensors
reading, writing and sharding.

Where it sits: beside the network (`fastsft.model`), the way torchtitan keeps a state-dict adapter beside its model.
`load_pretrained(DIR)` turns a local Hugging Face directory (config.json + model.safetensors, or shards listed in
model.safetensors.index.json) into a `Transformer`; `save_pretrained(model, DIR)` writes the layout that
`transformers.AutoModelForCausalLM.from_pretrained` loads unchanged. The trainer builds its model with the first;
`fastsft export` writes with the second.

Anything this model would compute differently from transformers is refused with an error naming the file and field
and what is supported. Read top to bottom: config.json -> ModelConfig and back, the name map, loading, saving.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import load_file, save_file

from fastsft._fsutil import replace_dir
from fastsft.model import ModelConfig, Transformer

ARCHITECTURES = {  # model_type -> the transformers class written into config.json (fastsft.model.MODEL_TYPES)
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

# config.json keys that ModelConfig owns (read from and written back by it); every other key is kept verbatim in
# `extra` and written back unchanged, so a load -> save round trip loses nothing (bos/eos ids, vendor fields, ...).
_OWNED_KEYS = {
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
    "rope_parameters", "max_position_embeddings", "tie_word_embeddings", "attention_bias", "mlp_bias",
    "hidden_act", "sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "initializer_range",
    "partial_rotary_factor", "transformers_version", "torch_dtype", "dtype",
}


# ---------------------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# ---------------------------------------------------------------------------------------------------------------


def config_from_hf(cfg: dict, source: str = "config.json") -> ModelConfig:
    """Read a Hugging Face config.json dict (transformers 4.x `rope_theta`/`rope_scaling` or 5.x
    `rope_parameters`). Anything this model would compute differently from transformers is an error naming the
    field in `source` and what is supported."""
    where = f"{source}: "
    model_type = cfg.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"{where}model_type {model_type!r} is not supported; supported: "
                         f"{', '.join(ARCHITECTURES)} (Llama-style decoders)")
    _reject_unsupported(cfg, where)
    rope_theta, rope_scaling = _read_rope(cfg, where)
    # Mistral always names its window; qwen2/qwen3 only when use_sliding_window is on; llama has none.
    windowed = model_type == "mistral" or (model_type in ("qwen2", "qwen3") and cfg.get("use_sliding_window"))
    # Bias: qwen2 always on q/k/v (never o); llama and qwen3 follow attention_bias on all four; mistral never.
    attention_bias = bool(cfg.get("attention_bias", False)) and model_type in ("llama", "qwen3")
    try:
        return ModelConfig(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads"),
            head_dim=cfg.get("head_dim"),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=attention_bias or model_type == "qwen2",
            attention_out_bias=attention_bias,
            qk_norm=model_type == "qwen3",
            sliding_window=cfg.get("sliding_window") if windowed else None,
            initializer_range=float(cfg.get("initializer_range", 0.02)),
            model_type=model_type,
            extra={k: v for k, v in cfg.items() if k not in _OWNED_KEYS},
        )
    except KeyError as e:
        raise ValueError(f"{where}missing required field {e.args[0]!r}") from None
    except ValueError as e:
        raise ValueError(f"{where}{e}") from None


def config_to_hf(config: ModelConfig, dtype: torch.dtype | None = None) -> dict:
    """The config.json dict transformers reads (4.x and 5.x): rope written both as rope_theta/rope_scaling and
    as rope_parameters."""
    cfg = dict(config.extra)
    rope_parameters = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rope_parameters.update(config.rope_scaling)
    cfg.update(
        architectures=[ARCHITECTURES[config.model_type]],
        model_type=config.model_type,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        rope_scaling=dict(config.rope_scaling) if config.rope_scaling is not None else None,
        rope_parameters=rope_parameters,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        initializer_range=config.initializer_range,
    )
    if config.model_type in ("llama", "qwen3"):
        cfg["attention_bias"] = config.attention_bias
    if config.model_type == "llama":
        cfg["mlp_bias"] = False
    if config.model_type == "mistral":
        cfg["sliding_window"] = config.sliding_window
    if config.model_type in ("qwen2", "qwen3"):
        cfg["use_sliding_window"] = config.sliding_window is not None
        cfg["sliding_window"] = config.sliding_window
    if dtype is not None:
        cfg["torch_dtype"] = cfg["dtype"] = str(dtype).removeprefix("torch.")
    return cfg


def _reject_unsupported(cfg: dict, where: str) -> None:
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"{where}hidden_act {act!r} is not supported; supported: silu (SwiGLU MLP)")
    if cfg.get("mlp_bias"):
        raise ValueError(f"{where}mlp_bias=true is not supported; supported: MLP projections without bias")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{where}partial_rotary_factor {cfg['partial_rotary_factor']} is not supported; "
                         f"supported: 1.0 (rotary over the whole head_dim)")
    if cfg.get("quantization_config"):
        raise ValueError(f"{where}quantized checkpoints are not supported; use the unquantized model")
    layer_types = cfg.get("layer_types") or []
    if cfg.get("use_sliding_window") is False:
        layer_types = []  # qwen2/qwen3 list sliding layers even when sliding is switched off
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(f"{where}layer_types {sorted(set(layer_types))} is not supported; supported: "
                         f"full_attention in every layer")


def _read_rope(cfg: dict, where: str) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from either the 4.x or the 5.x spelling."""
    params = cfg.get("rope_parameters") or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"{where}per-layer-type rope_parameters are not supported; supported: one rope for all "
                         f"layers")
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or params
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    return theta, (None if rope_type == "default" else scaling)


# ---------------------------------------------------------------------------------------------------------------
# The name map
# ---------------------------------------------------------------------------------------------------------------


def hf_key_map(config: ModelConfig) -> dict[str, str]:
    """Our parameter name -> its name in a Hugging Face *ForCausalLM checkpoint, for every tensor, in file order.
    Our module tree mirrors transformers' under `model.`, so the map is explicit but shallow."""
    layer_names = ["input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                   "self_attn.v_proj.weight", "self_attn.o_proj.weight"]
    if config.attention_bias:
        layer_names += ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
    if config.attention_out_bias:
        layer_names += ["self_attn.o_proj.bias"]
    if config.qk_norm:
        layer_names += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    layer_names += ["post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                    "mlp.down_proj.weight"]
    names = {"embed_tokens.weight": "model.embed_tokens.weight"}
    for i in range(config.num_hidden_layers):
        for name in layer_names:
            names[f"layers.{i}.{name}"] = f"model.layers.{i}.{name}"
    names["norm.weight"] = "model.norm.weight"
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    return names


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def load_pretrained(path, dtype: torch.dtype | None = None, device=None) -> Transformer:
    """A `Transformer` from a local Hugging Face model directory: config.json plus model.safetensors, or shards
    listed in model.safetensors.index.json. dtype None keeps the stored dtype."""
    path = Path(path)
    config = config_from_hf(read_json(path / "config.json"), source=str(path / "config.json"))
    hf_tensors = read_safetensors(path, device)
    state = hf_to_state_dict(hf_tensors, config, path)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict(state, strict=True, assign=True)
    generation = path / "generation_config.json"
    model.generation_config = read_json(generation) if generation.exists() else None
    return model


def _ignorable(hf_name: str, config: ModelConfig) -> bool:
    """Checkpoint tensors that carry no weights of ours: rotary caches, and lm_head when it is tied."""
    return hf_name.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and hf_name == "lm_head.weight")


def hf_to_state_dict(hf_tensors: dict[str, torch.Tensor], config: ModelConfig, path: Path) -> dict:
    """Rename checkpoint tensors to ours; a missing, unexpected or misshapen tensor is an error listing them."""
    ours_of = {theirs: ours for ours, theirs in hf_key_map(config).items()}
    missing = [name for name in ours_of if name not in hf_tensors]
    unexpected = [name for name in hf_tensors if name not in ours_of and not _ignorable(name, config)]
    if missing or unexpected:
        raise ValueError(
            f"{path}: the weights do not match config.json (model_type={config.model_type}, "
            f"num_hidden_layers={config.num_hidden_layers}, tie_word_embeddings={config.tie_word_embeddings}): "
            f"missing {_some(missing)}; unexpected {_some(unexpected)}. Check that config.json and the "
            f"*.safetensors files come from the same model."
        )
    expected_shapes = _expected_shapes(config)
    state = {}
    for theirs, ours in ours_of.items():
        tensor = hf_tensors[theirs]
        if tuple(tensor.shape) != expected_shapes[ours]:
            raise ValueError(f"{path}: tensor {theirs} has shape {tuple(tensor.shape)}, config.json implies "
                             f"{expected_shapes[ours]}")
        state[ours] = tensor
    return state


def _expected_shapes(config: ModelConfig) -> dict[str, tuple]:
    with torch.device("meta"):
        model = Transformer(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _some(names: list[str], limit: int = 8) -> str:
    if not names:
        return "none"
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def read_json(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: expected a Hugging Face model directory (config.json and "
                                f"*.safetensors)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {e.lineno}, column {e.colno}: invalid JSON: {e.msg}") from None


def read_safetensors(path: Path, device=None) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in `path`, single-file or sharded (index.json)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").exists():
        weight_map, files = None, ["model.safetensors"]
    else:
        found = sorted(p.name for p in path.glob("*.bin"))
        hint = f" (found {', '.join(found)}: convert PyTorch .bin weights to safetensors first)" if found else ""
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")
    tensors = {}
    for name in files:
        file = path / name
        if not file.exists():
            raise FileNotFoundError(f"{file} is listed in {index.name} but missing")
        tensors.update(load_file(str(file), device=str(device) if device is not None else "cpu"))
    if weight_map is not None:
        absent = [k for k in weight_map if k not in tensors]
        if absent:
            raise ValueError(f"{index}: lists tensors its shards do not contain: {_some(absent)}")
    return tensors


# ---------------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------------


def save_pretrained(model: Transformer, path, max_shard_size: int | str = "5GB",
                    dtype: torch.dtype | None = None) -> Path:
    """Write the Hugging Face layout (config.json, generation_config.json, model.safetensors or shards plus
    model.safetensors.index.json) that `transformers.AutoModelForCausalLM.from_pretrained` loads. Atomic: written
    into a temporary sibling directory, then swapped in; other files already in `path` (a tokenizer) are kept."""
    tensors = {}
    for ours, theirs in hf_key_map(model.config).items():
        tensor = model.get_parameter(ours).detach()
        if hasattr(tensor, "full_tensor"):  # FSDP2 DTensor: gather the full matrix
            tensor = tensor.full_tensor()
        # Save path, not the step: safetensors writes from host memory, so each weight is copied to the CPU once.
        tensors[theirs] = tensor.to(dtype or tensor.dtype).contiguous().cpu()
    saved_dtype = dtype or model.embed_tokens.weight.dtype
    files = {
        "config.json": json.dumps(config_to_hf(model.config, saved_dtype), indent=2, sort_keys=True) + "\n",
        "generation_config.json": json.dumps(_generation_config(model), indent=2, sort_keys=True) + "\n",
    }
    return write_model_dir(Path(path), tensors, files, parse_size(max_shard_size))


def _generation_config(model: Transformer) -> dict:
    if model.generation_config is not None:
        return dict(model.generation_config)
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {k: model.config.extra[k] for k in keys if model.config.extra.get(k) is not None}


def parse_size(size: int | str) -> int:
    """Bytes in "5GB" / "500MB" / "2GiB" / 1000 (decimal units as transformers uses them, binary for *iB)."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, scale in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * scale)
    return int(text)


_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")


def write_model_dir(path: Path, tensors: dict[str, torch.Tensor], text_files: dict[str, str], max_bytes: int):
    """Write tensors (as safetensors, sharded above max_bytes) and text files as the directory `path`, atomically."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        # huggingface_hub's splitter (the one transformers uses) rather than our own: same file names, same index
        # format and the same greedy in-order split, maintained where the format is defined.
        split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_bytes)
        for filename, names in split.filename_to_tensors.items():
            save_file({name: tensors[name] for name in names}, str(tmp / filename), metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        for name, text in text_files.items():
            (tmp / name).write_text(text)
        if path.exists():
            _carry_over_other_files(path, tmp)
        replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _carry_over_other_files(old_dir: Path, new_dir: Path) -> None:
    """Copy what is not model weights or config (tokenizer files, README) from an existing directory."""
    for item in old_dir.iterdir():
        is_shard = item.name.startswith("model-") and item.name.endswith(".safetensors")
        if item.name in _MODEL_FILES or is_shard or (new_dir / item.name).exists():
            continue
        if item.is_dir():
            shutil.copytree(item, new_dir / item.name)
        else:
            shutil.copy2(item, new_dir / item.name)
