"""Building a run's components from its config: tokenizer, prepared data, model, loader, schedule length.

Sits between the config (`fastsft.train.config`) and the trainer (`fastsft.train.trainer`), which calls these plain
functions once, in its constructor, in the order data flows:

    tokenizer (fastsft.data.tokenizer) -> prepared shards (fastsft.data.prepare, cached by content hash)
    -> PackedLoader rows (fastsft.data.loader, this rank's share) -> Transformer (fastsft.model)

Errors the user can fix are `RunError`s whose message names the option and what to do.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from fastsft.adapters.config import prompt_row_tokens
from fastsft.train import distributed
from fastsft.train.config import TrainConfig


class RunError(RuntimeError):
    """The run cannot go on for a reason the user can act on; the message says what to do."""


def oom_message(cfg: TrainConfig) -> str:
    return (
        "CUDA out of memory. Lower the memory a step needs with one of these (then run again; the run resumes from "
        "its last checkpoint):\n"
        f"  data.seq_len={cfg.data.seq_len}  -> a smaller packed row, e.g. data.seq_len={max(1, cfg.data.seq_len // 2)}\n"
        f"  train.gradient_checkpointing={cfg.train.gradient_checkpointing}  -> train.gradient_checkpointing=true "
        "(activation checkpointing: recompute blocks in backward)\n"
        f"  train.gradient_accumulation_steps={cfg.train.gradient_accumulation_steps}  -> micro-batches are one row "
        "each, so memory does not grow with it; keep the tokens per step by raising it when you lower seq_len\n"
        "  more GPUs: torchrun --nproc_per_node N -m fastsft train ... shards parameters and optimizer state (FSDP2)"
    )


def resolve_tokenizer_spec(cfg: TrainConfig) -> str:
    if cfg.model.tokenizer:
        return cfg.model.tokenizer
    if cfg.model.path:
        return cfg.model.path
    return "byte"


def default_cache_dir(cfg: TrainConfig) -> Path:
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir)
    return Path(cfg.output_dir).resolve().parent / ".cache" / "fastsft"


def prepare_data(cfg: TrainConfig, tokenizer, info: distributed.DistInfo, say) -> tuple[tuple, tuple | None]:
    """((train_dir, split), (val_dir, split) or None). Raw files are prepared once (rank 0), cached by content hash."""
    from fastsft.data.manifest import split_documents
    from fastsft.data.prepare import prepare_cached

    files = [str(f) for f in cfg.data.train_files]
    if not files:
        raise RunError("no training data: pass --data FILE.jsonl (or a prepared directory), or data.train_files=...")
    options = dict(
        max_len=cfg.data.max_len,
        format=cfg.data.format,
        workers=cfg.data.workers,
        seed=cfg.train.seed,
        skip_bad=cfg.data.skip_bad,
        train_on=cfg.data.train_on,
        template_kwargs=cfg.data.chat_template_kwargs,
        earlier_reasoning=cfg.data.earlier_reasoning,
        split=cfg.data.split,
        columns=cfg.data.columns,
    )
    cache = default_cache_dir(cfg)

    def prepare(paths, val_fraction):
        if len(paths) == 1 and _is_prepared(Path(paths[0])):
            check_prepared_tokenizer(Path(paths[0]), tokenizer, say if info.is_main else lambda _: None)
            return Path(paths[0])
        for p in paths:
            if _is_prepared(Path(p)):
                raise RunError(f"data: {p} is a prepared directory; give it alone, or only data files and folders")
        result = None
        if info.is_main:
            result = str(prepare_cached(paths, tokenizer, cache, val_fraction=val_fraction, progress=True, **options))
            say(f"data: {', '.join(paths)} -> {result} (tokenized once, cached by content hash)")
        return Path(distributed.broadcast_object(result, info))

    train_dir = prepare(files, 0.0 if cfg.data.val_files else cfg.data.val_fraction)
    if cfg.data.val_files:
        val = (prepare([str(f) for f in cfg.data.val_files], 0.0), "train")
    elif split_documents(train_dir, "val"):  # None: no manifest; 0: no val split
        val = (train_dir, "val")
    else:
        val = None
    return (train_dir, "train"), val


def _is_prepared(path: Path) -> bool:
    """Prepared data (manifest.json, or shard files here or in train/: what open_shards reads), as opposed to a
    folder of records (`datasets` save_to_disk, a hub download) that `prepare_cached` reads."""
    return path.is_dir() and ((path / "manifest.json").is_file() or any(path.glob("*.shard"))
                              or any((path / "train").glob("*.shard")))


def check_prepared_tokenizer(prepared: Path, tokenizer, say) -> None:
    """A prepared directory must hold the ids of the run's tokenizer: another tokenizer's ids that fit the vocabulary
    would train silently on the wrong text (Llama 3 ids fit Qwen3's vocabulary). A different vocabulary size is an
    error, checked before the model is built; the same size with other files only a note: re-saving a tokenizer
    changes its files, not its ids, and the byte tokenizer saved as a Hugging Face one gives the same ids."""
    from fastsft.data.manifest import recorded_tokenizer

    saved = recorded_tokenizer(prepared)
    if saved is None:
        return  # a bare directory of shards: nothing recorded to compare
    now = tokenizer.identity()
    if saved.get("vocab_size") != now["vocab_size"]:
        raise RunError(
            f"data: {prepared} was prepared with tokenizer {saved.get('name')!r} ({saved.get('kind')}, vocab "
            f"{saved.get('vocab_size')}) but this run uses {now['name']!r} ({now['kind']}, vocab {now['vocab_size']}); "
            "prepare the data again with the run's tokenizer (fastsft prepare --tokenizer DIR), or pass the raw "
            ".jsonl files to --data"
        )
    if saved.get("hash") != now["hash"]:
        say(f"note: {prepared} was prepared with tokenizer {saved.get('name')!r} (vocab {saved.get('vocab_size')}), "
            f"not exactly this run's {now['name']!r} (vocab {now['vocab_size']}); make sure they give the same ids")


def require_model_dir(cfg: TrainConfig) -> Path:
    """model.path as a Path, or a RunError naming the option when it is not a Hugging Face model directory."""
    path = Path(cfg.model.path)
    if not (path / "config.json").is_file():
        raise RunError(f"model.path={path} (--model): no config.json there; give a local Hugging Face model directory "
                       "(config.json + safetensors). Nothing is downloaded.")
    return path


def build_model(cfg: TrainConfig, vocab_size: int, device: torch.device, dtype: torch.dtype):
    """The model on `device` in `dtype` (the Precision's parameter dtype): loaded from model.path, or new from the
    model.* fields (seeded by train.seed)."""
    from fastsft.hf_checkpoint import config_from_hf, load_pretrained
    from fastsft.model import Transformer

    if cfg.model.path:
        path = require_model_dir(cfg)
        try:
            model = load_pretrained(str(path), dtype=dtype, device=device)
        except ValueError as e:  # an unsupported or inconsistent checkpoint: the message says what is supported
            raise RunError(str(e) if str(path) in str(e) else f"model.path={path}: {e}") from None
        embed_rows = model.config.vocab_size
        if vocab_size > embed_rows:
            raise RunError(
                f"the tokenizer has {vocab_size} ids but {path} embeds only {embed_rows}; use the model's own tokenizer"
            )
        try:  # refused at setup rather than at the first step
            model.check_max_seqlen(cfg.data.seq_len)
        except ValueError as e:
            raise RunError(f"{path / 'config.json'} and data.seq_len: {e}") from None
        return model
    hf = dict(
        model_type="llama",
        vocab_size=vocab_size,
        hidden_size=cfg.model.hidden_size,
        intermediate_size=cfg.model.intermediate_size,
        num_hidden_layers=cfg.model.num_hidden_layers,
        num_attention_heads=cfg.model.num_attention_heads,
        num_key_value_heads=cfg.model.num_key_value_heads,
        max_position_embeddings=cfg.model.max_position_embeddings,
        rope_theta=cfg.model.rope_theta,
        tie_word_embeddings=cfg.model.tie_word_embeddings,
    )
    return Transformer.from_config(config_from_hf(hf, source="model.* options"), dtype=dtype, device=device,
                                   seed=cfg.train.seed)


def make_loader(dataset, cfg: TrainConfig, info: distributed.DistInfo, seed: int):
    from fastsft.data.loader import PackedLoader

    return PackedLoader(
        dataset,
        seq_len=cfg.data.seq_len,
        max_docs=cfg.data.max_docs,
        seed=seed,
        rank=info.rank,
        world_size=info.world_size,
        long_docs=cfg.data.long_docs,
        prefetch=cfg.data.prefetch,
        loss_bucket="auto",  # loss over the supervised positions only, bucket chosen from the data
        virtual_tokens=prompt_row_tokens(cfg.adapter),  # prompt / P-tuning slots before each document
    )


def total_optimizer_steps(cfg: TrainConfig, micro_batches_per_epoch: int) -> int:
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    steps = math.ceil(cfg.train.num_train_epochs * micro_batches_per_epoch / cfg.train.gradient_accumulation_steps)
    return max(1, steps)


def warmup_steps(cfg: TrainConfig, total: int) -> int:
    if cfg.optim.warmup_steps > 0:
        return cfg.optim.warmup_steps
    return int(round(cfg.optim.warmup_ratio * total))


def attention_context(dataset, seq_len: int) -> float:
    """Mean attention context of a token in packed rows: sum(len^2) / sum(len) over documents (capped at seq_len),
    what `Transformer.flops_per_token` wants for its attention term."""
    import numpy as np

    lengths = np.minimum(np.asarray(dataset.lengths, dtype=np.float64), seq_len)
    return float((lengths**2).sum() / max(lengths.sum(), 1.0))
