"""RMSNorm benchmark (GPU): fastsft's Triton kernels against torch eager, torch.compile of the reference, and
Liger-Kernel when it is installed, for `rms_norm` and the fused `add_rms_norm`, forward and forward+backward.

Shapes: rows 4096, 16384, 65536 x hidden 2048, 4096, 8192, bf16 activations and weight. Times are medians from
`triton.testing.do_bench` (CUDA events), the variants measured one after another in one process. Achieved bandwidth
counts only the bytes that must move (the weight and per-row rstd are too small to matter and are left out):
    rms_norm      forward: read x, write y                  backward: read dy, x, write dx
    add_rms_norm  forward: read x, residual, write y, sum   backward: read dy, sum, d(sum), write dx
and is reported as a fraction of the device-to-device copy bandwidth measured in the same process.

    python bench/bench_rms_norm.py                                 # all shapes, a table, bench/results/rms_norm.json
    pytest bench/bench_rms_norm.py --benchmark-only                # the same as pytest-benchmark tests
Without CUDA the pytest tests skip and the script says so.
"""

from __future__ import annotations

import sys

import pytest
import torch
from common import copy_bandwidth_gbs, cuda_time_ms, requires_cuda, write_result

from fastsft.ops import add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference

ROWS = (4096, 16384, 65536)
HIDDEN = (2048, 4096, 8192)
OPS = ("rms_norm", "add_rms_norm")
DTYPE = torch.bfloat16
EPS = 1e-6

# Tensors of [rows, hidden] each direction must read or write (see the module docstring).
TENSORS_MOVED = {("rms_norm", "fwd"): 2, ("rms_norm", "bwd"): 3, ("add_rms_norm", "fwd"): 4, ("add_rms_norm", "bwd"): 4}


def bytes_moved(op: str, rows: int, hidden: int, with_backward: bool) -> int:
    tensors = TENSORS_MOVED[(op, "fwd")] + (TENSORS_MOVED[(op, "bwd")] if with_backward else 0)
    return tensors * rows * hidden * torch.finfo(DTYPE).bits // 8


def liger_module(op: str, hidden: int):
    """Liger-Kernel's module for `op` with a random weight, or None when Liger is not installed."""
    try:
        if op == "rms_norm":
            from liger_kernel.transformers.rms_norm import LigerRMSNorm as Module
        else:
            from liger_kernel.transformers.fused_add_rms_norm import LigerFusedAddRMSNorm as Module
    except ImportError:
        return None
    module = Module(hidden, eps=EPS).to(device="cuda", dtype=DTYPE)
    return module


def variants(op: str, weight: torch.Tensor) -> dict:
    """name -> callable(*inputs) returning the op's output tensors as a tuple."""
    fastsft_fn = rms_norm if op == "rms_norm" else add_rms_norm
    reference = rms_norm_reference if op == "rms_norm" else add_rms_norm_reference

    def as_tuple(fn):
        return lambda *inputs: (lambda out: out if isinstance(out, tuple) else (out,))(fn(*inputs, weight, EPS))

    torch._dynamo.reset()  # a fresh compile per shape (no recompile limit, no dynamic-shape kernels)
    found = {
        "fastsft": as_tuple(fastsft_fn),
        "torch_eager": as_tuple(reference),
        "torch_compile": as_tuple(torch.compile(reference, dynamic=False)),
    }
    liger = liger_module(op, weight.shape[0])
    if liger is not None:
        with torch.no_grad():
            liger.weight.copy_(weight)
        found["liger"] = lambda *inputs: (lambda out: out if isinstance(out, tuple) else (out,))(liger(*inputs))
    return found


def make_inputs(op: str, rows: int, hidden: int, requires_grad: bool):
    count = 1 if op == "rms_norm" else 2
    return [torch.randn(rows, hidden, device="cuda", dtype=DTYPE, requires_grad=requires_grad) for _ in range(count)]


def step_fn(fn, inputs, with_backward: bool):
    """One timed call: forward, or forward + backward with fixed output gradients (torch.autograd.grad, so nothing
    accumulates into .grad between runs)."""
    if not with_backward:
        return lambda: fn(*inputs)
    grads_out = None

    def run():
        nonlocal grads_out
        outputs = fn(*inputs)
        if grads_out is None:
            grads_out = [torch.randn_like(o) for o in outputs]
        return torch.autograd.grad(outputs, inputs, grads_out)

    return run


