"""Helpers shared by the test modules (test modules import from here, never from each other).

- packed rows for the model tests: a tiny config, `make_batch` (the batch contract written from its docstring),
  random documents, weights spread wider than the init, relative error;
- `reduce_and_backward`: float64 per-token losses reduced like the cross-entropy ops do;
- tiny trainer runs: instruction data written on the fly and overrides for a model that trains in well under a
  second per step on CPU, the newest checkpoint's weights;
- tiny local Hugging Face tokenizers with chat templates (`build_hf_tokenizer`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from fastsft.data.batch import IGNORE_INDEX, LOSS_POSITION_FILL, PAD_ID, Batch

# ---------------------------------------------------------------------------------------------------------------------
# Packed rows and tiny models

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256)


def make_batch(docs, seq_len, max_docs=4, bucket=None, supervised=None) -> Batch:
    """Pack token lists into one row of the batch contract (fastsft/data/batch.py), written from its docstring:
    documents back to back, padding tail as its own segment, labels shifted within each document, loss_positions
    padded with -1. supervised[i][t] says whether token t of document i carries loss (default: all but the first)."""
    used = sum(len(d) for d in docs)
    assert used <= seq_len and len(docs) <= max_docs
    input_ids = torch.full((seq_len,), PAD_ID, dtype=torch.int64)
    position_ids = torch.zeros(seq_len, dtype=torch.int32)
    labels = torch.full((seq_len,), IGNORE_INDEX, dtype=torch.int64)
    ends, start = [], 0
    for i, doc in enumerate(docs):
        n = len(doc)
        input_ids[start:start + n] = torch.tensor(doc)
        position_ids[start:start + n] = torch.arange(n, dtype=torch.int32)
        for t in range(n - 1):
            if supervised is None or supervised[i][t + 1]:
                labels[start + t] = doc[t + 1]
        start += n
        ends.append(start)
    if used < seq_len:
        position_ids[used:] = torch.arange(seq_len - used, dtype=torch.int32)
        ends.append(seq_len)
    cu = [0] + ends + [seq_len] * (max_docs + 1 - len(ends))
    positions = (labels != IGNORE_INDEX).nonzero().flatten()
    bucket = seq_len if bucket is None else bucket
    loss_positions = torch.full((bucket,), LOSS_POSITION_FILL, dtype=torch.int32)
    loss_positions[: len(positions)] = positions.to(torch.int32)
    return Batch(input_ids=input_ids, position_ids=position_ids, labels=labels,
                 cu_seqlens=torch.tensor(cu, dtype=torch.int32), max_seqlen=seq_len, loss_positions=loss_positions,
                 num_loss_tokens=len(positions), num_tokens=used, num_docs=len(docs))


def random_docs(lengths, vocab=VOCAB, generator=None):
    return [torch.randint(1, vocab, (n,), generator=generator).tolist() for n in lengths]


def spread_weights(model: torch.nn.Module, std: float = 0.15) -> None:
    """Re-draw every parameter: larger spread than the 0.02 init so logits differ, norm gains around 1."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


# ---------------------------------------------------------------------------------------------------------------------
# float64 loss reference


def reduce_and_backward(losses, valid, reduction, row_weights=None, num_items=None):
    """The loss for `reduction` ("none" seeds the backward with row_weights; "mean" divides by num_items or the
    count of valid tokens, at least 1), after calling backward on it. Returns the detached loss."""
    if reduction == "none":
        loss = losses
        (losses * row_weights.double()).sum().backward()
    else:
        loss = losses.sum()
        if reduction == "mean":
            loss = loss / (num_items if num_items is not None else valid.sum().clamp(min=1))
        loss.backward()
    return loss.detach()


# ---------------------------------------------------------------------------------------------------------------------
# Tiny trainer runs


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
    from fastsft.train.checkpoint import latest_checkpoint, load_model_state

    path = latest_checkpoint(run_dir)
    assert path is not None, f"no checkpoint in {run_dir}"
    return load_model_state(path)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs (max abs diff {(a[name] - b[name]).abs().max()})"


# ---------------------------------------------------------------------------------------------------------------------
# Tiny Hugging Face tokenizers with chat templates

TOKENIZER_WORDS = ["hello", "world", "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "héllo", "数据", "a+b=c",
         "you", "are", "helpful", "42", "!", "?", "line\nbreak"]

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHATML_TEMPLATE = (  # Qwen-style: a default system prompt when the conversation has none
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The generation prompt opens a "thinking" block that history turns do not have, so rendering messages[:k] with the
# generation prompt is NOT a prefix of rendering messages[:k+1]: the span search fallback must handle it.
THINKING_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' }}{% endif %}"
)

HF_KINDS = {
    # name: (special tokens, chat template, bos, eos, end-of-turn marker, text after the marker that is not trained)
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"),
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHATML_TEMPLATE, None, "<|im_end|>", "<|im_end|>"),
    "thinking": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], THINKING_TEMPLATE, None, "<|endoftext|>",
                 "<|im_end|>"),
    "plain": (["<s>", "</s>"], None, "<s>", "</s>", "</s>"),
}


def build_hf_tokenizer(directory, kind: str):
    """Train a tiny byte-level BPE on a few strings, wrap it as a PreTrainedTokenizerFast with the kind's chat
    template, save it to `directory`; returns the directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials, template, bos, eos, _ = HF_KINDS[kind]
    rust = Tokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rust.train_from_iterator([" ".join(TOKENIZER_WORDS), "system user assistant you are a helpful assistant"] * 4, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=rust, bos_token=bos, eos_token=eos, chat_template=template)
    wrapped.save_pretrained(str(directory))
    return directory


def stop_after(trainer, step: int):
    """Make a built Trainer receive a real SIGTERM while it trains step `step - 1`: the loop reads the flag before
    the next step, so the run stops, checkpointed, after step `step` (as a signal arriving during that step would)."""
    import os
    import signal

    assert step >= 2, "the signal is sent from inside the step before"
    inner = trainer.train_step
    calls = {"n": 0}

    def step_then_signal(micro, num_items):
        calls["n"] += 1
        if calls["n"] == step - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return inner(micro, num_items)

    trainer.train_step = step_then_signal
    return trainer


TINY_BASE = dict(vocab_size=263, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)


def save_tiny_base(path: Path, **overrides) -> Path:
    """A tiny pretrained base with random weights (seed 0) as a Hugging Face directory; the byte tokenizer's 263 ids
    fit its vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**TINY_BASE, **overrides})).save_pretrained(path)
    return path


def assert_generate_with_adapter_equals_checkpoint(checkpoint: Path, base_dir: Path, adapter_dir: Path, capsys) -> None:
    """`fastsft generate` from a training checkpoint prints what the base model plus the exported PEFT adapter
    (`--adapter`) prints, greedy, on the CPU."""
    from fastsft.cli import main

    capsys.readouterr()
    common = ["--prompt", "abc", "--raw", "--max-new-tokens", "6", "--tokenizer", "byte", "--device", "cpu"]
    assert main(["generate", "--model", str(checkpoint), *common]) == 0
    from_checkpoint = capsys.readouterr().out
    assert main(["generate", "--model", str(base_dir), "--adapter", str(adapter_dir), *common]) == 0
    assert capsys.readouterr().out == from_checkpoint
