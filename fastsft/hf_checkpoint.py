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

import dataclasses
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fastsft._fsutil import replace_dir
from fastsft.model import ModelConfig, Transformer


class ModelDirError(ValueError):
    """A model directory fastsft cannot use (missing, corrupt or unsupported files, bad config.json fields); the
    message names the file or field and what to do. A ValueError, so the commands report it in one line."""


ARCHITECTURES = {  # model_type -> the transformers class written into config.json (fastsft.model.MODEL_TYPES)
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

# transformers' defaults where config.json leaves a field out (they differ by model type).
_DEFAULT_MAX_POSITIONS = {"llama": 2048, "mistral": 131072, "qwen2": 32768, "qwen3": 32768}
_DEFAULT_ROPE_THETA = 10000.0

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
    `rope_parameters`). Anything this model would compute differently from transformers, and any missing, null or
    mistyped field, is a ModelDirError naming the field in `source` and what is wanted."""
    where = f"{source}: "
    if not isinstance(cfg, dict):
        raise ModelDirError(f"{where}expected a JSON object of model settings, got {type(cfg).__name__}")
    model_type = cfg.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ModelDirError(f"{where}model_type {model_type!r} is not supported; supported: "
                            f"{', '.join(ARCHITECTURES)} (Llama-style decoders)")
    _reject_unsupported(cfg, where)
    rope_theta, rope_scaling = _read_rope(cfg, where)
    # Mistral always names its window; qwen2/qwen3 only when use_sliding_window is on; llama has none.
    windowed = model_type == "mistral" or (model_type in ("qwen2", "qwen3") and
                                           _field(cfg, "use_sliding_window", bool, where, False))
    # Bias: qwen2 always on q/k/v (never o); llama and qwen3 follow attention_bias on all four; mistral never.
    attention_bias = _field(cfg, "attention_bias", bool, where, False) and model_type in ("llama", "qwen3")
    try:
        return ModelConfig(
            vocab_size=_field(cfg, "vocab_size", int, where),
            hidden_size=_field(cfg, "hidden_size", int, where),
            intermediate_size=_field(cfg, "intermediate_size", int, where),
            num_hidden_layers=_field(cfg, "num_hidden_layers", int, where),
            num_attention_heads=_field(cfg, "num_attention_heads", int, where),
            num_key_value_heads=_field(cfg, "num_key_value_heads", int, where, None, null_ok=True),
            head_dim=_field(cfg, "head_dim", int, where, None, null_ok=True),
            rms_norm_eps=_field(cfg, "rms_norm_eps", float, where, 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=_field(cfg, "max_position_embeddings", int, where,
                                           _DEFAULT_MAX_POSITIONS[model_type]),
            tie_word_embeddings=_field(cfg, "tie_word_embeddings", bool, where, False),
            attention_bias=attention_bias or model_type == "qwen2",
            attention_out_bias=attention_bias,
            qk_norm=model_type == "qwen3",
            sliding_window=_field(cfg, "sliding_window", int, where, None, null_ok=True) if windowed else None,
            initializer_range=_field(cfg, "initializer_range", float, where, 0.02),
            model_type=model_type,
            extra={k: v for k, v in cfg.items() if k not in _OWNED_KEYS},
        )
    except ModelDirError:
        raise
    except ValueError as e:  # ModelConfig's own checks (head counts, rope_scaling)
        raise ModelDirError(f"{where}{e}") from None


_REQUIRED = object()
_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object"}


def _field(cfg: dict, name: str, kind: type, where: str, default=_REQUIRED, null_ok: bool = False):
    """cfg[name] checked to be of `kind` (JSON's types: true is not an integer, 2 is a number); `default` when
    absent (or null, where null_ok). Missing, null and mistyped values are errors naming the field."""
    if name not in cfg or (cfg[name] is None and null_ok):
        if default is _REQUIRED:
            raise ModelDirError(f"{where}missing required field {name!r} ({_KIND_NAMES[kind]})")
        return default
    value = cfg[name]
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ModelDirError(f"{where}{name} is {json.dumps(value)}, expected {_KIND_NAMES[kind]}; fix config.json "
                            f"(compare with the model's original config)")
    return float(value) if kind is float else value


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
    act = _field(cfg, "hidden_act", str, where, "silu")
    if act not in ("silu", "swish"):
        raise ModelDirError(f"{where}hidden_act {act!r} is not supported; supported: silu (SwiGLU MLP)")
    if cfg.get("mlp_bias"):
        raise ModelDirError(f"{where}mlp_bias=true is not supported; supported: MLP projections without bias")
    if cfg.get("partial_rotary_factor", 1.0) not in (1, 1.0, None):
        raise ModelDirError(f"{where}partial_rotary_factor {cfg['partial_rotary_factor']} is not supported; "
                            f"supported: 1.0 (rotary over the whole head_dim)")
    if cfg.get("quantization_config"):
        raise ModelDirError(f"{where}quantized checkpoints are not supported; use the unquantized model")
    layer_types = cfg.get("layer_types") or []
    if cfg.get("use_sliding_window") is False:
        layer_types = []  # qwen2/qwen3 list sliding layers even when sliding is switched off
    if not isinstance(layer_types, list) or any(t != "full_attention" for t in layer_types):
        raise ModelDirError(f"{where}layer_types {json.dumps(layer_types)} is not supported; supported: "
                            f"full_attention in every layer")


def _read_rope(cfg: dict, where: str) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from the 4.x or the 5.x spelling, resolved as transformers 5 does: a
    non-empty `rope_scaling` replaces `rope_parameters` whole; the chosen dict's rope_theta wins, else the top-level
    rope_theta, else 10000."""
    for name in ("rope_scaling", "rope_parameters"):
        _field(cfg, name, dict, where, None, null_ok=True)
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if rope and all(isinstance(v, dict) for v in rope.values()):
        raise ModelDirError(f"{where}per-layer-type rope_parameters are not supported; supported: one rope for all "
                            f"layers")
    name = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
    if "rope_theta" in rope:
        theta = _field(rope, "rope_theta", float, f"{where}{name}.")
    else:
        theta = _field(cfg, "rope_theta", float, where, _DEFAULT_ROPE_THETA)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    return theta, (None if rope_type == "default" else rope)


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
    listed in model.safetensors.index.json. dtype None keeps the stored dtype. Every problem with the directory is a
    ModelDirError naming the file or field."""
    path = Path(path)
    config = config_from_hf(read_json(path / "config.json"), source=str(path / "config.json"))
    hf_tensors = read_safetensors(path, device)
    head, embed = hf_tensors.get("lm_head.weight"), hf_tensors.get("model.embed_tokens.weight")
    if config.tie_word_embeddings and head is not None and not (embed is not None and torch.equal(head, embed)):
        # What transformers does: keep the file's own head, untied, and say so. The config follows the weights, so
        # an export writes the untied head it trained, not a tied model.
        warnings.warn(f"{path / 'config.json'}: tie_word_embeddings is true but the weights hold a distinct "
                      f"lm_head.weight: loaded untied (as transformers does); set tie_word_embeddings to false in "
                      f"config.json to silence this", UserWarning, stacklevel=2)
        config = dataclasses.replace(config, tie_word_embeddings=False)
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
        raise ModelDirError(
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
            raise ModelDirError(f"{path}: tensor {theirs} has shape {tuple(tensor.shape)}, config.json implies "
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
    if not path.is_file():
        raise ModelDirError(f"{path} not found: expected a Hugging Face model directory (config.json and "
                            f"*.safetensors)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{path}, line {e.lineno}, column {e.colno}: invalid JSON: {e.msg}") from None
    except UnicodeDecodeError:
        raise ModelDirError(f"{path}: not a text file (invalid UTF-8); restore it from the original model") from None
    if not isinstance(data, dict):
        raise ModelDirError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_safetensors(path: Path, device=None) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in `path`, single-file or sharded (index.json). Only safetensors are read
    (never pickle); the files an index lists must lie inside `path`."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelDirError(f"{index}: no 'weight_map' object of tensor name -> file name")
        files = sorted(set(weight_map.values()))
        for name in files:
            # Checked on the name, not the resolved path: a Hugging Face cache links its files to blobs elsewhere.
            normal = os.path.normpath(name)
            if os.path.isabs(normal) or normal == ".." or normal.startswith(".." + os.sep):
                raise ModelDirError(f"{index}: lists {name!r}, outside the model directory; shards must be files "
                                    f"in {path}")
    elif (path / "model.safetensors").exists():
        weight_map, files = None, ["model.safetensors"]
    else:
        found = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = (f" (found {', '.join(found)}: fastsft reads safetensors only, never pickled weights; convert with "
                f"transformers: AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR))") if found else ""
        raise ModelDirError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")
    tensors = {}
    for name in files:
        file = path / name
        if not file.is_file():
            listed = f"is listed in {index.name} but " if weight_map is not None else ""
            raise ModelDirError(f"{file} {listed}{'is not a file' if file.exists() else 'is missing'}: copy the "
                                f"model directory again")
        try:
            tensors.update(load_file(str(file), device=str(device) if device is not None else "cpu"))
        except (SafetensorError, OSError) as e:
            reason = "truncated or corrupt" if isinstance(e, SafetensorError) else type(e).__name__
            raise ModelDirError(f"{file}: not a readable safetensors file ({reason}); download or export it "
                                f"again") from None
    if weight_map is not None:
        absent = [k for k in weight_map if k not in tensors]
        if absent:
            raise ModelDirError(f"{index}: lists tensors its shards do not contain: {_some(absent)}")
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
