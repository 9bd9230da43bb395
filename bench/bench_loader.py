"""Loader benchmark (CPU): packing efficiency and batch-assembly throughput, C++ (`fastsft._C`) vs the numpy reference
(`fastsft/data/packing_ref.py`), on a synthetic SFT-like corpus.

Corpus: lognormal document lengths (median 250 tokens, sigma 1.0, capped at 4096), random token ids below a 32k
vocabulary, the loss mask on a contiguous response span covering on average half of each document.

Measured, for seq_len 4096 and 16384 (max_docs = seq_len // 32, the default shuffle window):
- packing efficiency: packed (non-padding) tokens / (rows * seq_len) over a full epoch plan, and the planning time;
- assembly throughput: row positions filled (rows * seq_len) per CPU-second of the one thread doing it
  (time.thread_time, so a busy shared machine does not distort it), C++ and numpy on the same rows into preallocated
  buffers, alternated, median of repeats; also the best wall-clock repeat; C++ both ways: guarded memory map (what
  the loader uses) and pread per document (`Corpus(..., mmap=False)`, the reader it replaced);
- the whole loader (PackedLoader iteration, prefetch thread, torch buffers), positions per CPU-second and per second;
- the loss bucket `fastsft train` picks (loss_bucket="auto"): its size, the share of lm_head rows skipped, packing
  with it, and the share of supervised positions it cuts.

    python bench/bench_loader.py [--docs N]          # prints a table, writes bench/results/loader.json
    pytest bench/bench_loader.py --benchmark-only    # the same measurements as pytest-benchmark tests
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from fastsft import _C
from fastsft.data import packing_ref
from fastsft.data.loader import DEFAULT_WINDOW, PackedLoader
from fastsft.data.shards import ShardWriter, open_shards

MEDIAN_LEN = 250
SIGMA = 1.0
MAX_LEN = 4096
VOCAB = 32000
SEQ_LENS = (4096, 16384)
ROWS_PER_CALL = 8
ASSEMBLY_TOKENS = 1 << 20  # row positions per timed repeat (the same rows for C++ and numpy)


def max_docs_for(seq_len: int) -> int:
    return seq_len // 32


def write_corpus(out_dir, num_docs: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(MEDIAN_LEN), SIGMA, num_docs).astype(np.int64), 1, MAX_LEN)
    tokens = rng.integers(0, VOCAB, int(lengths.sum()), dtype=np.uint16)
    prompt_share = rng.random(num_docs)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    with ShardWriter(out_dir, VOCAB) as writer:
        for i, n in enumerate(lengths.tolist()):
            mask = np.arange(n) >= int(prompt_share[i] * n)
            writer.add(tokens[offsets[i]:offsets[i + 1]], mask)
    return open_shards(out_dir)


def measure_packing(dataset, seq_len: int) -> dict:
    loader = PackedLoader(dataset, seq_len, max_docs_for(seq_len), prefetch=0)
    start = time.perf_counter()
    plan_next_epoch(loader)
    plan_s = time.perf_counter() - start
    stats = loader.stats
    return dict(packing_efficiency=stats["packing_efficiency"], rows=stats["rows"], plan_s=plan_s,
                truncated_docs=stats["truncated_docs"], max_docs=loader.max_docs, window=loader.window,
                **measure_loss_bucket(dataset, seq_len)), loader


def measure_loss_bucket(dataset, seq_len: int) -> dict:
    """The loss bucket `fastsft train` uses (loss_bucket="auto"): its size, the share of lm_head rows it skips, the
    packing it keeps (every epoch planned alike; epoch 0 here) and the supervised positions it cuts."""
    start = time.perf_counter()
    loader = PackedLoader(dataset, seq_len, max_docs_for(seq_len), prefetch=0, loss_bucket="auto")
    choose_s = time.perf_counter() - start
    stats = loader.stats
    return dict(loss_bucket=stats["loss_bucket"], lm_head_rows_skipped=stats["lm_head_rows_skipped"],
                bucket_packing_efficiency=stats["packing_efficiency"], bucket_choose_s=choose_s,
                supervised_cut_share=stats["supervised_positions_cut"] / max(1, loader.supervised_uncapped))


def plan_next_epoch(loader):
    """Plan epoch loader.epoch + 1 without touching the loader's cache (what the loader does once per epoch)."""
    return loader._impl.plan_epoch(
        loader.eff_len, loader.supervised, seq_len=loader.seq_len, max_docs=loader.max_docs,
        loss_bucket=loader.loss_bucket, window=loader.window, seed=loader.seed, epoch=loader.epoch + 1,
        world_size=loader.world_size, drop_last=loader.drop_last)


