"""Helpers shared by the trainer tests (tests/test_train_*.py, test_checkpoint.py, test_distributed.py, test_export.py):
a tiny instruction dataset written on the fly, and overrides for a tiny model that trains in well under a second per
step on CPU."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch


def write_tiny_data(directory: Path, num_train: int = 96, num_val: int = 16, seed: int = 0) -> tuple[Path, Path]:
    """Two small .jsonl files (alpaca and messages records of reverse/uppercase tasks), fresh random words."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)

    def word():
        return "".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 5)))

    def records(n):
        out = []
        for i in range(n):
            w = word()
            if i % 2:
                out.append({"instruction": "Reverse.", "input": w, "output": w[::-1]})
            else:
                out.append({"messages": [{"role": "user", "content": f"Upper: {w}"},
                                         {"role": "assistant", "content": w.upper()}]})
        return out

    train, val = directory / "train.jsonl", directory / "val.jsonl"
    for path, n in ((train, num_train), (val, num_val)):
        rows = records(n)
        # one file per format keeps format detection per file simple
        path.write_text("".join(json.dumps(r) + "\n" for r in rows if "messages" in r))
        path.with_name(path.stem + "_alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows
                                                                         if "instruction" in r))
    return train, val


def tiny_overrides(out_dir: Path, data_dir: Path, **extra) -> list[str]:
    """key=value overrides for a tiny run on write_tiny_data's files (cache kept beside the data)."""
    options = {
        "output_dir": str(out_dir),
        "data.train_files": json.dumps([str(data_dir / "train.jsonl"), str(data_dir / "train_alpaca.jsonl")]),
        "data.val_files": json.dumps([str(data_dir / "val.jsonl"), str(data_dir / "val_alpaca.jsonl")]),
        "data.cache_dir": str(data_dir / "cache"),
        "data.seq_len": 64,
        "data.max_docs": 8,
        "data.prefetch": 0,
        "model.tokenizer": "byte",
        "model.hidden_size": 32,
        "model.intermediate_size": 64,
        "model.num_hidden_layers": 2,
        "model.num_attention_heads": 4,
        "model.num_key_value_heads": 2,
        "model.max_position_embeddings": 128,
        "optim.learning_rate": 3e-3,
        "optim.warmup_steps": 2,
        "train.gradient_accumulation_steps": 2,
        "train.max_steps": 6,
        "train.device": "cpu",
        "eval.eval_at_start": False,
        "log.logging_steps": 1,
        "log.progress_bar": False,
        "log.tensorboard": False,
        "log.plot": False,
    }
    options.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in options.items()]


def tiny_config(out_dir: Path, data_dir: Path, **extra):
    from fastsft.train.config import load_config

    return load_config(None, tiny_overrides(out_dir, data_dir, **extra))


def final_weights(run_dir: Path) -> dict:
    """The model weights of the newest checkpoint of a run."""
    from fastsft.train.checkpoint import latest_checkpoint

    path = latest_checkpoint(run_dir)
    assert path is not None, f"no checkpoint in {run_dir}"
    return torch.load(path / "model.pt", map_location="cpu", weights_only=True)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs (max abs diff {(a[name] - b[name]).abs().max()})"
