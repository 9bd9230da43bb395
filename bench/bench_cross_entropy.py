"""Cross-entropy benchmark (GPU): fastsft's `cross_entropy` on logits and fused `linear_cross_entropy` against torch
eager (F.cross_entropy on materialized logits), torch.compile of the same, and Liger-Kernel / Cut Cross-Entropy when
they are installed. Forward + backward, median time and peak memory.

Shapes: N = 8192 and 16384 tokens, hidden 4096, V = 128256 (Llama 3), bf16, with 0% and 50% of the tokens masked
(label -100, the prompt share of SFT). Times are medians from `triton.testing.do_bench` (CUDA events), the variants
measured one after another, round after round, in one process. Peak memory is what the step allocates above its
inputs (bench/common.peak_memory_mb).

Floors reported beside the times:
- cross_entropy: bytes that must move over the copy bandwidth measured in the same process. fastsft's forward reads
  each supervised row once (masked rows are skipped), the backward reads it again and writes d logits for every row
  (zeros for masked rows):  bytes = (2 x supervised rows + all rows) x V x 2.
- linear_cross_entropy: 6 x N_supervised x hidden x V FLOPs (logits, d hidden, d weight) at the bf16 matmul rate
  measured in the same process. fastsft gets `loss_positions` (the loader's bucket: supervised positions padded with
  -1 to a multiple of 256), as the model passes it; "fastsft_no_positions" is the same op without it (every token
  goes through the matmuls, see fastsft/kernels/linear_cross_entropy.py).

    python bench/bench_cross_entropy.py                       # all cases, a table, bench/results/cross_entropy.json
    pytest bench/bench_cross_entropy.py --benchmark-only      # the same as pytest-benchmark tests
Without CUDA the pytest tests skip and the script says so.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from common import copy_bandwidth_gbs, cuda_time_ms, matmul_tflops, peak_memory_mb, requires_cuda, write_result

from fastsft.ops import cross_entropy, linear_cross_entropy

TOKENS = (8192, 16384)
HIDDEN = 4096
VOCAB = 128256
MASKED = (0.0, 0.5)
DTYPE = torch.bfloat16
IGNORE = -100
BUCKET_ALIGN = 256


def make_labels(n: int, masked: float) -> torch.Tensor:
    labels = torch.randint(0, VOCAB, (n,), device="cuda")
    labels[torch.rand(n, device="cuda") < masked] = IGNORE
    return labels


def loss_positions_for(labels: torch.Tensor) -> torch.Tensor:
    """What the loader hands the model: supervised positions, then -1 filler up to a fixed bucket size."""
    supervised = (labels != IGNORE).nonzero().squeeze(1).to(torch.int32)
    bucket = -(-max(supervised.numel(), 1) // BUCKET_ALIGN) * BUCKET_ALIGN
    positions = torch.full((bucket,), -1, device=labels.device, dtype=torch.int32)
    positions[: supervised.numel()] = supervised
    return positions


def torch_loss_on_logits(logits, labels):
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE)


def torch_linear_loss(hidden, weight, labels):
    return F.cross_entropy((hidden @ weight.t()).float(), labels, ignore_index=IGNORE)


def liger_functions():
    """(cross_entropy on logits, fused linear cross-entropy) from Liger-Kernel, or Nones when it is not installed."""
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None, None
    ce = LigerCrossEntropyLoss(ignore_index=IGNORE)
    flce = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)
    return (lambda logits, labels: ce(logits, labels)), (lambda h, w, labels: flce(w, h, labels))


def cce_function():
    """Cut Cross-Entropy's linear_cross_entropy(embeddings, classifier, targets), or None when not installed."""
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
    except ImportError:
        return None
    return lambda h, w, labels: cce(h, w, labels, ignore_index=IGNORE)


