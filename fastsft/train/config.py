"""Every option of `fastsft train` in one dataclass tree: defaults, one-line docs, YAML files and dotted overrides.

Sits at the very start of the flow: `fastsft train --config run.yaml optim.learning_rate=3e-4` -> `load_config` ->
`TrainConfig` -> the trainer. Names follow transformers' TrainingArguments where they mean the same thing
(num_train_epochs, max_steps, learning_rate, warmup_ratio, save_total_limit, ...).

`python -m fastsft.train.config --markdown` prints the options table for the README; `--yaml` prints the defaults.
An unknown key is an error that names it, says where it came from (file and line, or the command line) and suggests
the closest known keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fastsft.adapters.config import AdapterSection, validate_adapter


class ConfigError(ValueError):
    """A user mistake in a config file or an override; the message says what, where and what to do."""


def _opt(default, doc: str, choices: tuple | None = None):
    """A config field with its default, its one-line doc and (optionally) the values it may take."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"doc": doc, "choices": choices})
    return field(default=default, metadata={"doc": doc, "choices": choices})


@dataclass
class ModelSection:
    path: str | None = _opt(None, "local Hugging Face model directory to fine-tune; null builds a new model from the fields below (the demo)")
    tokenizer: str | None = _opt(None, "tokenizer: a directory, or 'byte' for the built-in byte tokenizer; null = the model directory's, or 'byte' for a new model")
    dtype: str = _opt("auto", "parameter dtype: auto (float32 master weights; a GPU computes in bf16, see train.precision), float32, bfloat16", ("auto", "float32", "bfloat16"))
    hidden_size: int = _opt(192, "new model only: hidden size")
    intermediate_size: int = _opt(512, "new model only: SwiGLU inner size")
    num_hidden_layers: int = _opt(4, "new model only: number of transformer blocks")
    num_attention_heads: int = _opt(6, "new model only: query heads")
    num_key_value_heads: int = _opt(2, "new model only: key/value heads (grouped-query attention)")
    max_position_embeddings: int = _opt(2048, "new model only: longest position the rotary embedding is set up for")
    rope_theta: float = _opt(10000.0, "new model only: rotary embedding base")
    tie_word_embeddings: bool = _opt(True, "new model only: share the input embedding with the output head")


@dataclass
class DataSection:
    train_files: list = _opt([], "training data: files or folders as fastsft prepare --data reads them (prepared on the fly, cached by content hash) or one prepared directory")
    val_files: list = _opt([], "validation data files; empty = the prepared directory's val split (see val_fraction)")
    format: str = _opt("auto", "record format of the data files: auto (detected per file), alpaca, messages, sharegpt, prompt-completion, text", ("auto", "alpaca", "messages", "sharegpt", "prompt-completion", "text"))
    train_on: str = _opt("all", "conversations: all = every assistant turn carries loss, last = only the final one (prompts never do)", ("all", "last"))
    chat_template_kwargs: dict | None = _opt(None, "keyword arguments for the chat template when preparing, e.g. {enable_thinking: false} (give the same to fastsft generate --chat-template-kwargs)")
    earlier_reasoning: str = _opt("template", "reasoning the chat template does not render (Qwen3 drops it before the last user message): template = train those turns without it; keep = train each in its own document with it", ("template", "keep"))
    split: str | None = _opt(None, "the split to read from a DatasetDict folder or a hub folder with several splits")
    columns: str | None = _opt(None, "read a format's field from another column: FIELD=COLUMN[,...], e.g. messages=conversations")
    val_fraction: float = _opt(0.0, "fraction of the training records held out for validation when no val_files are given")
    seq_len: int = _opt(2048, "tokens per packed row (one micro-batch)")
    max_docs: int = _opt(64, "most documents packed into one row")
    max_len: int | None = _opt(None, "truncate documents to this many tokens when preparing; null = keep them whole (the loader applies long_docs)")
    long_docs: str = _opt("truncate", "documents longer than seq_len: truncate (keep the first seq_len tokens) or drop", ("truncate", "drop"))
    cache_dir: str | None = _opt(None, "where prepared data is cached; null = OUT/../.cache/fastsft")
    workers: int = _opt(1, "processes used to tokenize when preparing")
    skip_bad: bool = _opt(False, "skip malformed records (counted) instead of stopping with an error")
    prefetch: int = _opt(2, "batches the loader assembles ahead of the model")
    verify: bool = _opt(True, "read every shard once at start: payload checksum, token ids and loss mask against the header (false: header checks only)")


