"""Preparation benchmark (CPU): `fastsft prepare` against `datasets.Dataset.map(apply_chat_template)` and TRL
SFTTrainer's own dataset preparation (assistant-only loss), side by side on the same generated conversations.

Data: N multi-turn conversations (a system prompt, then 2-3 user/assistant turns of random words), one .jsonl file.
Tokenizer: the real Qwen3 tokenizer from ../shared/tokenizers/qwen3 when present (else --tokenizer).

Variants, each run in a fresh process (so its peak RSS is its own), alternated, median of --repeats runs:
- fastsft, --workers 1 and 2: `prepare_dataset` (read .jsonl, render + tokenize, loss masks, shards, manifest), as a
  user runs it: the tokenizer library's own threads on (its default; one worker tokenizes one chunk on them while it
  renders the next); fastsft1core-w1: the same, with the process pinned to one core (sched_setaffinity), so that all
  its threads share one CPU as datasets.map's single process does;
- datasets.map, num_proc 1 and 2: `Dataset.from_json` then `map(apply_chat_template(tokenize=True))` (ids only, no
  masks), in a fresh cache directory;
- TRL, dataset_num_proc 1 and 2: `Dataset.from_json` then `SFTTrainer(..., assistant_only_loss=True)`, whose
  __init__ prepares the dataset (TRL's training template with generation markers — for the shared Qwen3 tokenizer,
  TRL's qwen3_training.jinja — ids + assistant masks); the tiny model it needs is built before the clock starts.
Wall time counts from after imports and tokenizer loading to the prepared dataset; CPU time is that region's, over all
threads and worker processes; peak RSS is the process's maximum resident set plus the largest of its worker
processes' (ru_maxrss; imports included).

    python bench/bench_prepare.py [--conversations 5000] [--repeats 3]   # table; writes bench/results/prepare.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# ../shared/tokenizers/qwen3 beside the checkout (or beside its parent, for a worktree under wt/), or $FASTSFT_TOKENIZERS
_ROOTS = [os.environ.get("FASTSFT_TOKENIZERS", ""), REPO.parent / "shared" / "tokenizers",
          REPO.parents[1] / "shared" / "tokenizers"]
QWEN3 = next((Path(r) / "qwen3" for r in _ROOTS if r and (Path(r) / "qwen3").is_dir()), Path("qwen3-absent"))
VARIANTS = ("fastsft-w1", "fastsft1core-w1", "datasets-np1", "trl-np1", "fastsft-w2", "datasets-np2", "trl-np2")


def write_conversations(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    vocab = [("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))) for _ in range(3000)]

    def sentence(lo, hi):
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    with open(path, "w") as f:
        for _ in range(n):
            messages = [{"role": "system", "content": sentence(8, 30)}]
            for _ in range(rng.randint(2, 3)):
                messages.append({"role": "user", "content": " ".join(sentence(5, 25) for _ in range(rng.randint(1, 4)))})
                messages.append({"role": "assistant",
                                 "content": " ".join(sentence(5, 25) for _ in range(rng.randint(2, 12)))})
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- one run (child)


def run_one(variant: str, data: Path, tokenizer: str, work: Path) -> dict:
    name, procs = variant.rsplit("-", 1)
    procs = int(procs[-1])
    if name in ("fastsft", "fastsft1core"):
        from fastsft.data.prepare import prepare_dataset
        from fastsft.data.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer)
        cpu_start, start = time.process_time(), time.perf_counter()
        manifest = prepare_dataset(data, tok, work / "out", workers=procs, progress=False)
        seconds, cpu_end = time.perf_counter() - start, time.process_time()
        split = manifest["splits"]["train"]
        return {"seconds": seconds, "documents": split["documents"], "tokens": split["tokens"],
                "cpu_start": cpu_start, "cpu_end": cpu_end}

    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(tokenizer)
    if name == "datasets":
        def encode(example):
            ids = tok.apply_chat_template(example["messages"], tokenize=True)
            return {"input_ids": ids["input_ids"] if hasattr(ids, "keys") else ids}

        cpu_start, start = time.process_time(), time.perf_counter()
        ds = datasets.Dataset.from_json(str(data), cache_dir=str(work / "cache"))
        ds = ds.map(encode, remove_columns=ds.column_names, num_proc=procs if procs > 1 else None)
        seconds, cpu_end = time.perf_counter() - start, time.process_time()
        return {"seconds": seconds, "documents": len(ds), "tokens": sum(len(x) for x in ds["input_ids"]),
                "cpu_start": cpu_start, "cpu_end": cpu_end}

    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from trl import SFTConfig, SFTTrainer

    if "<|im_start|>" in tok.chat_template and "<think>" in tok.chat_template:
        # The shared Qwen3 tokenizer's template is a slightly older revision than the one TRL recognizes, so TRL would
        # refuse it; give it TRL's own Qwen3 training template (the same rendering, with generation markers).
        import trl

        tok.chat_template = (Path(trl.__file__).parent / "chat_templates" / "qwen3_training.jinja").read_text()
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         head_dim=8))
    config = SFTConfig(output_dir=str(work / "trl"), assistant_only_loss=True, dataset_num_proc=procs if procs > 1
                       else None, max_length=None, report_to=[], use_cpu=True)
    cpu_start, start = time.process_time(), time.perf_counter()
    ds = datasets.Dataset.from_json(str(data), cache_dir=str(work / "cache"))
    trainer = SFTTrainer(model=model, args=config, train_dataset=ds, processing_class=tok)
    seconds, cpu_end = time.perf_counter() - start, time.process_time()
    prepared = trainer.train_dataset
    return {"seconds": seconds, "documents": len(prepared), "tokens": sum(len(x) for x in prepared["input_ids"]),
            "cpu_start": cpu_start, "cpu_end": cpu_end}


def child_main(args) -> None:
    import resource

    if "1core" in args.one:  # before anything starts a thread: the tokenizer's thread pool then sizes itself to 1
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    with tempfile.TemporaryDirectory(dir=args.work) as work:
        result = run_one(args.one, Path(args.data), args.tokenizer, Path(work))
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    result["cpu_seconds"] = round(result.pop("cpu_end") - result.pop("cpu_start") + children.ru_utime
                                  + children.ru_stime, 3)
    self_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result.update(rss_self_mb=round(self_mb, 1), rss_workers_mb=round(children_mb, 1),
                  peak_rss_mb=round(self_mb + children_mb, 1))
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------- driver


def measure(variant: str, data: Path, tokenizer: str, work: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    if variant.startswith("fastsft"):  # fastsft as a user runs it: the tokenizer's threads on (its default)
        del env["TOKENIZERS_PARALLELISM"]
    proc = subprocess.run([sys.executable, __file__, "--one", variant, "--data", str(data), "--tokenizer", tokenizer,
                           "--work", str(work)], env=env, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{variant} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokenizer", default=str(QWEN3) if QWEN3.is_dir() else None)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return child_main(args)
    if args.tokenizer is None:
        raise SystemExit("no tokenizer: ../shared/tokenizers/qwen3 is absent; pass --tokenizer DIR (a Hugging Face "
                         "tokenizer with a chat template)")
    variants = args.variants.split(",")
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        data = write_conversations(work / "conversations.jsonl", args.conversations)
        runs = {v: [] for v in variants}
        for rep in range(args.repeats):
            for variant in variants:  # alternated, so load on the shared machine hits every variant alike
                runs[variant].append(measure(variant, data, args.tokenizer, work))
                r = runs[variant][-1]
                print(f"  repeat {rep + 1} {variant:13s} {r['seconds']:7.2f} s  {r['cpu_seconds']:7.2f} CPU-s  "
                      f"{r['peak_rss_mb']:7.0f} MB", flush=True)
        data_mb = data.stat().st_size / 2**20

    summary = {}
    for variant, rs in runs.items():
        summary[variant] = {
            "seconds_median": round(statistics.median(r["seconds"] for r in rs), 3),
            "seconds_all": [round(r["seconds"], 3) for r in rs],
            "cpu_seconds_median": round(statistics.median(r["cpu_seconds"] for r in rs), 3),
            "peak_rss_mb_median": round(statistics.median(r["peak_rss_mb"] for r in rs), 1),
            "rss_self_mb_median": round(statistics.median(r["rss_self_mb"] for r in rs), 1),
            "documents": rs[0]["documents"], "tokens": rs[0]["tokens"],
        }
    base = summary.get("fastsft-w1")
    print(f"\n{args.conversations} conversations, {data_mb:.1f} MB .jsonl, tokenizer {args.tokenizer}, "
          f"{os.cpu_count()} CPUs, medians of {args.repeats}")
    print(f"{'variant':14s} {'wall s':>8s} {'CPU s':>8s} {'peak RSS MB':>12s} {'tokens':>11s} {'time / fastsft-w1':>18s}")
    for variant, s in summary.items():
        ratio = f"{s['seconds_median'] / base['seconds_median']:.2f}x" if base else "-"
        print(f"{variant:14s} {s['seconds_median']:8.2f} {s['cpu_seconds_median']:8.2f} {s['peak_rss_mb_median']:12.0f} "
              f"{s['tokens']:11d} {ratio:>18s}")

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import datasets
    import transformers
    import trl
    from common import write_result

    path = write_result("prepare", {
        "conversations": args.conversations, "data_mb": round(data_mb, 2), "tokenizer": str(args.tokenizer),
        "cpus": os.cpu_count(), "repeats": args.repeats, "variants": summary,
        "versions": {"datasets": datasets.__version__, "transformers": transformers.__version__,
                     "trl": trl.__version__},
        "note": "medians of alternating runs in fresh processes; wall time excludes imports and tokenizer loading; "
                "CPU s = the timed region's CPU time, all threads and worker processes; peak RSS = process + largest "
                "worker (ru_maxrss); fastsft runs with the tokenizer's threads (its default), "
                "the others with TOKENIZERS_PARALLELISM=false (their per-row encodes use one thread either way); "
                "fastsft1core-w1 is "
                "pinned to one core",
        "load_average_before": os.getloadavg(),
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
