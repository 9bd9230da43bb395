"""Train-step benchmark (GPU): fastsft's compiled step against transformers' LlamaForCausalLM on the same documents.

Model: Llama-3.2-1B-shaped (16 layers, hidden 2048, 32 query / 8 kv heads of 64, MLP 8192, vocab 128256, tied
embeddings, llama3 rope), random weights. All variants train the same way: fp32 master weights, bf16 autocast, fused
AdamW, gradient clipping at 1.0, one optimizer step per packed row of 8192 token slots.

Data: synthetic SFT-like documents (lognormal lengths, median 600 tokens, capped at 4096), the first 40% of each
document a prompt without loss; documents packed best-fit-decreasing into rows of 8192. Every variant sees the same
documents in the same steps:
- fastsft:            the row as the batch contract (one packed row, varlen attention, loss over loss_positions),
                      blocks compiled with torch.compile.
- hf_padded_sdpa:     (a) the row's documents as padded batches (attention_mask, sdpa), split into micro-batches of at
                      most 16384 padded token slots (in document order) with gradient accumulation, so the padded
                      logits fit in memory.
- hf_padding_free:    (b) the row's documents concatenated into one [1, n] sequence with restarting position_ids
                      (transformers' padding-free path; flash_attention_2 when flash-attn is installed, else sdpa with
                      its packed-sequence mask), with Liger-Kernel applied when installed.

Reported per variant: tokens/s (non-padding tokens per second of wall time over the timed steps, synchronised at
both ends), step time, MFU (model FLOPs per token from Transformer.flops_per_token with the token-weighted mean
document length as attention context, over the bf16 matmul rate measured in this process), peak memory allocated
(weights, gradients and optimizer state included). Variants run one after another in one process (three 1B models
with optimizer state do not fit side by side); each model is freed before the next is built.

    python bench/bench_step.py [--rows 12] [--warmup 3]   # table, bench/results/train_step.json
    pytest bench/bench_step.py --benchmark-only           # the same as a pytest-benchmark test
Without CUDA the pytest test skips and the script says so.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time

import torch
from common import matmul_tflops, requires_cuda, write_result

from fastsft.data.batch import IGNORE_INDEX, LOSS_POSITION_FILL, PAD_ID, Batch, attention_bounds
from fastsft.data.loader import LOSS_BUCKET_GRANULE
from fastsft.model import ModelConfig, Transformer
from fastsft.train.step import TrainStep, apply_compile, build_optimizer, mfu

SEQ_LEN = 8192
MAX_DOCS = SEQ_LEN // 32
DEVICE = "cuda"  # a module constant so a CPU smoke run can swap it
COMPILE = "blocks"  # fastsft's apply_compile mode ("none" in bench/gpu_proof.py --smoke: no C++ compile on CPU)
PADDED_BUDGET = 16384  # padded token slots per micro-batch of variant (a)
PROMPT_FRACTION = 0.4
LLAMA_3_2_1B = dict(
    model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5, max_position_embeddings=131072,
    rope_theta=500000.0, tie_word_embeddings=True,
    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
)


# ------------------------------------------------------------------------------------------------------------ data


def make_rows(num_rows: int, seed: int = 0) -> list[list[list[int]]]:
    """Rows of documents (token id lists), packed best-fit-decreasing into SEQ_LEN slots."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    while sum(len(d) for d in docs) < num_rows * SEQ_LEN * 1.05:
        length = int(min(4096, SEQ_LEN, max(16, math.exp(math.log(600) + 0.9 * torch.randn((), generator=g).item()))))
        docs.append(torch.randint(1, LLAMA_3_2_1B["vocab_size"], (length,), generator=g).tolist())
    rows: list[list[list[int]]] = []
    free: list[int] = []
    for doc in sorted(docs, key=len, reverse=True):
        fits = [i for i, space in enumerate(free) if space >= len(doc) and len(rows[i]) < MAX_DOCS]
        if fits:
            best = min(fits, key=lambda i: free[i])
            rows[best].append(doc)
            free[best] -= len(doc)
        else:
            rows.append([doc])
            free.append(SEQ_LEN - len(doc))
    order = torch.randperm(len(rows), generator=g).tolist()
    return [rows[i] for i in order[:num_rows]]