def assembly_setup(loader):
    """The first rows of the epoch (ASSEMBLY_TOKENS positions) and preallocated buffers for ROWS_PER_CALL rows."""
    row_ptr, row_docs = loader.plan(0)
    num_rows = max(ROWS_PER_CALL, ASSEMBLY_TOKENS // loader.seq_len)
    rows = np.arange(num_rows, dtype=np.int64)
    out = packing_ref.allocate_batch_buffers(ROWS_PER_CALL, loader.seq_len, loader.max_docs, loader.bucket)
    return row_ptr, row_docs, rows, out


def assemble_cpp(loader, row_ptr, row_docs, rows, out, corpus=None):
    corpus = loader._impl.corpus if corpus is None else corpus
    args = [out[k] for k in ("input_ids", "position_ids", "labels", "cu_seqlens", "loss_positions", "counts")]
    for start in range(0, len(rows), ROWS_PER_CALL):
        _C.assemble_rows(corpus, row_ptr, row_docs, loader.eff_len, rows[start:start + ROWS_PER_CALL], *args)


def assemble_numpy(loader, row_ptr, row_docs, rows, out):
    for start in range(0, len(rows), ROWS_PER_CALL):
        packing_ref.assemble_rows(loader.dataset, row_ptr, row_docs, loader.eff_len, rows[start:start + ROWS_PER_CALL],
                                  out)


def measure_assembly(loader, repeats: int = 7) -> dict:
    """Throughput per CPU-second of the calling thread (time.thread_time: robust on a shared, oversubscribed machine,
    where wall time mostly measures the scheduler), plus the best wall-clock repeat."""
    row_ptr, row_docs, rows, out = assembly_setup(loader)
    positions = len(rows) * loader.seq_len
    packed = int(loader.eff_len[row_docs[row_ptr[0]:row_ptr[len(rows)]]].sum())
    pread_corpus = _C.Corpus(list(loader.dataset.shards), mmap=False)  # the pread reader, for the side-by-side

    def assemble_cpp_pread(loader, *setup):
        assemble_cpp(loader, *setup, corpus=pread_corpus)

    fns = (("cpp", assemble_cpp), ("cpp_pread", assemble_cpp_pread), ("numpy", assemble_numpy))
    cpu = {name: [] for name, _ in fns}
    wall = {name: [] for name, _ in fns}
    for _ in range(repeats):  # alternate them so machine noise hits all alike
        for name, fn in fns:
            wall_start, cpu_start = time.perf_counter(), time.thread_time()
            fn(loader, row_ptr, row_docs, rows, out)
            cpu[name].append(time.thread_time() - cpu_start)
            wall[name].append(time.perf_counter() - wall_start)
    cpp_s, numpy_s = statistics.median(cpu["cpp"]), statistics.median(cpu["numpy"])
    pread_s = statistics.median(cpu["cpp_pread"])
    return dict(
        cpp_pread_tokens_per_cpu_s=positions / pread_s, mmap_over_pread=pread_s / cpp_s,
        assembly_rows=len(rows), assembly_positions=positions, assembly_packed_tokens=packed,
        cpp_tokens_per_cpu_s=positions / cpp_s, numpy_tokens_per_cpu_s=positions / numpy_s, speedup=numpy_s / cpp_s,
        cpp_tokens_per_wall_s_best=positions / min(wall["cpp"]),
        numpy_tokens_per_wall_s_best=positions / min(wall["numpy"]),
    )


def measure_loader(dataset, seq_len: int, batches: int = 256) -> dict:
    """The whole PackedLoader (prefetch thread, torch buffers, Batch objects): positions per CPU-second of the
    process (both threads) and per wall-second."""
    loader = PackedLoader(dataset, seq_len, max_docs_for(seq_len), prefetch=2)
    loader.plan(0)
    count = 0
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    for _ in loader:
        count += 1
        if count == batches:
            break
    cpu_s, wall_s = time.process_time() - cpu_start, time.perf_counter() - wall_start
    return dict(loader_batches=count, loader_tokens_per_cpu_s=count * seq_len / cpu_s,
                loader_tokens_per_wall_s=count * seq_len / wall_s)


def run(num_docs: int) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        dataset = write_corpus(Path(tmp), num_docs)
        print(f"corpus: {len(dataset)} documents, {dataset.num_tokens} tokens, "
              f"median length {int(np.median(dataset.lengths))}, written in {time.perf_counter() - start:.1f} s")
        for seq_len in SEQ_LENS:
            packing, loader = measure_packing(dataset, seq_len)
            results[str(seq_len)] = {**packing, **measure_assembly(loader), **measure_loader(dataset, seq_len)}
    header = (f"{'seq_len':>8} {'max_docs':>8} {'packing':>9} {'plan s':>7} {'C++ tok/s':>10} {'pread tok/s':>11} "
              f"{'numpy tok/s':>11} {'speedup':>8} {'loader tok/s':>12}   (tokens per CPU-second of one thread; "
              "loader: of the process)")
    print(header)
    for seq_len, r in results.items():
        print(f"{seq_len:>8} {r['max_docs']:>8} {r['packing_efficiency']:>9.4%} {r['plan_s']:>7.3f} "
              f"{r['cpp_tokens_per_cpu_s']:>10.3e} {r['cpp_pread_tokens_per_cpu_s']:>11.3e} "
              f"{r['numpy_tokens_per_cpu_s']:>11.3e} {r['speedup']:>7.1f}x "
              f"{r['loader_tokens_per_cpu_s']:>12.3e}")
    print(f"{'seq_len':>8} {'bucket':>7} {'lm_head rows skipped':>21} {'packing':>9} {'supervised cut':>15} "
          f"{'choose s':>9}   (loss_bucket='auto', as fastsft train uses it)")
    for seq_len, r in results.items():
        print(f"{seq_len:>8} {r['loss_bucket']:>7} {r['lm_head_rows_skipped']:>21.1%} "
              f"{r['bucket_packing_efficiency']:>9.4%} {r['supervised_cut_share']:>15.4%} {r['bucket_choose_s']:>9.3f}")
    return dict(
        corpus=dict(documents=len(dataset), tokens=dataset.num_tokens, median_len=MEDIAN_LEN, sigma=SIGMA,
                    max_len=MAX_LEN, vocab=VOCAB),
        window=DEFAULT_WINDOW, rows_per_call=ROWS_PER_CALL, results=results,
    )


# ------------------------------------------------------------------------------------------- pytest-benchmark


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("bench_corpus"), 100_000)


