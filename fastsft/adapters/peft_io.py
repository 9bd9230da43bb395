"""PEFT adapter directories in and out, and merged full checkpoints.

Where it sits: after training, `fastsft export` writes the adapters of a checkpoint as a PEFT LoRA directory
(`adapter_config.json` + `adapter_model.safetensors`) that `peft.PeftModel.from_pretrained(base, DIR)` loads with no
missing or unexpected keys, or (merge) as a full Hugging Face checkpoint with the adapters folded into the weights.
Before training, `adapter.init_from` reads such a directory (ours or PEFT's) to start from it.

Key names are PEFT's: `base_model.model.` + the Hugging Face module path + `.lora_A.weight` / `.lora_B.weight` /
`.lora_magnitude_vector` (DoRA); a module trained fully (modules_to_save) is saved under its own Hugging Face name
(`base_model.model.model.embed_tokens.weight`), as PEFT saves it. The one name map of the base model
(`hf_key_map`) supplies the Hugging Face paths.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from fastsft.adapters.config import BLOCK_LINEARS, LORA_METHODS, PROMPT_METHODS, AdapterSection
from fastsft.adapters.lora import adapted_modules, apply_adapters, block_linears, load_adapter_state, merge_adapters

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# Our parameter suffix -> PEFT's (within an adapted module).
ADAPTER_SUFFIXES = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}
# adapter_config.json fields that would change what the adapter computes and that fastsft does not implement.
_UNSUPPORTED = {"layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
                "fan_in_fan_out": False, "bias": "none", "lora_bias": False, "layer_replication": None,
                "use_qalora": False, "trainable_token_indices": None, "target_parameters": None}


def _hf_key_map(config):
    from fastsft.hf_checkpoint import hf_key_map

    return hf_key_map(config)


def hf_module_path(model: nn.Module, path: str) -> str:
    """Our module path (layers.0.self_attn.q_proj, embed_tokens, lm_head) -> Hugging Face's."""
    theirs = _hf_key_map(model.config).get(f"{path}.weight")
    if theirs is None:
        raise KeyError(f"{path} has no Hugging Face name")
    return theirs.removesuffix(".weight")


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor of an adapted model under its PEFT key (fp32, contiguous, on the CPU)."""
    out = {}
    for key, name in peft_state_dict_names(model).items():
        tensor = model.get_parameter(name).detach()
        if hasattr(tensor, "full_tensor"):  # FSDP2 DTensor: gather the full tensor
            tensor = tensor.full_tensor()
        out[key] = tensor.float().contiguous().cpu()  # save path, not the step: one copy to host memory
    return out


def peft_target_modules(model: nn.Module) -> list[str] | str:
    """PEFT's target_modules for the adapted set: the short names when every block has the same ones, else a regex
    that fully matches exactly the adapted Hugging Face module paths."""
    adapted = set(adapted_modules(model))
    leaves = {name.rsplit(".", 1)[-1] for name in adapted}
    every = {name for name in block_linears(model) if name.rsplit(".", 1)[-1] in leaves}
    if adapted == every:
        return sorted(leaves, key=lambda n: BLOCK_LINEARS.index(n) if n in BLOCK_LINEARS else len(BLOCK_LINEARS))
    return "^(" + "|".join(re.escape(hf_module_path(model, n)) for n in sorted(adapted)) + ")$"


def adapter_config(model: nn.Module, section: AdapterSection, base_model_name_or_path: str | None = None) -> dict:
    """The adapter_config.json dict PEFT reads for this adapted model."""
    modules_to_save = sorted({name.rpartition(".")[0] for name, p in model.named_parameters()
                              if p.requires_grad and name.rpartition(".")[0] not in adapted_modules(model)})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": section.rank,
        "lora_alpha": section.alpha,
        "lora_dropout": section.dropout,
        "use_rslora": section.use_rslora,
        "use_dora": section.method == "dora",
        "target_modules": peft_target_modules(model),
        "modules_to_save": modules_to_save or None,
        "init_lora_weights": True,
        "inference_mode": True,
        "revision": None,
        **_UNSUPPORTED,
    }


def save_peft_adapter(model: nn.Module, section: AdapterSection, out: str | Path,
                      base_model_name_or_path: str | None = None) -> Path:
    """Write `out`/adapter_config.json and `out`/adapter_model.safetensors (atomically: a temporary sibling renamed
    into place; other files already in `out`, such as a tokenizer, are kept)."""
    from safetensors.torch import save_file

    if section.method in PROMPT_METHODS:
        from fastsft.adapters.prompt_peft import save_peft_prompt_adapter

        return save_peft_prompt_adapter(model, out, base_model_name_or_path)

    from fastsft._fsutil import replace_dir

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(peft_state_dict(model), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        config = adapter_config(model, section, base_model_name_or_path)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if out.exists():
            for item in out.iterdir():
                if item.name not in (CONFIG_NAME, WEIGHTS_NAME) and not (tmp / item.name).exists():
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------


def build_adapters(model, section: AdapterSection, base_dtype=None, key: str = "adapter", tokenizer=None):
    """(model, the section actually used): `model` turned into frozen base + adapters in place. With
    `section.init_from` the shapes (rank, targets, modules_to_save...) come from that PEFT directory and its tensors
    are loaded; otherwise adapters start at PEFT's init (step 0 equals the base). Prompt methods
    (fastsft/adapters/prompt.py) attach `model.prompt_adapter`; `tokenizer` encodes prompt_init_text."""
    if section.method in PROMPT_METHODS:
        return model, _build_prompt_adapter(model, section, key, tokenizer)
    if section.method not in LORA_METHODS:
        raise ValueError(f"{key}.method={section.method!r}: build_adapters builds {', '.join(LORA_METHODS)}")
    if section.init_from:
        section = section_from_adapter_dir(section.init_from, model, section)
        apply_adapters(model, section, base_dtype, key)
        load_peft_adapter(model, section.init_from)
    else:
        apply_adapters(model, section, base_dtype, key)
    return model, section


def _build_prompt_adapter(model, section: AdapterSection, key: str, tokenizer) -> AdapterSection:
    from fastsft.adapters.prompt_peft import PEFT_TYPES, build_from_section

    if section.init_from:  # the directory decides the method: P-tuning comes back folded, as prompt tuning
        peft_type = read_adapter_config(section.init_from).get("peft_type")
        wanted = "prefix_tuning" if section.method == "prefix_tuning" else ("prompt_tuning", "p_tuning")
        if peft_type not in PEFT_TYPES.values() or {v: k for k, v in PEFT_TYPES.items()}[peft_type] not in wanted:
            raise ValueError(f"{key}.init_from={section.init_from}: a {peft_type} adapter, but {key}.method is "
                             f"{section.method}; set {key}.method to match the adapter")
    adapter = build_from_section(model, section, tokenizer, key=key)
    if section.init_from:
        section = replace(section, method=adapter.config.method, num_virtual_tokens=adapter.config.num_virtual_tokens)
    return section


def read_adapter_config(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {CONFIG_NAME}; expected a PEFT adapter directory "
                                f"({CONFIG_NAME} + {WEIGHTS_NAME})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {e.lineno}: invalid JSON: {e.msg}") from None


def section_from_adapter_dir(directory: str | Path, model: nn.Module, section: AdapterSection) -> AdapterSection:
    """`section` with rank, alpha, dropout, rsLoRA, DoRA, target modules and modules_to_save taken from the PEFT
    adapter in `directory` (the adapter fixes the shapes; `section.method` qlora keeps the 4-bit base). Anything the
    adapter uses that fastsft does not implement is an error naming the file and field."""
    config = read_adapter_config(directory)
    where = Path(directory) / CONFIG_NAME
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{where}: peft_type {config.get('peft_type')!r} is not supported; supported: LORA")
    for name, neutral in _UNSUPPORTED.items():
        if config.get(name, neutral) not in (neutral, None) and config.get(name) != neutral:
            raise ValueError(f"{where}: {name}={config[name]!r} is not supported by fastsft (supported: {neutral!r})")
    targets = config.get("target_modules")
    linears = block_linears(model)
    if isinstance(targets, str):  # PEFT: a regex fully matched against module paths
        paths = [n for n in linears if re.fullmatch(targets, hf_module_path(model, n))]
    elif targets:
        paths = sorted({n for n in linears for t in targets if n == t or n.endswith("." + t)})
    else:
        paths = []
    if not paths:
        raise ValueError(f"{where}: target_modules {targets!r} matches no block linear of this model")
    use_dora = bool(config.get("use_dora", False))
    method = section.method
    if use_dora and method != "dora":
        raise ValueError(f"{where}: the adapter is DoRA (use_dora=true); set adapter.method=dora")
    if not use_dora and method == "dora":
        raise ValueError(f"{where}: the adapter is plain LoRA (use_dora=false); set adapter.method=lora or qlora")
    modules_to_save = []
    for entry in config.get("modules_to_save") or []:
        hits = [n for n, _ in model.named_modules() if n and (n == entry or n.endswith("." + entry))]
        if not hits:
            raise ValueError(f"{where}: modules_to_save entry {entry!r} names no module of this model")
        modules_to_save += hits
    return replace(section, rank=int(config["r"]), alpha=float(config.get("lora_alpha", 8)),
                   dropout=float(config.get("lora_dropout", 0.0)), use_rslora=bool(config.get("use_rslora", False)),
                   target_modules=paths, modules_to_save=sorted(set(modules_to_save)))


def load_peft_adapter(model: nn.Module, directory: str | Path) -> None:
    """Copy the tensors of a PEFT adapter directory into an adapted model (built by `apply_adapters` from
    `section_from_adapter_dir`). Every trainable tensor must be in the file and every tensor of the file must have
    a place: otherwise an error listing them."""
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {WEIGHTS_NAME} (PEFT's .bin adapters are not read: re-save with "
                                f"safe_serialization=True)")
    stored = {_strip_adapter_name(k): v for k, v in load_file(str(path)).items()}
    expected = peft_state_dict_names(model)
    missing = [k for k in expected if k not in stored]
    unexpected = [k for k in stored if k not in expected]
    if missing or unexpected:
        raise ValueError(f"{path}: does not fit the adapted model: missing {_some(missing)}; unexpected "
                         f"{_some(unexpected)}")
    with torch.no_grad():
        for key, name in expected.items():
            param = model.get_parameter(name)
            tensor = stored[key]
            if tuple(tensor.shape) != tuple(param.shape):
                raise ValueError(f"{path}: {key} has shape {tuple(tensor.shape)}, the model expects "
                                 f"{tuple(param.shape)}")
            param.copy_(tensor.to(param.dtype))


def peft_state_dict_names(model: nn.Module) -> dict[str, str]:
    """PEFT key -> our parameter name, for every trainable parameter."""
    hf_names = _hf_key_map(model.config)
    adapted = adapted_modules(model)
    names = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        module_path, _, leaf = name.rpartition(".")
        if module_path in adapted and leaf in ADAPTER_SUFFIXES:
            names[f"{PREFIX}{hf_module_path(model, module_path)}.{ADAPTER_SUFFIXES[leaf]}"] = name
        elif name in hf_names:
            names[PREFIX + hf_names[name]] = name
        else:
            raise ValueError(f"trainable parameter {name} has no PEFT name")
    return names


def _strip_adapter_name(key: str) -> str:
    """PEFT files never hold the adapter name, but a raw PeftModel state dict does (`.default.`, modules_to_save)."""
    key = key.replace(".modules_to_save.default.", ".").replace(".default.", ".")
    return key.replace(".lora_magnitude_vector.weight", ".lora_magnitude_vector")


def _some(names: list[str], limit: int = 6) -> str:
    if not names:
        return "none"
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


# ---------------------------------------------------------------------------------------------------------------
# Merged export
# ---------------------------------------------------------------------------------------------------------------


def save_merged(model: nn.Module, out: str | Path, dtype: torch.dtype = torch.bfloat16,
                max_shard_size: int | str = "5GB") -> Path:
    """A full Hugging Face checkpoint with every adapter folded into its weight (QLoRA: into the dequantized base),
    in `dtype`. Modifies `model` in place (it becomes a plain Transformer)."""
    from fastsft.hf_checkpoint import save_pretrained

    if getattr(model, "prompt_adapter", None) is not None:
        raise ValueError("--merge: prompt tuning, P-tuning and prefix tuning add inputs or keys, not weight updates: "
                         "there is nothing to merge; export the PEFT adapter directory (drop --merge)")

    merge_adapters(model, dtype)
    return save_pretrained(model, out, max_shard_size=max_shard_size, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# fastsft checkpoints of adapter runs, and PEFT directories on top of a base (export, generate)
# ---------------------------------------------------------------------------------------------------------------


def adapter_run_config(checkpoint: str | Path) -> dict | None:
    """The saved train config (config.yaml) of a fastsft checkpoint when that run trained adapters (LoRA family or
    prompt methods), else None."""
    import yaml

    path = Path(checkpoint) / "config.yaml"
    if not path.is_file():
        return None
    cfg = yaml.safe_load(path.read_text()) or {}
    return cfg if (cfg.get("adapter") or {}).get("method") in LORA_METHODS + PROMPT_METHODS else None


def load_adapter_checkpoint(checkpoint: str | Path, state: dict[str, torch.Tensor], device="cpu",
                            base: str | Path | None = None):
    """(model, adapter section, base directory) of a fastsft checkpoint that holds only adapters: the base model
    is loaded from the run's model.path (or `base`), the adapters rebuilt from its config.yaml and `state` (the
    checkpoint's trained tensors, read by fastsft.train.checkpoint) loaded into them."""
    from fastsft.hf_checkpoint import load_pretrained

    checkpoint = Path(checkpoint)
    cfg = adapter_run_config(checkpoint)
    if cfg is None:
        raise ValueError(f"{checkpoint}: not a checkpoint of an adapter run (config.yaml adapter.method)")
    fields = AdapterSection.__dataclass_fields__
    section = AdapterSection(**{k: v for k, v in cfg["adapter"].items() if k in fields})
    if section.method in PROMPT_METHODS:  # the trained prompts come from the checkpoint: no text to tokenize
        section = replace(section, prompt_init="random", prompt_init_text=None)
    base = Path(base or (cfg.get("model") or {}).get("path") or "")
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint}: trained adapters on the base model {str(base)!r}, which is not a model "
                                f"directory here; pass --base DIR (the same base model)")
    model = load_pretrained(base, device=device)
    model, section = build_adapters(model, section)
    load_adapter_state(model, {k: v.to(device) for k, v in state.items()}, str(checkpoint))
    return model, section, str(base)


def apply_peft_dir(model: nn.Module, directory: str | Path, method: str | None = None) -> AdapterSection:
    """Put the PEFT adapter of `directory` on `model` (a base Transformer), in place; returns the section used.
    `method` qlora keeps the base in NF4; default: lora or dora as the adapter says (or the prompt method of a
    PROMPT_TUNING, P_TUNING or PREFIX_TUNING adapter)."""
    config = read_adapter_config(directory)
    if config.get("peft_type") in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"):
        method = "prefix_tuning" if config["peft_type"] == "PREFIX_TUNING" else "prompt_tuning"
        return build_adapters(model, AdapterSection(method=method, init_from=str(directory)))[1]
    use_dora = bool(config.get("use_dora", False))
    section = AdapterSection(method=method or ("dora" if use_dora else "lora"), init_from=str(directory))
    return build_adapters(model, section)[1]
