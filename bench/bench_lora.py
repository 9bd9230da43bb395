"""LoRA / QLoRA train-step benchmark: fastsft against transformers + PEFT on the same packed documents.

Variants (all LoRA r=16, alpha 32, dropout 0, every block linear q/k/v/o/gate/up/down, AdamW over the adapters only):
- fastsft_lora:     fastsft Transformer + fastsft.adapters (frozen base in the compute dtype, shared A GEMM per
                    q/k/v and gate/up group, B accumulated into the base output), one packed row per step (varlen
                    attention, loss over loss_positions only); blocks compiled on a GPU.
- fastsft_qlora:    the same on an NF4 (torchao, double quantization) base.
- hf_peft:          transformers LlamaForCausalLM + peft.get_peft_model, the same row's documents as one padding-free
                    sequence (restarting position_ids; sdpa).
- hf_peft_fastsft:  hf_peft with fastsft.integrations.transformers.apply (fused linear cross-entropy and RMSNorm
                    under PEFT), the nearest thing to transformers + PEFT + Liger.

Shapes: `tiny` (CPU: hidden 256, 4 layers, vocab 4096, rows of 1024 tokens; fp32, eager - inductor compile time on a
2-core CPU would dominate), `llama-3.2-1b` and `llama-3-8b` (GPU: bf16 base, fp32 adapters under bf16 autocast, rows
of 4096 tokens, activation checkpointing off). Random weights; documents lognormal (median 300 tokens on the GPU
shapes, 120 on tiny), the first 40% of each a prompt without loss, packed first-fit into rows.

Timing: median seconds per optimizer step after warm-up; on a CPU the variants alternate step by step in one process
(the machine is shared and noisy: the ratio is what means something); on a GPU each variant runs alone (CUDA-
synchronised wall time) so its peak memory (torch.cuda.max_memory_allocated, weights and optimizer included) is its own.

    python bench/bench_lora.py                         # CPU: tiny shape, ratio table, bench/results/lora.json
    python bench/bench_lora.py --shape llama-3-8b      # GPU
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402

from fastsft.data.batch import IGNORE_INDEX, LOSS_POSITION_FILL, PAD_ID, Batch  # noqa: E402

SHAPES = {
    "tiny": dict(model_type="llama", vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=4096),
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=True),
    "llama-3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                       max_position_embeddings=8192, tie_word_embeddings=False),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32.0
PROMPT_FRACTION = 0.4


def make_rows(num_rows: int, seq_len: int, vocab: int, median: int, seed: int = 0) -> list[list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    rows, free = [], []
    while len(rows) < num_rows or min(free) > seq_len // 8:
        length = int(min(seq_len, max(8, math.exp(math.log(median) + 0.8 * torch.randn((), generator=g).item()))))
        doc = torch.randint(1, vocab, (length,), generator=g).tolist()
        fits = [i for i, space in enumerate(free) if space >= length and len(rows[i]) < 62]
        if fits:
            rows[fits[0]].append(doc)
            free[fits[0]] -= length
        elif len(rows) < num_rows:
            rows.append([doc])
            free.append(seq_len - length)
        else:
            break
    return rows


def fastsft_batch(docs, seq_len: int, max_docs: int = 64) -> Batch:
    ids, positions, labels, ends = [], [], [], []
    for doc in docs:
        start = max(1, int(len(doc) * PROMPT_FRACTION))
        ids += doc
        positions += range(len(doc))
        labels += [doc[t + 1] if t + 1 >= start else IGNORE_INDEX for t in range(len(doc) - 1)] + [IGNORE_INDEX]
        ends.append(len(ids))
    used = len(ids)
    if used < seq_len:
        ids += [PAD_ID] * (seq_len - used)
        positions += range(seq_len - used)
        labels += [IGNORE_INDEX] * (seq_len - used)
        ends.append(seq_len)
    labels_t = torch.tensor(labels)
    supervised = (labels_t != IGNORE_INDEX).nonzero().flatten().to(torch.int32)
    loss_positions = torch.full((seq_len,), LOSS_POSITION_FILL, dtype=torch.int32)
    loss_positions[: len(supervised)] = supervised
    cu = [0] + ends + [seq_len] * (max_docs + 1 - len(ends))
    return Batch(torch.tensor(ids), torch.tensor(positions, dtype=torch.int32), labels_t,
                 torch.tensor(cu, dtype=torch.int32), seq_len, loss_positions, len(supervised), used, len(docs))


def hf_batch(docs) -> dict:
    ids = [t for d in docs for t in d]
    positions = [p for d in docs for p in range(len(d))]
    labels = []
    for d in docs:
        start = max(1, int(len(d) * PROMPT_FRACTION))
        labels += [IGNORE_INDEX] * start + d[start:]
    return {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions]), "labels": torch.tensor([labels])}


def fastsft_variant(shape: dict, rows, device, seq_len: int, quantize: bool):
    from fastsft.adapters import AdapterSection
    from fastsft.adapters.lora import apply_adapters
    from fastsft.hf_checkpoint import config_from_hf
    from fastsft.model import Transformer
    from fastsft.train.step import TrainStep, apply_compile, build_optimizer

    gpu = device.type == "cuda"
    model = Transformer.from_config(config_from_hf(shape), device=device, dtype=torch.bfloat16 if gpu else torch.float32, seed=0)
    apply_adapters(model, AdapterSection(method="qlora" if quantize else "lora", rank=RANK, alpha=ALPHA,
                                         target_modules=TARGETS))
    if gpu:
        apply_compile(model, "blocks")
    step = TrainStep(model, build_optimizer(model, lr=1e-4), max_grad_norm=1.0, precision="bf16" if gpu else "fp32")
    batches = [fastsft_batch(docs, seq_len).to(device) for docs in rows]
    return lambda i: step([batches[i % len(batches)]]).loss


def hf_variant(shape: dict, rows, device, fused: bool):
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    gpu = device.type == "cuda"
    config = LlamaConfig(**{k: v for k, v in shape.items() if k != "model_type"})
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
    model = model.to(torch.bfloat16 if gpu else torch.float32).train()
    if fused:
        from fastsft.integrations.transformers import apply

        apply(model)
    model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS,
                                                       lora_dropout=0.0))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    batches = [{k: v.to(device) for k, v in hf_batch(docs).items()} for docs in rows]

    def run(i):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            loss = model(**batches[i % len(batches)], use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return run


def projection_runs(shape: dict, tokens: int, device) -> dict:
    """The adapted projections of one block alone (q/k/v, o, gate/up, down; forward + backward into the adapters
    and the inputs), fastsft's against PEFT's LoRA layers on the same shapes: what the adapters cost, apart from
    attention and the loss."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastsft.adapters import AdapterSection
    from fastsft.adapters.lora import apply_adapters
    from fastsft.hf_checkpoint import config_from_hf
    from fastsft.model import Transformer, shared_input_projections

    one_layer = {**shape, "num_hidden_layers": 1}
    ours = Transformer.from_config(config_from_hf(one_layer), device=device, seed=0)
    apply_adapters(ours, AdapterSection(method="lora", rank=RANK, alpha=ALPHA, target_modules=TARGETS))
    hf = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in one_layer.items() if k != "model_type"})).to(device)
    hf = peft.get_peft_model(hf, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0))
    g = torch.Generator(device=device).manual_seed(0)
    hidden, inner = shape["hidden_size"], shape["intermediate_size"]
    attn_width = shape["num_attention_heads"] * shape.get("head_dim", hidden // shape["num_attention_heads"])
    x = torch.randn(tokens, hidden, device=device, generator=g, requires_grad=True)
    attn = torch.randn(tokens, attn_width, device=device, generator=g, requires_grad=True)
    act = torch.randn(tokens, inner, device=device, generator=g, requires_grad=True)

    def run_with(attn_mod, mlp_mod, grouped: bool):
        def run(_i):
            if grouped:
                qkv = shared_input_projections(x, (attn_mod.q_proj, attn_mod.k_proj, attn_mod.v_proj))
                gate_up = shared_input_projections(x, (mlp_mod.gate_proj, mlp_mod.up_proj))
            else:
                qkv = [attn_mod.q_proj(x), attn_mod.k_proj(x), attn_mod.v_proj(x)]
                gate_up = [mlp_mod.gate_proj(x), mlp_mod.up_proj(x)]
            outputs = [*qkv, *gate_up, attn_mod.o_proj(attn), mlp_mod.down_proj(act)]
            torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])
        return run

    layer = hf.base_model.model.model.layers[0]
    return {"fastsft_lora": run_with(ours.layers[0].self_attn, ours.layers[0].mlp, True),
            "hf_peft": run_with(layer.self_attn, layer.mlp, False)}


