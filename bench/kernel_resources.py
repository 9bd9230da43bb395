"""Registers, spills and shared memory of every Triton kernel as compiled for an H100/H200 (sm_90), without a GPU.

Runs `bench/aot.py` (which records the launches the ops make at realistic widths and compiles each to a cubin
with the ptxas shipped in the triton wheel) in a subprocess without TRITON_INTERPRET, prints a table and merges the
records into bench/results/kernel_resources.json. Nothing is run on a GPU: these are compile-time facts, not timings.

    python bench/kernel_resources.py [--arch 90]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402


def compile_records(arch: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as cache:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = cache  # a fresh cache: every kernel is really compiled
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        result = subprocess.run([sys.executable, str(Path(__file__).with_name("aot.py")), "--arch", str(arch)], env=env,
                                capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"ahead-of-time compile failed:\n{result.stderr}")
    return json.loads(result.stdout)


def add_occupancy(records: list[dict]) -> None:
    """Programs per SM each binary allows (threads, registers, shared memory): what the RMSNorm backward's persistent
    grid launches per SM on the GPU, read there from the same compiled kernel."""
    from fastsft.kernels.rms_norm import programs_per_sm

    for r in records:
        r["programs_per_sm"] = programs_per_sm(r["registers"], r["num_warps"],
                                               r["shared_bytes"] + r["static_shared_bytes"])


def print_table(records: list[dict]) -> None:
    header = (f"{'kernel':22} {'config':58} {'warps':>5} {'regs':>4} {'spill B':>7} {'shared B':>8} {'per SM':>6}"
              "  ops")
    print(header)
    print("-" * len(header))
    for r in records:
        shared = r["shared_bytes"] + r["static_shared_bytes"]
        print(f"{r['kernel']:22} {r['config']:58} {r['num_warps']:>5} {r['registers']:>4} {r['spill_bytes']:>7} "
              f"{shared:>8} {r['programs_per_sm']:>6}  {', '.join(r['ops'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an integer (90 = H100/H200)")
    args = parser.parse_args()
    records = compile_records(args.arch)
    add_occupancy(records)
    print_table(records)
    path = write_result("kernel_resources", {
        "target": f"cuda sm_{args.arch}, compiled ahead of time, not run",
        "columns": {"registers": "per thread", "spill_bytes": "local memory per thread (stack frame: spills)",
                    "shared_bytes": "dynamic shared memory the launch requests",
                    "static_shared_bytes": "static shared memory in the cubin",
                    "programs_per_sm": "programs of this binary one sm_90 SM holds at once (threads, registers, "
                                       "shared memory)"},
        "kernels": records,
    })
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