@dataclass
class OptimSection:
    learning_rate: float = _opt(2e-5, "peak learning rate (AdamW)")
    weight_decay: float = _opt(0.0, "AdamW weight decay (not applied to norms and biases)")
    adam_beta1: float = _opt(0.9, "AdamW beta1")
    adam_beta2: float = _opt(0.95, "AdamW beta2")
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon")
    lr_scheduler_type: str = _opt("cosine", "decay after warmup: cosine, linear or constant", ("cosine", "linear", "constant"))
    warmup_steps: int = _opt(0, "linear warmup steps (wins over warmup_ratio when > 0)")
    warmup_ratio: float = _opt(0.03, "linear warmup as a fraction of the total steps")
    min_lr_ratio: float = _opt(0.0, "learning rate at the end of the decay, as a fraction of the peak")
    max_grad_norm: float = _opt(1.0, "clip the global gradient norm to this; 0 disables clipping")
    fused: bool = _opt(True, "use the fused AdamW implementation where the device has one")


@dataclass
class TrainSection:
    num_train_epochs: float = _opt(1.0, "passes over the training data (used when max_steps <= 0)")
    max_steps: int = _opt(-1, "optimizer steps to run; overrides num_train_epochs when > 0")
    gradient_accumulation_steps: int = _opt(8, "packed rows (micro-batches) per optimizer step on each rank")
    seed: int = _opt(42, "seed for model init, data order and sampling")
    precision: str = _opt("auto", "autocast precision: auto (bf16 on a GPU, fp32 on CPU), bf16 or fp32", ("auto", "bf16", "fp32"))
    torch_compile: bool = _opt(False, "compile the model with torch.compile")
    compile_mode: str | None = _opt(None, "torch.compile mode (null = default; e.g. max-autotune)")
    gradient_checkpointing: bool = _opt(False, "activation checkpointing: recompute each block in backward to save memory")
    freeze: list = _opt([], "glob patterns of parameter names to freeze (e.g. 'embed_tokens.*')")
    max_nonfinite_steps: int = _opt(5, "stop the run after this many optimizer steps in a row with a non-finite loss")
    device: str = _opt("auto", "auto (cuda when available), cuda or cpu", ("auto", "cuda", "cpu"))
    cpu_threads: int = _opt(0, "torch CPU threads per process (0 = torch's default; 1 is often fastest on a busy machine)")


@dataclass
class EvalSection:
    eval_steps: int = _opt(0, "evaluate every this many optimizer steps (0 = only at the end)")
    eval_max_batches: int = _opt(0, "packed validation rows per evaluation (0 = the whole split)")
    eval_at_start: bool = _opt(True, "also evaluate before the first step (a baseline to compare with)")
    generation_samples: int = _opt(0, "held-out prompts to generate from at each evaluation; exact-match accuracy is reported")
    generation_max_new_tokens: int = _opt(64, "most new tokens per sample generation")
    show_samples: int = _opt(3, "sample generations printed at each evaluation")
    early_stopping_patience: int = _opt(0, "stop after this many evaluations without a better val loss (0 = never)")


