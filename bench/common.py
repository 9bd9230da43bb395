"""Shared measuring helpers for the benchmarks: the two hardware ceilings, side-by-side timing, result files.

Ceilings are measured on the device in the same process (not datasheet numbers): device-to-device copy bandwidth
(bytes read + written per second) and the bf16 matmul rate on random data. Results are JSON under bench/results/
with the device name, torch/triton versions, git commit and date.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import subprocess
from functools import lru_cache
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _requires_cuda():
    import pytest

    return pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: needs CUDA")


# Here rather than in bench/conftest.py: under a pytest session rooted at tests/, `conftest` is tests/conftest.py
# (bench/gpu_proof.py's smoke test imports the benchmarks from there).
requires_cuda = _requires_cuda()


def environment() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # triton is optional off Linux
        triton_version = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, check=False
        ).stdout.strip() or None
    except OSError:
        commit = None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})"
    return {
        "device": device,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "git_commit": commit,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_result(name: str, payload: dict, results_dir: Path | None = None) -> Path:
    """Merge `payload` into bench/results/<name>.json (keyed by device, so H100 and H200 runs sit side by side);
    results_dir puts it elsewhere (the smoke test writes to a temporary folder)."""
    results_dir = RESULTS_DIR if results_dir is None else Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    env = environment()
    data = json.loads(path.read_text()) if path.exists() else {}
    data[env["device"]] = {"environment": env, **payload}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def cuda_time_ms(fn, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median time of fn() in milliseconds with CUDA events (triton.testing.do_bench)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def peak_memory_mb(fn) -> float:
    """Peak CUDA memory allocated above the current level while fn() runs, in MiB."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


@lru_cache(maxsize=1)
def copy_bandwidth_gbs() -> float:
    """Measured device-to-device copy bandwidth in GB/s (bytes read + bytes written)."""
    n = 1 << 28  # 256 Mi bf16 elements = 512 MiB, far past L2
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


@lru_cache(maxsize=1)
def matmul_tflops() -> float:
    """Measured dense bf16 matmul rate in TFLOP/s on random data (8192^3): the trainer's MFU denominator too."""
    from fastsft.train.metrics import peak_matmul_flops

    return peak_matmul_flops("cuda") / 1e12
