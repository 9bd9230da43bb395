"""Compile the package's Triton kernels ahead of time for a GPU that is not here (default: H100/H200, sm_90).

A build-time tool beside the benchmarks (not shipped in the package): used by tests/test_kernels_compile.py and
bench/kernel_resources.py, never by training. The kernels are only ever *run*
on CPU under the Triton interpreter in CI, which hides everything a real compile would reject (unsupported constructs,
loop-carried type changes, register spills). This module closes that gap without a device:

    1. `realistic_launches` calls the public custom ops (`torch.ops.fastsft.*`) on CPU tensors of realistic widths
       (vocabulary 128256, hidden 2048..16384) with the kernels in `fastsft.kernels.*` swapped for recorders, so
       the launchers themselves choose BLOCK, num_warps and every constexpr flag, exactly as they would on a GPU.
    2. `compile_launch` specialises each recorded call the way `JITFunction.run` does (pointer dtypes, i32/i64
       integers, divisibility-by-16 hints, ints equal to 1 folded) and runs the full pipeline down to a cubin with
       the ptxas shipped in the triton wheel.
    3. `cubin_resources` reads registers, local memory (spills) and shared memory from the cubin with cuobjdump.

Triton decides at decoration time whether @triton.jit builds an interpreter object, so this must run in a process
where TRITON_INTERPRET is not "1" (the test runs `python bench/aot.py` in a subprocess).
Relies on triton 3.9 internals (`create_function_from_signature`, `JITFunction._pack_args`); pinned by the test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise RuntimeError("bench/aot.py compiles real kernels: run it in a process without TRITON_INTERPRET=1 "
                       "(e.g. `env -u TRITON_INTERPRET python bench/aot.py`)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

import fastsft.ops  # noqa: E402, F401  registers torch.ops.fastsft.*
from fastsft.kernels import cross_entropy as ce_kernels  # noqa: E402
from fastsft.kernels import rms_norm as rms_kernels  # noqa: E402

# H100 and H200 are both compute capability 9.0 with 32-thread warps.
SM90 = GPUTarget("cuda", 90, 32)
# Realistic widths: Llama-3's vocabulary, and hidden sizes from 1B to 405B-class models plus one that is not a power
# of two (masked tail of the single block), and 128 (Qwen3's per-head q/k norms: several rows per tile).
VOCAB = 128256
HIDDEN_SIZES = (128, 2048, 4096, 4100, 8192, 16384)
DTYPES = (torch.bfloat16, torch.float32)
# (label_smoothing, z_loss, softcap): every option off, and every option on (the largest kernel of each job).
CE_OPTIONS = ((0.0, 0.0, 0.0), (0.1, 1e-4, 30.0))
# Rows per call: a few, so the CPU tensors stay small; 24 rows split over 4 interpreter programs gives 6 rows per
# program (no divisibility hint, like a real row count spread over the SMs).
CE_ROWS = 4
RMS_ROWS = 24


@dataclass
class Launch:
    """One recorded kernel launch: which op made it, the kernel, and the exact arguments the launcher passed."""

    op: str
    config: str
    kernel: triton.runtime.JITFunction
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` records the call instead of running it."""

    def __init__(self, kernel, sink: list, label: list):
        self.kernel, self.sink, self.label = kernel, sink, label

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.sink.append(Launch(self.label[0], self.label[1], self.kernel, args, kwargs))
        return record


@contextlib.contextmanager
def _recording(sink: list, label: list):
    """Swap every kernel the launchers call for a recorder (the launchers look the kernels up as module globals)."""
    targets = [(ce_kernels, "_cross_entropy_kernel"), (rms_kernels, "_rms_norm_fwd_kernel"),
               (rms_kernels, "_rms_norm_bwd_kernel")]
    originals = [getattr(module, name) for module, name in targets]
    try:
        for (module, name), kernel in zip(targets, originals, strict=True):
            setattr(module, name, _Recorder(kernel, sink, label))
        yield
    finally:
        for (module, name), kernel in zip(targets, originals, strict=True):
            setattr(module, name, kernel)


def _cross_entropy_calls(dtype: torch.dtype, options: tuple[float, float, float]):
    """(op name, thunk) for every custom op that reaches the cross-entropy kernel."""
    ops = torch.ops.fastsft
    logits = torch.empty(CE_ROWS, VOCAB, dtype=dtype)
    labels = torch.randint(0, VOCAB, (CE_ROWS,))
    lse = torch.empty(CE_ROWS)
    grad_losses = torch.empty(CE_ROWS)
    # The fused linear path: a tiny hidden size keeps the CPU matmuls cheap; the kernel only sees [rows, VOCAB].
    hidden = torch.empty(CE_ROWS, 8, dtype=dtype).normal_()
    weight = torch.empty(VOCAB, 8, dtype=dtype).normal_()
    return [
        ("cross_entropy_fwd", lambda: ops.cross_entropy_fwd(logits, labels, -100, *options, False)),
        ("cross_entropy_bwd", lambda: ops.cross_entropy_bwd(grad_losses, logits, labels, lse, -100, *options)),
        ("cross_entropy_bwd_inplace",
         lambda: ops.cross_entropy_bwd_inplace(grad_losses, logits, labels, lse, -100, *options)),
        ("linear_cross_entropy_sum",
         lambda: ops.linear_cross_entropy_sum(hidden, weight, labels, None, -100, *options, True, True, False)),
        ("linear_cross_entropy_rows",
         lambda: ops.linear_cross_entropy_rows(hidden, weight, labels, None, -100, *options)),
        ("linear_cross_entropy_rows_bwd",
         lambda: ops.linear_cross_entropy_rows_bwd(grad_losses, hidden, weight, labels, None, lse, -100, *options,
                                                   True, True, False)),
    ]