def measure(op: str, rows: int, hidden: int, with_backward: bool) -> dict:
    """Time every variant on the same inputs, alternating variants round by round; median of the rounds."""
    weight = (torch.rand(hidden, device="cuda") + 0.5).to(DTYPE).requires_grad_(with_backward)
    inputs = make_inputs(op, rows, hidden, with_backward)
    fns = {name: step_fn(fn, inputs, with_backward) for name, fn in variants(op, weight).items()}
    for fn in fns.values():  # compile and autotune outside the timed region
        fn()
    times = {name: [] for name in fns}
    for _ in range(3):
        for name, fn in fns.items():
            times[name].append(cuda_time_ms(fn))
    moved = bytes_moved(op, rows, hidden, with_backward)
    copy_gbs = copy_bandwidth_gbs()
    result = {"bytes_moved": moved, "copy_bandwidth_gbs": copy_gbs}
    for name, samples in times.items():
        ms = sorted(samples)[len(samples) // 2]
        gbs = moved / (ms * 1e-3) / 1e9
        result[name] = {"ms": ms, "gbs": gbs, "fraction_of_copy_bw": gbs / copy_gbs}
    result["speedup_vs_torch_compile"] = result["torch_compile"]["ms"] / result["fastsft"]["ms"]
    if "liger" in result:
        result["speedup_vs_liger"] = result["liger"]["ms"] / result["fastsft"]["ms"]
    return result


def case_key(op: str, rows: int, hidden: int, with_backward: bool) -> str:
    return f"{op}/{'fwd_bwd' if with_backward else 'fwd'}/{rows}x{hidden}"


# ------------------------------------------------------------------------------------------- pytest-benchmark

_RESULTS: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _write_results_at_end():
    yield
    if _RESULTS:
        write_result("rms_norm", {"dtype": str(DTYPE), "cases": dict(sorted(_RESULTS.items()))})


@requires_cuda
@pytest.mark.parametrize("with_backward", [False, True], ids=["fwd", "fwd_bwd"])
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("op", OPS)
def test_rms_norm_bandwidth(benchmark, op, rows, hidden, with_backward):
    result = measure(op, rows, hidden, with_backward)
    _RESULTS[case_key(op, rows, hidden, with_backward)] = result
    # pytest-benchmark's own timer on the fastsft variant (host-timed, synchronised), next to the CUDA-event numbers.
    weight = torch.ones(hidden, device="cuda", dtype=DTYPE, requires_grad=with_backward)
    fn = step_fn(variants(op, weight)["fastsft"], make_inputs(op, rows, hidden, with_backward), with_backward)
    benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), warmup_rounds=3, rounds=20)
    benchmark.extra_info.update({k: v for k, v in result.items() if not isinstance(v, dict)})
    benchmark.extra_info.update({f"{name}_ms": v["ms"] for name, v in result.items() if isinstance(v, dict)})
    benchmark.extra_info["fastsft_fraction_of_copy_bw"] = result["fastsft"]["fraction_of_copy_bw"]


# ------------------------------------------------------------------------------------------------------ script


def main() -> int:
    if not torch.cuda.is_available():
        print("bench_rms_norm: needs a CUDA GPU; nothing measured")
        return 0
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy_bandwidth_gbs():.0f} GB/s")
    header = f"{'case':36} {'variant':14} {'ms':>9} {'GB/s':>8} {'of copy':>8}"
    print(header)
    for op in OPS:
        for with_backward in (False, True):
            for rows in ROWS:
                for hidden in HIDDEN:
                    key = case_key(op, rows, hidden, with_backward)
                    result = _RESULTS[key] = measure(op, rows, hidden, with_backward)
                    for name, v in result.items():
                        if isinstance(v, dict):
                            print(f"{key:36} {name:14} {v['ms']:9.4f} {v['gbs']:8.0f} {v['fraction_of_copy_bw']:8.1%}")
                    print(f"{key:36} fastsft vs torch.compile: {result['speedup_vs_torch_compile']:.2f}x")
    path = write_result("rms_norm", {"dtype": str(DTYPE), "cases": _RESULTS})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