def logits_variants(labels) -> dict:
    torch._dynamo.reset()
    found = {
        "fastsft": lambda x: cross_entropy(x, labels),
        # d logits overwrites the (leaf) logits: later rounds run on those values, the same work on finite numbers.
        "fastsft_inplace": lambda x: cross_entropy(x, labels, inplace_backward=True),
        "torch_eager": lambda x: torch_loss_on_logits(x, labels),
        "torch_compile": (lambda compiled: lambda x: compiled(x, labels))(torch.compile(torch_loss_on_logits)),
    }
    liger_ce, _ = liger_functions()
    if liger_ce is not None:
        found["liger"] = lambda x: liger_ce(x, labels)
    return found


def linear_variants(labels) -> dict:
    torch._dynamo.reset()
    positions = loss_positions_for(labels)
    found = {
        "fastsft": lambda h, w: linear_cross_entropy(h, w, labels, loss_positions=positions),
        "fastsft_no_positions": lambda h, w: linear_cross_entropy(h, w, labels),
        "torch_eager": lambda h, w: torch_linear_loss(h, w, labels),
        "torch_compile": (lambda compiled: lambda h, w: compiled(h, w, labels))(torch.compile(torch_linear_loss)),
    }
    _, liger_flce = liger_functions()
    if liger_flce is not None:
        found["liger"] = lambda h, w: liger_flce(h, w, labels)
    cce = cce_function()
    if cce is not None:
        found["cut_cross_entropy"] = lambda h, w: cce(h, w, labels)
    return found


def fwd_bwd(fn, inputs):
    """One timed step: the loss and its gradients (torch.autograd.grad, so nothing accumulates into .grad)."""
    return lambda: torch.autograd.grad(fn(*inputs), inputs)


def time_variants(steps: dict) -> dict:
    for step in steps.values():  # compile and autotune outside the timed region
        step()
    times = {name: [] for name in steps}
    for _ in range(3):
        for name, step in steps.items():
            times[name].append(cuda_time_ms(step))
    result = {}
    for name, samples in times.items():
        result[name] = {"ms": sorted(samples)[1], "peak_mb": peak_memory_mb(steps[name])}
    return result


def measure_logits(n: int, masked: float) -> dict:
    labels = make_labels(n, masked)
    logits = (torch.randn(n, VOCAB, device="cuda") * 2).to(DTYPE).requires_grad_()
    supervised = int((labels != IGNORE).sum())
    result = time_variants({name: fwd_bwd(fn, [logits]) for name, fn in logits_variants(labels).items()})
    moved = (2 * supervised + n) * VOCAB * logits.element_size()
    copy_gbs = copy_bandwidth_gbs()
    for entry in result.values():
        entry["gbs"] = moved / (entry["ms"] * 1e-3) / 1e9
        entry["fraction_of_copy_bw"] = entry["gbs"] / copy_gbs
    summary = {"bytes_moved": moved, "copy_bandwidth_gbs": copy_gbs, "supervised_tokens": supervised}
    summary["speedup_vs_torch_compile"] = result["torch_compile"]["ms"] / result["fastsft"]["ms"]
    if "liger" in result:
        summary["speedup_vs_liger"] = result["liger"]["ms"] / result["fastsft"]["ms"]
    return {**summary, **result}


def measure_linear(n: int, masked: float) -> dict:
    labels = make_labels(n, masked)
    hidden = torch.randn(n, HIDDEN, device="cuda", dtype=DTYPE, requires_grad=True)
    weight = (torch.randn(VOCAB, HIDDEN, device="cuda") / HIDDEN**0.5).to(DTYPE).requires_grad_()
    supervised = int((labels != IGNORE).sum())
    steps = {name: fwd_bwd(fn, [hidden, weight]) for name, fn in linear_variants(labels).items()}
    result = time_variants(steps)
    tflops = matmul_tflops()
    floor_ms = 6 * supervised * HIDDEN * VOCAB / (tflops * 1e12) * 1e3
    for entry in result.values():
        entry["x_matmul_floor"] = entry["ms"] / floor_ms
    summary = {"matmul_tflops": tflops, "matmul_floor_ms": floor_ms, "supervised_tokens": supervised}
    summary["speedup_vs_torch_compile"] = result["torch_compile"]["ms"] / result["fastsft"]["ms"]
    for other in ("liger", "cut_cross_entropy"):
        if other in result:
            summary[f"speedup_vs_{other}"] = result[other]["ms"] / result["fastsft"]["ms"]
    return {**summary, **result}