def prompt_length(doc: list[int]) -> int:
    return max(1, int(len(doc) * PROMPT_FRACTION))


def supervised_positions(doc: list[int]) -> int:
    return len(doc) - prompt_length(doc)  # labels t = start - 1 .. len - 2


def loss_bucket_for(rows) -> int:
    """The loss bucket for these rows, as PackedLoader(loss_bucket="auto") sizes it: a multiple of
    LOSS_BUCKET_GRANULE holding every row's supervised positions (here no row is cut: the rows are fixed)."""
    most = max(sum(supervised_positions(d) for d in docs) for docs in rows)
    return min(SEQ_LEN, -(-most // LOSS_BUCKET_GRANULE) * LOSS_BUCKET_GRANULE)


def fastsft_batch(docs: list[list[int]], bucket: int = SEQ_LEN) -> Batch:
    """One row of the batch contract (fastsft/data/batch.py): loss_positions sized to `bucket`, cu_seqlens and
    max_seqlen bounded as the loader bounds them (attention_bounds)."""
    ids, positions, labels, ends = [], [], [], []
    for doc in docs:
        start = prompt_length(doc)
        ids += doc
        positions += range(len(doc))
        labels += [doc[t + 1] if t + 1 >= start else IGNORE_INDEX for t in range(len(doc) - 1)] + [IGNORE_INDEX]
        ends.append(len(ids))
    used = len(ids)
    if used < SEQ_LEN:
        ids += [PAD_ID] * (SEQ_LEN - used)
        positions += range(SEQ_LEN - used)
        labels += [IGNORE_INDEX] * (SEQ_LEN - used)
        ends.append(SEQ_LEN)
    labels_t = torch.tensor(labels)
    supervised = (labels_t != IGNORE_INDEX).nonzero().flatten().to(torch.int32)
    loss_positions = torch.full((bucket,), LOSS_POSITION_FILL, dtype=torch.int32)
    loss_positions[: len(supervised)] = supervised
    cu = [0] + ends + [SEQ_LEN] * (MAX_DOCS + 1 - len(ends))
    cu_len, max_seqlen = attention_bounds(cu, len(docs), SEQ_LEN, MAX_DOCS)
    return Batch(torch.tensor(ids), torch.tensor(positions, dtype=torch.int32), labels_t,
                 torch.tensor(cu[:cu_len], dtype=torch.int32), max_seqlen, loss_positions, len(supervised), used,
                 len(docs))


def hf_labels(doc: list[int]) -> list[int]:
    """Unshifted labels as transformers wants them (it shifts): token t carries loss from the response on."""
    start = prompt_length(doc)
    return [IGNORE_INDEX] * start + doc[start:]


def hf_padded_batches(docs: list[list[int]]) -> list[dict]:
    """The row's documents as padded micro-batches of at most PADDED_BUDGET slots, in document order."""
    groups, current = [], []
    for doc in docs:
        if current and (len(current) + 1) * max(len(d) for d in current + [doc]) > PADDED_BUDGET:
            groups.append(current)
            current = []
        current.append(doc)
    groups.append(current)
    batches = []
    for group in groups:
        width = max(len(d) for d in group)
        ids = torch.full((len(group), width), PAD_ID)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        labels = torch.full((len(group), width), IGNORE_INDEX)
        for i, doc in enumerate(group):
            ids[i, : len(doc)] = torch.tensor(doc)
            mask[i, : len(doc)] = 1
            labels[i, : len(doc)] = torch.tensor(hf_labels(doc))
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def hf_packed_batch(docs: list[list[int]]) -> dict:
    ids = [t for d in docs for t in d]
    positions = [p for d in docs for p in range(len(d))]
    labels = [t for d in docs for t in hf_labels(d)]
    return {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions]), "labels": torch.tensor([labels])}