def _rms_norm_calls(dtype: torch.dtype, hidden_size: int):
    ops = torch.ops.fastsft
    x = torch.empty(RMS_ROWS, hidden_size, dtype=dtype)
    weight = torch.empty(hidden_size, dtype=dtype)
    rstd = torch.empty(RMS_ROWS)
    return [
        ("rms_norm_fwd", lambda: ops.rms_norm_fwd(x, weight, 1e-6, 0.0)),
        ("add_rms_norm_fwd", lambda: ops.add_rms_norm_fwd(x, x, weight, 1e-6, 0.0)),
        ("rms_norm_bwd", lambda: ops.rms_norm_bwd(x, x, weight, rstd, 0.0, None)),
        ("add_rms_norm_bwd", lambda: ops.rms_norm_bwd(x, x, weight, rstd, 0.0, x)),
    ]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def realistic_launches() -> list[Launch]:
    """Every distinct kernel specialisation the ops launch at the realistic widths above."""
    launches: list[Launch] = []
    label = ["", ""]
    with _recording(launches, label), torch.no_grad():
        for dtype in DTYPES:
            for options in CE_OPTIONS:
                smoothing, z_loss, softcap = options
                for op, call in _cross_entropy_calls(dtype, options):
                    label[:] = [op, f"{_dtype_name(dtype)} V={VOCAB} smoothing={smoothing} z_loss={z_loss} "
                                    f"softcap={softcap}"]
                    call()
            for hidden_size in HIDDEN_SIZES:
                for op, call in _rms_norm_calls(dtype, hidden_size):
                    label[:] = [op, f"{_dtype_name(dtype)} hidden={hidden_size}"]
                    call()
    return launches


def _specialise(launch: Launch, backend):
    """What `JITFunction.run` computes before compiling: options, signature, constexprs, attrs."""
    kernel, kwargs = launch.kernel, dict(launch.kwargs)
    kwargs.setdefault("debug", kernel.debug)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    return kernel._pack_args(backend, kwargs, bound_args, specialization, options)


def specialisation_key(launch: Launch, target: GPUTarget = SM90) -> str:
    """Identical keys compile to the identical binary (used to skip duplicates, e.g. bwd and bwd_inplace)."""
    options, signature, constexprs, attrs = _specialise(launch, make_backend(target))
    return repr((launch.kernel.__name__, signature, sorted(constexprs.items()), sorted(attrs.items()),
                 options.num_warps, options.num_stages))


def compile_launch(launch: Launch, target: GPUTarget = SM90):
    """Compile one recorded launch for `target` down to a binary; returns triton's CompiledKernel."""
    backend = make_backend(target)
    options, signature, constexprs, attrs = _specialise(launch, backend)
    source = ASTSource(launch.kernel, signature, constexprs, attrs)
    return triton.compile(source, target=target, options=options.__dict__)


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def cubin_resources(cubin: bytes) -> dict:
    """Registers, spilled bytes per thread and static shared memory of a one-kernel cubin (cuobjdump's report)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                                check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", report)
    if match is None:
        raise RuntimeError(f"cuobjdump printed no resource line for the cubin:\n{report}")
    registers, stack, shared, local = map(int, match.groups())
    # These kernels call no functions and declare no local arrays, so their whole stack frame is register spills;
    # stack + local is CUDA's per-thread local memory size (triton's `n_spills` on a GPU is this divided by 4).
    return {"registers": registers, "spill_bytes": stack + local, "static_shared_bytes": shared}


def compile_all(target: GPUTarget = SM90) -> list[dict]:
    """Compile every distinct realistic launch; one record per binary (ops sharing it are listed together)."""
    records: dict[str, dict] = {}
    for launch in realistic_launches():
        key = specialisation_key(launch, target)
        if key in records:
            if launch.op not in records[key]["ops"]:
                records[key]["ops"].append(launch.op)
            continue
        compiled = compile_launch(launch, target)
        meta = compiled.metadata
        records[key] = {
            "kernel": launch.kernel.__name__,
            "ops": [launch.op],
            "config": launch.config,
            "constexprs": {launch.kernel.arg_names[path[0]]: value for path, value in
                           _specialise(launch, make_backend(target))[2].items()},
            "num_warps": meta.num_warps,
            "shared_bytes": meta.shared,  # dynamic shared memory the launch requests (reductions, layout changes)
            "has_cubin": bool(compiled.asm.get("cubin")),
            **cubin_resources(compiled.asm["cubin"]),
        }
    return list(records.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an integer (90 = H100/H200)")
    args = parser.parse_args(argv)
    json.dump(compile_all(GPUTarget("cuda", args.arch, 32)), sys.stdout, default=str)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