@dataclass
class LogSection:
    logging_steps: int = _opt(10, "log (progress bar, OUT/metrics.jsonl) every this many optimizer steps")
    save_steps: int = _opt(0, "write a checkpoint every this many optimizer steps (0 = only at the end)")
    save_total_limit: int = _opt(2, "keep this many most recent checkpoints (the best one by val loss is kept too)")
    tensorboard: bool = _opt(True, "also write TensorBoard events to OUT/tensorboard when tensorboard is installed")
    plot: bool = _opt(True, "write OUT/loss.png at the end when matplotlib is installed")
    progress_bar: bool = _opt(True, "tqdm progress bar on stderr: loss, lr, tokens/s, MFU (GPU), ETA")


@dataclass
class TrainConfig:
    output_dir: str = _opt("fastsft-out", "run directory: metrics.jsonl, checkpoints (fastsft export turns one into a Hugging Face model)")
    resume: str = _opt("auto", "auto: continue from the newest checkpoint in output_dir if any; never; always (error if none)", ("auto", "never", "always"))
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    log: LogSection = field(default_factory=LogSection)
    adapter: AdapterSection = field(default_factory=AdapterSection)


# ---------------------------------------------------------------------------------------------------------------------
# Walking the tree


def _is_section(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _field_types(cls) -> dict:
    return typing.get_type_hints(cls)


def iter_options(cls=TrainConfig, prefix: str = ""):
    """Yield (dotted_key, type, default, doc, choices) for every leaf option, in declaration order."""
    hints = _field_types(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_section(tp):
            yield from iter_options(tp, prefix + f.name + ".")
        else:
            yield prefix + f.name, tp, getattr(defaults, f.name), f.metadata.get("doc", ""), f.metadata.get("choices")


@functools.lru_cache(maxsize=1)
def _options_by_key() -> dict:
    return {key: (tp, choices) for key, tp, _default, _doc, choices in iter_options()}


def all_keys() -> list[str]:
    return list(_options_by_key())


# Common short names people type, mapped to the option they mean (used only for suggestions).
_ABBREVIATIONS = {
    "lr": "learning_rate",
    "epochs": "num_train_epochs",
    "steps": "max_steps",
    "grad_accum": "gradient_accumulation_steps",
    "accumulation_steps": "gradient_accumulation_steps",
    "warmup": "warmup_steps",
    "scheduler": "lr_scheduler_type",
    "clip": "max_grad_norm",
    "grad_clip": "max_grad_norm",
    "compile": "torch_compile",
    "activation_checkpointing": "gradient_checkpointing",
    "out": "output_dir",
    "patience": "early_stopping_patience",
    "data": "train_files",
}


def resolve_key(key: str) -> str | None:
    """The full dotted key for `key`: itself when it exists, or the one option whose leaf name it is (so
    `learning_rate=3e-4` works like `optim.learning_rate=3e-4`); None when unknown or ambiguous."""
    keys = all_keys()
    if key in keys:
        return key
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == key]
    return same_leaf[0] if len(same_leaf) == 1 else None


def suggest(key: str) -> str:
    """' Did you mean ...?' for an unknown dotted key: close spellings, and the same leaf name in another section."""
    keys = all_keys()
    leaf = key.rsplit(".", 1)[-1]
    matches = [k for k in keys if k.rsplit(".", 1)[-1] == _ABBREVIATIONS.get(leaf)]
    matches += [m for m in difflib.get_close_matches(key, keys, n=3, cutoff=0.6) if m not in matches]
    leaves = {k.rsplit(".", 1)[-1]: k for k in keys}
    for close in difflib.get_close_matches(leaf, list(leaves), n=3, cutoff=0.75):
        if leaves[close] not in matches:
            matches.append(leaves[close])
    return f" Did you mean {' or '.join(matches[:3])}?" if matches else ""


# ---------------------------------------------------------------------------------------------------------------------
# Values: type conversion for overrides and YAML


def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def convert_value(value, tp, key: str, where: str):
    """Check/convert one value to the field's type; raise ConfigError saying which key, where, and what is expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.strip().lower() in ("null", "none", "~") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert_value(value, arg, key, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: {key} cannot be {value!r}")
    bad = ConfigError(f"{where}: {key} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.strip().lower() in ("true", "yes", "on", "1")
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                pass
            try:
                as_float = float(value)
            except ValueError:
                raise bad from None
            if as_float.is_integer():
                return int(as_float)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    if tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value]
        if isinstance(value, str):
            # On the command line a list is comma-separated (data.train_files=a.jsonl,b.jsonl) or YAML flow ([a, b]).
            text = value.strip()
            if text.startswith("["):
                parsed = yaml.safe_load(text)
                return [str(v) for v in parsed]
            return [part.strip() for part in text.split(",") if part.strip()]
        raise bad
    if tp is dict or origin is dict:
        if isinstance(value, str):  # on the command line: JSON or a YAML flow mapping, e.g. '{enable_thinking: false}'
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise bad from None
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
        raise bad
    raise ConfigError(f"{where}: {key} has an unsupported type {tp!r} (a bug in fastsft.train.config)")


def _check_choices(value, choices, key: str, where: str) -> None:
    if choices and value is not None and value not in choices:
        raise ConfigError(f"{where}: {key} must be one of {', '.join(map(str, choices))}, got {value!r}")


def _lookup(key: str):
    """The (field type, choices) of a dotted key, or None if it does not exist."""
    return _options_by_key().get(key)


def set_value(cfg: TrainConfig, key: str, value, where: str) -> None:
    """Set one dotted key, converting the value; unknown keys raise ConfigError with suggestions."""
    key = resolve_key(key) or key
    found = _lookup(key)
    if found is None:
        raise ConfigError(f"{where}: unknown option {key!r}.{suggest(key)} (`fastsft train --help-config` lists all options)")
    tp, choices = found
    converted = convert_value(value, tp, key, where)
    _check_choices(converted, choices, key, where)
    *parents, leaf = key.split(".")
    target = cfg
    for name in parents:
        target = getattr(target, name)
    setattr(target, leaf, converted)


# ---------------------------------------------------------------------------------------------------------------------
# YAML files (with line numbers in errors) and command-line overrides


def _flatten_yaml(node, path: str, out: list, source: str) -> None:
    """Collect (dotted_key, python_value, line) from a composed YAML mapping, keeping where each key was written."""
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{source}:{node.start_mark.line + 1}: expected a mapping of options at {path or 'the top level'}")
    for key_node, value_node in node.value:
        key = f"{path}.{key_node.value}" if path else str(key_node.value)
        line = key_node.start_mark.line + 1
        is_section = any(k.startswith(key + ".") for k in all_keys())
        if is_section and isinstance(value_node, yaml.MappingNode):
            _flatten_yaml(value_node, key, out, source)
            continue
        if is_section:
            raise ConfigError(f"{source}:{line}: {key} is a section; write its options under it (e.g. {key}.<option>: value)")
        value = yaml.safe_load(yaml.serialize(value_node))
        out.append((key, value, line))


def load_yaml_file(cfg: TrainConfig, path: str | Path) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        root = yaml.compose(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if root is None:
        return cfg
    entries: list = []
    _flatten_yaml(root, "", entries, str(path))
    for key, value, line in entries:
        set_value(cfg, key, value, f"{path}:{line}")
    return cfg


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply `section.key=value` strings (values parsed like YAML scalars, then converted to the field's type)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"command line: {item!r} is not an override; write key=value, e.g. optim.learning_rate=3e-4"
            )
        key, raw = item.split("=", 1)
        key = key.strip().removeprefix("--")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, (dict,)):
            value = raw
        set_value(cfg, key, value, f"command line ({item})")
    return cfg


def load_config(config_file: str | None = None, overrides: list[str] | None = None, base: TrainConfig | None = None) -> TrainConfig:
    """Defaults (or `base`) <- the YAML file <- the overrides, in that order, then cross-field checks."""
    cfg = base if base is not None else TrainConfig()
    if config_file:
        load_yaml_file(cfg, config_file)
    apply_overrides(cfg, overrides or [])
    validate(cfg)
    return cfg


MAX_SEQ_LEN = 1 << 20  # one packed row of a million tokens is already far past any model's trained context


def validate(cfg: TrainConfig) -> None:
    """Checks that involve more than one field or a value's range."""
    positive = {
        "data.seq_len": cfg.data.seq_len,
        "data.max_docs": cfg.data.max_docs,
        "data.workers": cfg.data.workers,
        "train.gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
        "train.max_nonfinite_steps": cfg.train.max_nonfinite_steps,
        "log.logging_steps": cfg.log.logging_steps,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
    non_negative = {
        "eval.eval_steps": cfg.eval.eval_steps,
        "eval.eval_max_batches": cfg.eval.eval_max_batches,
        "eval.generation_samples": cfg.eval.generation_samples,
        "eval.early_stopping_patience": cfg.eval.early_stopping_patience,
        "log.save_steps": cfg.log.save_steps,
        "optim.warmup_steps": cfg.optim.warmup_steps,
        "optim.max_grad_norm": cfg.optim.max_grad_norm,
        "optim.weight_decay": cfg.optim.weight_decay,
        "data.prefetch": cfg.data.prefetch,
        "train.cpu_threads": cfg.train.cpu_threads,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    if not 2 <= cfg.data.seq_len <= MAX_SEQ_LEN:
        raise ConfigError(
            f"data.seq_len must be between 2 (a row needs a next token to learn from) and {MAX_SEQ_LEN:,} (2**20; the "
            f"step allocates activations for seq_len tokens), got {cfg.data.seq_len:,}"
        )
    if cfg.log.save_total_limit < 1:
        raise ConfigError(f"log.save_total_limit must be >= 1 (the last checkpoint is needed to resume), got {cfg.log.save_total_limit}")
    if cfg.optim.learning_rate <= 0:
        raise ConfigError(f"optim.learning_rate must be > 0, got {cfg.optim.learning_rate}")
    if not 0.0 <= cfg.optim.warmup_ratio < 1.0:
        raise ConfigError(f"optim.warmup_ratio must be in [0, 1), got {cfg.optim.warmup_ratio}")
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {cfg.optim.min_lr_ratio}")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {cfg.data.val_fraction}")
    if cfg.train.max_steps <= 0 and cfg.train.num_train_epochs <= 0:
        raise ConfigError("set train.max_steps > 0 or train.num_train_epochs > 0 (both are <= 0: the run would do nothing)")
    try:
        validate_adapter(cfg.adapter)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.model.path is None and cfg.model.hidden_size % cfg.model.num_attention_heads:
        raise ConfigError(
            f"model.hidden_size ({cfg.model.hidden_size}) must be divisible by model.num_attention_heads ({cfg.model.num_attention_heads})"
        )
    if cfg.model.path is None and cfg.model.num_attention_heads % cfg.model.num_key_value_heads:
        raise ConfigError(
            f"model.num_attention_heads ({cfg.model.num_attention_heads}) must be a multiple of model.num_key_value_heads ({cfg.model.num_key_value_heads})"
        )


# ---------------------------------------------------------------------------------------------------------------------
# Rendering


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def markdown_table() -> str:
    """The options table for the README: key, default, what it does."""
    lines = ["| option | default | what it does |", "|---|---|---|"]
    for key, _tp, default, doc, choices in iter_options():
        shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        text = doc if not choices or str(choices[0]) in doc else f"{doc} (one of: {', '.join(map(str, choices))})"
        lines.append(f"| `{key}` | `{shown}` | {text.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--markdown"]:
        sys.stdout.write(markdown_table())
        return 0
    if argv == ["--yaml"]:
        sys.stdout.write(to_yaml(TrainConfig()))
        return 0
    sys.stderr.write("usage: python -m fastsft.train.config --markdown | --yaml\n")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