def build(name: str, shape, rows, device, seq_len):
    if name == "fastsft_lora":
        return fastsft_variant(shape, rows, device, seq_len, quantize=False)
    if name == "fastsft_qlora":
        return fastsft_variant(shape, rows, device, seq_len, quantize=True)
    return hf_variant(shape, rows, device, fused=name == "hf_peft_fastsft")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default=None, choices=sorted(SHAPES), help="default: tiny on CPU, llama-3.2-1b on GPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--variants", default="fastsft_lora,fastsft_qlora,hf_peft,hf_peft_fastsft")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    shape_name = args.shape or ("llama-3.2-1b" if gpu else "tiny")
    shape = SHAPES[shape_name]
    seq_len = 4096 if gpu else 1024
    steps = args.steps or (20 if gpu else 8)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 2)
    rows = make_rows(8, seq_len, shape["vocab_size"], median=300 if gpu else 120)
    tokens = [sum(len(d) for d in r) for r in rows]
    names = args.variants.split(",")
    results: dict = {}
    if gpu:  # one variant at a time: its own peak memory
        for name in names:
            run = build(name, shape, rows, device, seq_len)
            for i in range(warmup):
                run(i)
            sync(device)
            torch.cuda.reset_peak_memory_stats()
            times = []
            for i in range(steps):
                start = time.perf_counter()
                run(i)
                sync(device)
                times.append(time.perf_counter() - start)
            results[name] = {"step_s": statistics.median(times),
                             "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
            del run
            gc.collect()
            torch.cuda.empty_cache()
    else:  # alternate step by step: the shared CPU's noise hits every variant alike
        runs = {name: build(name, shape, rows, device, seq_len) for name in names}
        times = {name: [] for name in names}
        for i in range(warmup + steps):
            for name, run in runs.items():
                start = time.perf_counter()
                run(i)
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
        results = {name: {"step_s": statistics.median(t)} for name, t in times.items()}
        del runs
        gc.collect()
        projection = projection_runs(shape, seq_len, device)
        p_times = {name: [] for name in projection}
        for i in range(3 * (warmup + steps)):
            for name, run in projection.items():
                start = time.perf_counter()
                run(i)
                if i >= 3 * warmup:
                    p_times[name].append(time.perf_counter() - start)
        projection_s = {name: statistics.median(t) for name, t in p_times.items()}
    mean_tokens = sum(tokens) / len(tokens)
    reference = results.get("hf_peft", {}).get("step_s")
    print(f"{shape_name} on {device.type}: rows of {seq_len} slots, {mean_tokens:.0f} tokens per row on average, "
          f"LoRA r={RANK} on {', '.join(TARGETS)}")
    for name, r in results.items():
        r["tokens_per_s"] = mean_tokens / r["step_s"]
        if reference:
            r["speedup_vs_hf_peft"] = reference / r["step_s"]
        memory = f"  peak {r['peak_memory_gib']:.2f} GiB" if "peak_memory_gib" in r else ""
        ratio = f"  x{r['speedup_vs_hf_peft']:.2f} vs hf_peft" if reference else ""
        print(f"  {name:18s} {r['step_s'] * 1e3:9.1f} ms/step  {r['tokens_per_s']:10.0f} tokens/s{ratio}{memory}")
    payload = {"shape": shape_name, "seq_len": seq_len, "steps": steps, "rank": RANK, "results": results}
    if not gpu:
        ratio = projection_s["hf_peft"] / projection_s["fastsft_lora"]
        print(f"  adapted projections of one block alone ({seq_len} tokens, forward + backward): fastsft "
              f"{projection_s['fastsft_lora'] * 1e3:.1f} ms, PEFT {projection_s['hf_peft'] * 1e3:.1f} ms: x{ratio:.2f}")
        payload["projections_one_block_s"] = projection_s
    write_result(f"lora_{shape_name}", payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