@pytest.fixture(scope="module", params=SEQ_LENS, ids=lambda s: f"seq{s}")
def loader(request, corpus):
    return PackedLoader(corpus, request.param, max_docs_for(request.param), prefetch=0)


def test_packing_efficiency(benchmark, loader):
    benchmark.pedantic(plan_next_epoch, args=(loader,), rounds=3)
    efficiency = loader.stats["packing_efficiency"]
    benchmark.extra_info["packing_efficiency"] = efficiency
    assert efficiency >= 0.995


def test_loss_bucket(benchmark, corpus, loader):
    result = benchmark.pedantic(measure_loss_bucket, args=(corpus, loader.seq_len), rounds=1)
    benchmark.extra_info.update(result)
    assert result["bucket_packing_efficiency"] >= 0.995 and result["loss_bucket"] < loader.seq_len


def test_assembly_cpp(benchmark, loader):
    setup = assembly_setup(loader)
    benchmark(assemble_cpp, loader, *setup)  # pytest-benchmark times wall clock: noisy on a shared machine
    benchmark.extra_info["tokens_per_s"] = len(setup[2]) * loader.seq_len / benchmark.stats.stats.median


def test_assembly_numpy(benchmark, loader):
    setup = assembly_setup(loader)
    benchmark.pedantic(assemble_numpy, args=(loader, *setup), rounds=3)
    benchmark.extra_info["tokens_per_s"] = len(setup[2]) * loader.seq_len / benchmark.stats.stats.median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=200_000, help="documents in the synthetic corpus")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write bench/results/loader.json")
    args = parser.parse_args()
    payload = run(args.docs)
    if not args.no_write:
        from common import write_result

        print(f"wrote {write_result('loader', payload)}")


if __name__ == "__main__":
    main()