def to_device(batch: dict) -> dict:
    return {k: v.to(DEVICE, non_blocking=True) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------------ variants


def fastsft_variant(rows):
    model = Transformer.from_config(ModelConfig(**LLAMA_3_2_1B), device=DEVICE, seed=0)
    apply_compile(model, COMPILE)
    step = TrainStep(model, build_optimizer(model, lr=1e-5), max_grad_norm=1.0, precision="bf16")
    bucket = loss_bucket_for(rows)
    batches = [fastsft_batch(docs, bucket).to(DEVICE) for docs in rows]

    def run(i):
        return step([batches[i % len(batches)]]).loss

    bounds = sorted({(len(b.cu_seqlens), b.max_seqlen) for b in batches})
    return model, run, {"attention": _fastsft_attention(), "loss_bucket": bucket,
                        "lm_head_rows_skipped": 1 - bucket / SEQ_LEN,
                        "attention_bounds": [list(b) for b in bounds]}


def _fastsft_attention() -> str:
    from fastsft.attention import select_backend

    return select_backend(DEVICE)


def hf_model(attn_implementation: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{k: v for k, v in LLAMA_3_2_1B.items() if k != "model_type"})
    with torch.device(DEVICE):
        model = LlamaForCausalLM._from_config(config, attn_implementation=attn_implementation)
    return model.float().train()


def on_device(micro_batches: list[dict]) -> list[tuple[dict, int]]:
    """Each micro-batch moved to the GPU before timing, with its supervised-token count (read on the host)."""
    return [(to_device(b), int((b["labels"][:, 1:] != IGNORE_INDEX).sum())) for b in micro_batches]


def hf_step(model, optimizer, micro_batches: list[tuple[dict, int]]):
    """Gradient accumulation weighted by supervised tokens, so the step's loss is the mean over all of them."""
    total = max(1, sum(count for _, count in micro_batches))
    losses = []
    for batch, count in micro_batches:
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = model(**batch, use_cache=False).loss * (count / total)
        loss.backward()
        losses.append(loss.detach())
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return torch.stack(losses).sum()


def hf_padded_variant(rows):
    model = hf_model("sdpa")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), fused=True)
    batches = [on_device(hf_padded_batches(docs)) for docs in rows]
    return model, lambda i: hf_step(model, optimizer, batches[i % len(batches)]), {"attention": "sdpa"}


def hf_padding_free_variant(rows):
    try:
        import flash_attn  # noqa: F401

        attention = "flash_attention_2"
    except Exception:
        attention = "sdpa"
    model = hf_model(attention)
    info = {"attention": attention, "liger": _apply_liger(model)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), fused=True)
    batches = [on_device([hf_packed_batch(docs)]) for docs in rows]
    return model, lambda i: hf_step(model, optimizer, batches[i % len(batches)]), info


def _apply_liger(model) -> str:
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
    except ImportError:
        return "not installed"
    try:
        apply_liger_kernel_to_llama(model=model)
    except Exception as e:  # report, measure without it
        return f"failed: {type(e).__name__}: {e}"
    return "applied"


VARIANTS = {"fastsft": fastsft_variant, "hf_padded_sdpa": hf_padded_variant,
            "hf_padding_free": hf_padding_free_variant}


# ------------------------------------------------------------------------------------------------------ measuring


def measure(name: str, rows, warmup: int) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    try:
        result = timed_run(name, rows, warmup)
    except torch.cuda.OutOfMemoryError as e:
        result = {"error": f"out of memory: {str(e).splitlines()[0]}"}
    gc.collect()  # the variant's model and optimizer died with timed_run's frame
    torch.cuda.empty_cache()
    return result