def case_key(op: str, n: int, masked: float) -> str:
    return f"{op}/N{n}xH{HIDDEN}xV{VOCAB}/masked{int(masked * 100)}"


# ------------------------------------------------------------------------------------------- pytest-benchmark

_RESULTS: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _write_results_at_end():
    yield
    if _RESULTS:
        write_result("cross_entropy", {"dtype": str(DTYPE), "cases": dict(sorted(_RESULTS.items()))})


def _report(benchmark, result: dict, step) -> None:
    benchmark.pedantic(lambda: (step(), torch.cuda.synchronize()), warmup_rounds=2, rounds=10)
    benchmark.extra_info.update({k: v for k, v in result.items() if not isinstance(v, dict)})
    benchmark.extra_info.update({f"{name}_ms": v["ms"] for name, v in result.items() if isinstance(v, dict)})
    benchmark.extra_info.update({f"{name}_peak_mb": v["peak_mb"] for name, v in result.items() if isinstance(v, dict)})


@requires_cuda
@pytest.mark.parametrize("masked", MASKED)
@pytest.mark.parametrize("n", TOKENS)
def test_cross_entropy_logits(benchmark, n, masked):
    result = _RESULTS[case_key("cross_entropy", n, masked)] = measure_logits(n, masked)
    labels = make_labels(n, masked)
    logits = torch.randn(n, VOCAB, device="cuda", dtype=DTYPE, requires_grad=True)
    _report(benchmark, result, fwd_bwd(lambda x: cross_entropy(x, labels), [logits]))
    benchmark.extra_info["fastsft_fraction_of_copy_bw"] = result["fastsft"]["fraction_of_copy_bw"]


@requires_cuda
@pytest.mark.parametrize("masked", MASKED)
@pytest.mark.parametrize("n", TOKENS)
def test_linear_cross_entropy(benchmark, n, masked):
    result = _RESULTS[case_key("linear_cross_entropy", n, masked)] = measure_linear(n, masked)
    labels = make_labels(n, masked)
    positions = loss_positions_for(labels)
    hidden = torch.randn(n, HIDDEN, device="cuda", dtype=DTYPE, requires_grad=True)
    weight = (torch.randn(VOCAB, HIDDEN, device="cuda") / HIDDEN**0.5).to(DTYPE).requires_grad_()
    step = fwd_bwd(lambda h, w: linear_cross_entropy(h, w, labels, loss_positions=positions), [hidden, weight])
    _report(benchmark, result, step)
    benchmark.extra_info["fastsft_x_matmul_floor"] = result["fastsft"]["x_matmul_floor"]


# ------------------------------------------------------------------------------------------------------ script


def main() -> int:
    if not torch.cuda.is_available():
        print("bench_cross_entropy: needs a CUDA GPU; nothing measured")
        return 0
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy_bandwidth_gbs():.0f} GB/s, "
          f"bf16 matmul {matmul_tflops():.0f} TFLOP/s")
    print(f"{'case':52} {'variant':22} {'ms':>9} {'peak MiB':>9} {'vs floor':>9}")
    for n in TOKENS:
        for masked in MASKED:
            for op, measure in (("cross_entropy", measure_logits), ("linear_cross_entropy", measure_linear)):
                key = case_key(op, n, masked)
                result = _RESULTS[key] = measure(n, masked)
                for name, v in result.items():
                    if isinstance(v, dict):
                        floor = v.get("fraction_of_copy_bw", v.get("x_matmul_floor"))
                        print(f"{key:52} {name:22} {v['ms']:9.3f} {v['peak_mb']:9.0f} {floor:9.3f}")
    path = write_result("cross_entropy", {"dtype": str(DTYPE), "cases": _RESULTS})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
