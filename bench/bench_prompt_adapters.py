"""Step time and memory of prompt tuning, P-tuning and prefix tuning against LoRA and full fine-tuning, on the same
model and the same packed documents, side by side in one process (the README's "when to use which method" table).

    PYTHONPATH=. python3 bench/bench_prompt_adapters.py [--steps 8] [--hidden 256 --layers 4 --seq-len 512]

Each method gets its own copy of one random base model and its own PackedLoader over one synthetic shard set
(prompt methods with virtual_tokens=n: the slots take row room, so fewer real tokens per row). The methods' steps
alternate round-robin after a warm-up, and each reports the median step time (forward + backward + AdamW) and real
(document) tokens per second. Memory is counted, not sampled: bytes of trainable parameters + their gradients + AdamW
states, and bytes of the tensors autograd saves for backward in one step (activations; measured with
saved_tensors_hooks, the same on any device). Ratios are against full fine-tuning. On a GPU the same script times with
CUDA synchronisation; LoRA comes from fastsft.adapters (skipped if that module is absent). Results go to
bench/results/prompt_adapters.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fastsft.adapters.prompt import PromptConfig, apply_prompt_adapter
from fastsft.data.loader import PackedLoader
from fastsft.data.shards import ShardWriter, open_shards
from fastsft.model import Transformer
from fastsft.train.step import TrainStep, build_optimizer


def synthetic_shards(directory: Path, vocab: int, docs: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    with ShardWriter(directory, vocab) as writer:
        for n in np.clip(rng.lognormal(np.log(120), 0.7, docs).astype(int), 8, 1000):
            writer.add(rng.integers(1, vocab, n), np.arange(n) >= n // 3)  # prompt third masked, response trained
    return open_shards(directory)


def build(method: str, base_state: dict, model_cfg: dict, n: int, rank: int):
    model = Transformer.from_config(model_cfg)
    model.load_state_dict(base_state)
    if method == "full":
        return model
    if method == "lora":
        from fastsft.adapters import build_adapters
        from fastsft.adapters.config import AdapterSection

        model, _ = build_adapters(model, AdapterSection(method="lora", rank=rank, alpha=2.0 * rank))
        return model
    kw = {"p_tuning": dict(encoder_type="mlp"), "prefix_tuning": {}, "prompt_tuning": {}}[method]
    apply_prompt_adapter(model, PromptConfig(method=method, num_virtual_tokens=n, **kw))
    return model


def saved_activation_bytes(step, batch) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step([batch])
    return total


def state_bytes(model, optimizer) -> dict:
    trainable = [p for p in model.parameters() if p.requires_grad]
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    grad_bytes = sum(p.numel() * p.element_size() for p in trainable)
    optim_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                      if torch.is_tensor(t))
    return dict(trainable_params=sum(p.numel() for p in trainable), param_bytes=param_bytes, grad_bytes=grad_bytes,
                optimizer_bytes=optim_bytes)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--max-docs", type=int, default=16)
    parser.add_argument("--virtual-tokens", type=int, default=20)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--methods", default="full,lora,prompt_tuning,p_tuning,prefix_tuning")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_cfg = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 16 * 16,
                     num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                     num_key_value_heads=max(1, args.hidden // 128), max_position_embeddings=4 * args.seq_len)
    base_state = Transformer.from_config(model_cfg, seed=0).state_dict()
    methods = args.methods.split(",")
    if "lora" in methods:
        try:
            import fastsft.adapters.lora  # noqa: F401
        except ImportError:
            print("fastsft.adapters.lora not available: skipping lora")
            methods.remove("lora")
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_shards(Path(tmp) / "shards", args.vocab, 3000)
        runs = {}
        for method in methods:
            model = build(method, base_state, model_cfg, args.virtual_tokens, args.rank).to(device)
            optimizer = build_optimizer(model, lr=1e-4)
            step = TrainStep(model, optimizer, precision="bf16" if device.type == "cuda" else "fp32")
            virtual = getattr(model.prompt_adapter, "row_tokens", 0) if model.prompt_adapter is not None else 0
            loader = PackedLoader(data, seq_len=args.seq_len, max_docs=args.max_docs, prefetch=0,
                                  virtual_tokens=virtual)
            runs[method] = dict(model=model, optimizer=optimizer, step=step, batches=iter(loader), times=[],
                                tokens=[])
        for i in range(args.warmup + args.steps):
            for method, run in runs.items():  # round-robin: the methods share the machine's state
                batch = next(run["batches"]).to(device)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                run["step"]([batch])
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= args.warmup:
                    run["times"].append(time.perf_counter() - start)
                    run["tokens"].append(batch.num_tokens)
        results = {}
        for method, run in runs.items():
            batch = next(run["batches"]).to(device)
            seconds = statistics.median(run["times"])
            results[method] = dict(
                step_s=seconds, tokens_per_s=sum(run["tokens"]) / sum(run["times"]),
                activation_bytes=saved_activation_bytes(run["step"], batch),
                **state_bytes(run["model"], run["optimizer"]))
    full = results.get("full")
    print(f"{'method':14} {'trainable':>10} {'step s':>8} {'tok/s':>8} {'time x':>7} {'tok/s x':>8} "
          f"{'grad+opt x':>10} {'activ. x':>8}")
    for method, r in results.items():
        ratio = (lambda key: r[key] / full[key] if full and full[key] else float("nan"))
        state = (r["grad_bytes"] + r["optimizer_bytes"]) / (full["grad_bytes"] + full["optimizer_bytes"]) if full else 0
        print(f"{method:14} {r['trainable_params']:>10,} {r['step_s']:>8.3f} {r['tokens_per_s']:>8.0f} "
              f"{ratio('step_s'):>7.2f} {ratio('tokens_per_s'):>8.2f} {state:>10.4f} {ratio('activation_bytes'):>8.2f}")
    payload = dict(config=vars(args), model=model_cfg, results=results)
    try:
        from bench.common import write_result

        print("wrote", write_result("prompt_adapters", payload))
    except ImportError:
        pass
    return payload


if __name__ == "__main__":
    main()