def timed_run(name: str, rows, warmup: int) -> dict:
    model, run, info = VARIANTS[name](rows)
    for i in range(warmup):
        run(i)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses = [run(warmup + i) for i in range(len(rows))]
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated()
    tokens = sum(sum(len(d) for d in rows[(warmup + i) % len(rows)]) for i in range(len(rows)))
    return {**info, "tokens_per_s": tokens / seconds, "step_ms": 1e3 * seconds / len(rows),
            "peak_memory_gib": peak / 2**30, "first_loss": losses[0].item(), "last_loss": losses[-1].item()}


def run_benchmark(num_rows: int = 12, warmup: int = 3) -> dict:
    rows = make_rows(num_rows)
    lengths = [len(d) for docs in rows for d in docs]
    context = sum(n * n for n in lengths) / sum(lengths)
    with torch.device("meta"):
        flops_per_token = Transformer.from_config(ModelConfig(**LLAMA_3_2_1B)).flops_per_token(context)
    peak_tflops = matmul_tflops()
    results = {name: measure(name, rows, warmup) for name in VARIANTS}
    for r in results.values():
        if "tokens_per_s" in r:
            r["mfu"] = mfu(r["tokens_per_s"], flops_per_token, peak_tflops * 1e12)
    ours, padded, free = results["fastsft"], results["hf_padded_sdpa"], results["hf_padding_free"]
    ratios = {}
    if "tokens_per_s" in ours:
        for other_name, other in (("hf_padded_sdpa", padded), ("hf_padding_free", free)):
            if "tokens_per_s" in other:
                ratios[f"tokens_per_s_vs_{other_name}"] = ours["tokens_per_s"] / other["tokens_per_s"]
                ratios[f"peak_memory_vs_{other_name}"] = ours["peak_memory_gib"] / other["peak_memory_gib"]
    return {
        "model": "Llama-3.2-1B shape, random weights", "seq_len": SEQ_LEN, "rows_timed": num_rows,
        "warmup_steps": warmup, "documents": len(lengths), "mean_doc_len": sum(lengths) / len(lengths),
        "packing_efficiency": sum(lengths) / (num_rows * SEQ_LEN), "attention_context": context,
        "flops_per_token": flops_per_token, "matmul_tflops": peak_tflops, "variants": results, "ratios": ratios,
    }


# ------------------------------------------------------------------------------------------- pytest-benchmark


@requires_cuda
def test_train_step_vs_transformers(benchmark):
    result = benchmark.pedantic(run_benchmark, rounds=1, iterations=1)
    write_result("train_step", result)
    for name, value in result["ratios"].items():
        benchmark.extra_info[name] = value
    for name, r in result["variants"].items():
        for key in ("tokens_per_s", "mfu", "peak_memory_gib"):
            if key in r:
                benchmark.extra_info[f"{name}_{key}"] = r[key]


# ------------------------------------------------------------------------------------------------------ script


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=12, help="timed optimizer steps (one packed row each)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_step: needs a CUDA GPU; nothing measured")
        return 0
    result = run_benchmark(args.rows, args.warmup)
    print(f"{torch.cuda.get_device_name()}: bf16 matmul {result['matmul_tflops']:.0f} TFLOP/s; "
          f"{result['documents']} documents, mean length {result['mean_doc_len']:.0f}, "
          f"packing efficiency {result['packing_efficiency']:.3f}")
    print(f"{'variant':18} {'tokens/s':>10} {'step ms':>9} {'MFU':>6} {'peak GiB':>9}  notes")
    for name, r in result["variants"].items():
        if "error" in r:
            print(f"{name:18} {r['error']}")
            continue
        notes = ", ".join(f"{k}={r[k]}" for k in ("attention", "liger") if k in r)
        print(f"{name:18} {r['tokens_per_s']:10.0f} {r['step_ms']:9.1f} {r['mfu']:6.3f} "
              f"{r['peak_memory_gib']:9.2f}  {notes}")
    for name, value in result["ratios"].items():
        print(f"{name}: {value:.2f}")
    print(f"wrote {write_result('train_step', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
