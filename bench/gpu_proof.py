"""One command that proves (or disproves) fastsft's speed claims on a GPU, with a PASS/FAIL line per target.

    python bench/gpu_proof.py              # one H100/H200: the GPU tests, then every benchmark at realistic shapes
    python bench/gpu_proof.py --smoke      # the same code on CPU at tiny shapes (tests/test_gpu_proof.py runs it)

In order: the GPU tests (`pytest -m gpu tests`, in a subprocess with a time limit), then the measurements below,
each against the target the README states. Results go to bench/results/gpu_proof.json (device, torch/triton versions,
git commit, date, every number behind every line), the table to stdout. A baseline that is not installed
(liger-kernel, torch.nn.functional.linear_cross_entropy before torch 2.13) makes its line "n/a", never a pass.

Targets (the floor of each kernel is measured in this process: device-to-device copy bandwidth, bf16 matmul rate):
- cross_entropy on logits, forward + backward: >= 85% of copy bandwidth (V=128256, N=16384, 0% and 50% masked; and
  V=50257 in a buffer whose rows are padded to 50272, gradient written in place, as the fused op's buffer is).
- linear_cross_entropy, forward + backward (N=16384, H=4096, V=128256, bf16): <= 1.25x the matmul floor
  (6 N H V FLOPs), >= 1.5x Liger, >= 1.0x torch.nn.functional.linear_cross_entropy (chunked), >= 1.0x eager, and
  at most 1.5 GB allocated beyond its inputs and outputs (the gradients), also with the fp32 master weight.
- rms_norm and add_rms_norm, forward and forward + backward at hidden 2048, 4096, 8192 (16384 rows): >= 85% of copy
  bandwidth and >= 1.3x torch.compile of the reference; the q/k norm (rows of 128, 8192 tokens x 32 heads) within
  3x its floor.
- attention: the per-layer cost of padding (FlashAttention bound = seq_len and max_docs + 2 offsets, against the row's
  real documents and longest length) <= 0.2 ms, forward + backward, Llama-3.2-1B heads, sequence 8192.
- the Llama-3.2-1B train step at sequence 8192 (bench/bench_step.py's data and variants): >= 45% MFU, no host sync in
  a step (torch.cuda sync debug mode "error"), no recompilation after warm-up, >= 2x transformers padded SDPA and
  >= 1.3x transformers padding-free + Liger in tokens/s.
Meant to finish within 8 minutes on one H100/H200; each section prints its wall time so the first run shows where
the time goes.

(Over 500 lines on purpose: one self-contained script is what a GPU session can copy and run in one call.)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if "--smoke" in sys.argv:  # the kernels run on CPU tensors only through the interpreter, read at triton's import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step  # noqa: E402
from common import copy_bandwidth_gbs, cuda_time_ms, matmul_tflops, peak_memory_mb, write_result  # noqa: E402

from fastsft.attention import varlen_attention  # noqa: E402
from fastsft.ops import (  # noqa: E402
    add_rms_norm,
    add_rms_norm_reference,
    cross_entropy,
    linear_cross_entropy,
    rms_norm,
    rms_norm_reference,
)

IGNORE = -100
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Shapes:
    tokens: int  # rows of logits / hidden states
    vocab: int
    odd_vocab: int
    hidden: int
    norm_rows: int
    norm_hidden: tuple
    qk_rows: int
    heads: int
    kv_heads: int
    head_dim: int
    step_rows: int
    step_warmup: int
    gpu_test_seconds: int


REALISTIC = Shapes(tokens=16384, vocab=128256, odd_vocab=50257, hidden=4096, norm_rows=16384,
                   norm_hidden=(2048, 4096, 8192), qk_rows=8192 * 32, heads=32, kv_heads=8, head_dim=64,
                   step_rows=6, step_warmup=3, gpu_test_seconds=150)
SMOKE = Shapes(tokens=48, vocab=1001, odd_vocab=257, hidden=32, norm_rows=24, norm_hidden=(64, 96), qk_rows=48,
               heads=4, kv_heads=2, head_dim=16, step_rows=1, step_warmup=1, gpu_test_seconds=300)
# bench_step's model and row length for the smoke run (the realistic run keeps Llama-3.2-1B at 8192).
SMOKE_MODEL = dict(bench_step.LLAMA_3_2_1B, vocab_size=512, hidden_size=64, intermediate_size=128,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   max_position_embeddings=512, rope_scaling=None)
SMOKE_SEQ_LEN = 256


class Device:
    """Timing, floors and memory on the GPU, or their CPU stand-ins for the smoke run (same calls, tiny sizes)."""

    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.type = "cpu" if smoke else "cuda"

    def time_ms(self, fn) -> float:
        if not self.smoke:
            return cuda_time_ms(fn)
        fn()
        samples = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)

    def sync(self) -> None:
        if not self.smoke:
            torch.cuda.synchronize()

    def copy_gbs(self) -> float:
        if not self.smoke:
            return copy_bandwidth_gbs()
        src = torch.randn(1 << 22)
        dst = torch.empty_like(src)
        return 2 * src.numel() * 4 / (self.time_ms(lambda: dst.copy_(src)) * 1e-3) / 1e9

    def matmul_tflops(self) -> float:
        if not self.smoke:
            return matmul_tflops()
        a = torch.randn(256, 256)
        return 2 * 256**3 / (self.time_ms(lambda: a @ a) * 1e-3) / 1e12

    def extra_memory_mb(self, fn) -> float | None:
        """Peak memory allocated above the current level while fn runs (None on CPU: not tracked)."""
        return None if self.smoke else peak_memory_mb(fn)

    def compile(self, fn):
        # Inductor on CPU compiles C++ (minutes on a small machine): the smoke run checks the wiring with "eager".
        return torch.compile(fn, dynamic=False, backend="eager" if self.smoke else "inductor")

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16


@contextlib.contextmanager
def backend(name: str):
    """FASTSFT_BACKEND for the duration (the smoke run forces the Triton kernels through the interpreter)."""
    old = os.environ.get("FASTSFT_BACKEND")
    os.environ["FASTSFT_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FASTSFT_BACKEND", None)
        else:
            os.environ["FASTSFT_BACKEND"] = old


@dataclass
class Target:
    name: str
    measured: float | None
    goal: str  # ">= 0.85" or "<= 1.25"
    unit: str = ""
    note: str = ""

    @property
    def status(self) -> str:
        if self.measured is None or (isinstance(self.measured, float) and math.isnan(self.measured)):
            return "n/a"
        op, value = self.goal.split()
        ok = self.measured >= float(value) if op == ">=" else self.measured <= float(value)
        return "PASS" if ok else "FAIL"


@dataclass
class Report:
    targets: list = field(default_factory=list)
    details: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    def add(self, *targets: Target) -> None:
        self.targets.extend(targets)


def grad_step(fn, inputs):
    return lambda: torch.autograd.grad(fn(*inputs), inputs)


# ------------------------------------------------------------------------------------------------- GPU tests


def run_gpu_tests(dev: Device, shapes: Shapes, report: Report) -> None:
    """`pytest -m gpu tests` in a subprocess; on CPU (smoke) only collected, which still proves the selection
    imports."""
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"]
    if dev.smoke:
        command.append("--collect-only")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=shapes.gpu_test_seconds)
        tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or [""]
        passed = done.returncode == 0
    except subprocess.TimeoutExpired:
        tail, passed = [f"timed out after {shapes.gpu_test_seconds} s"], False
    report.details["gpu_tests"] = {"command": " ".join(command[2:]), "summary": tail[0], "passed": passed}
    report.add(Target("GPU tests (pytest -m gpu)" + (" [collect only]" if dev.smoke else ""), float(passed),
                      ">= 1", note=tail[0][:60]))


# -------------------------------------------------------------------------------------------- cross-entropy


def labels_for(n: int, vocab: int, masked: float, device: str) -> torch.Tensor:
    labels = torch.randint(0, vocab, (n,), device=device)
    labels[torch.rand(n, device=device) < masked] = IGNORE
    return labels


def measure_cross_entropy(dev: Device, shapes: Shapes, report: Report) -> None:
    copy = dev.copy_gbs()
    cases = [(shapes.vocab, 0.0, False), (shapes.vocab, 0.5, False), (shapes.odd_vocab, 0.0, True)]
    for vocab, masked, padded in cases:
        n = shapes.tokens
        labels = labels_for(n, vocab, masked, dev.type)
        stride = -(-vocab // 16) * 16 if padded else vocab
        logits = (torch.randn(n, stride, device=dev.type) * 2).to(dev.dtype)[:, :vocab].requires_grad_()
        # Padded rows: the gradient goes over the logits (the fused op's buffer is padded the same way).
        step = grad_step(lambda x, labels=labels, padded=padded: cross_entropy(x, labels, inplace_backward=padded),
                         [logits])
        ms = dev.time_ms(step)
        supervised = int((labels != IGNORE).sum())
        moved = (2 * supervised + n) * vocab * 2
        fraction = moved / (ms * 1e-3) / 1e9 / copy
        key = f"V={vocab}{f' (rows padded to {stride})' if padded else ''} N={n} masked {masked:.0%}"
        report.details[f"cross_entropy {key}"] = {"ms": ms, "bytes": moved, "copy_gbs": copy, "of_copy": fraction}
        report.add(Target(f"cross_entropy fwd+bwd {key}: share of copy bandwidth", fraction, ">= 0.85"))


# ------------------------------------------------------------------------------------- linear cross-entropy


def _liger_flce():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)
    return lambda h, w, y: loss(w, h, y)


def _torch_chunked_lce():
    fn, options = getattr(F, "linear_cross_entropy", None), getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if fn is None or options is None:
        return None
    return lambda h, w, y: fn(h, w, y, ignore_index=IGNORE, options=options())


def measure_linear_cross_entropy(dev: Device, shapes: Shapes, report: Report) -> None:
    n, hdim, vocab = shapes.tokens, shapes.hidden, shapes.vocab
    labels = labels_for(n, vocab, 0.0, dev.type)
    hidden = torch.randn(n, hdim, device=dev.type, dtype=dev.dtype, requires_grad=True)
    weight = (torch.randn(vocab, hdim, device=dev.type) / hdim**0.5).to(dev.dtype).requires_grad_()
    variants = {
        "fastsft": lambda h, w: linear_cross_entropy(h, w, labels),
        "torch_eager": lambda h, w: F.cross_entropy((h @ w.t()).float(), labels, ignore_index=IGNORE),
    }
    missing = {}
    for name, make in (("liger", _liger_flce), ("torch_linear_cross_entropy", _torch_chunked_lce)):
        fn = make()
        if fn is None:
            missing[name] = "not installed" if name == "liger" else "not in this torch"
        elif dev.smoke and name == "liger":
            missing[name] = "Triton kernels for CUDA only"
        else:
            variants[name] = (lambda f: lambda h, w: f(h, w, labels))(fn)
    times = {}
    for name, fn in variants.items():
        times[name] = dev.time_ms(grad_step(fn, [hidden, weight]))
    floor_ms = 6 * n * hdim * vocab / (dev.matmul_tflops() * 1e12) * 1e3
    outputs_mb = (hidden.numel() * hidden.element_size() + weight.numel() * weight.element_size()) / 2**20
    extra = dev.extra_memory_mb(grad_step(variants["fastsft"], [hidden, weight]))
    # The fp32 master weight (what the model passes under bf16 autocast): gradient in fp32, no [V, H] temporaries.
    master = weight.detach().float().requires_grad_()
    master_ms = dev.time_ms(grad_step(variants["fastsft"], [hidden, master]))
    master_outputs_mb = (hidden.numel() * 2 + master.numel() * 4) / 2**20
    master_extra = dev.extra_memory_mb(grad_step(variants["fastsft"], [hidden, master]))
    beyond = None if extra is None else (extra - outputs_mb) / 1024 * 2**30 / 1e9
    master_beyond = None if master_extra is None else (master_extra - master_outputs_mb) / 1024 * 2**30 / 1e9
    report.details["linear_cross_entropy"] = {
        "shape": f"N={n} H={hdim} V={vocab} bf16", "ms": times, "matmul_floor_ms": floor_ms,
        "fp32_master_weight_ms": master_ms, "extra_gb_beyond_inputs_outputs": beyond,
        "fp32_master_extra_gb_beyond_inputs_outputs": master_beyond,
    }
    ours = times["fastsft"]
    shape = f"N={n} H={hdim} V={vocab}"
    report.add(
        Target(f"linear_cross_entropy {shape}: time / matmul floor", ours / floor_ms, "<= 1.25"),
        Target(f"linear_cross_entropy {shape}: speed vs Liger", times.get("liger", math.nan) / ours, ">= 1.5",
               note=missing.get("liger", "")),
        Target(f"linear_cross_entropy {shape}: speed vs torch F.linear_cross_entropy (chunked)",
               times.get("torch_linear_cross_entropy", math.nan) / ours, ">= 1.0",
               note=missing.get("torch_linear_cross_entropy", "")),
        Target(f"linear_cross_entropy {shape}: speed vs eager", times["torch_eager"] / ours, ">= 1.0"),
        Target(f"linear_cross_entropy {shape}: GB beyond inputs and outputs", beyond, "<= 1.5", unit="GB"),
        Target(f"linear_cross_entropy {shape} fp32 master weight: GB beyond inputs and outputs", master_beyond,
               "<= 1.5", unit="GB"),
    )


# ------------------------------------------------------------------------------------------------- RMSNorm


def measure_rms_norm(dev: Device, shapes: Shapes, report: Report) -> None:
    copy = dev.copy_gbs()
    cases = [(op, shapes.norm_rows, h) for op in ("rms_norm", "add_rms_norm") for h in shapes.norm_hidden]
    cases.append(("rms_norm", shapes.qk_rows, 128))
    for op, rows, hdim in cases:
        ours_fn = rms_norm if op == "rms_norm" else add_rms_norm
        reference = rms_norm_reference if op == "rms_norm" else add_rms_norm_reference
        compiled = dev.compile(reference)
        weight = (torch.rand(hdim, device=dev.type) + 0.5).to(dev.dtype).requires_grad_()
        inputs = [torch.randn(rows, hdim, device=dev.type, dtype=dev.dtype, requires_grad=True)
                  for _ in range(1 if op == "rms_norm" else 2)]
        for with_backward in (False, True):
            moved = {("rms_norm", False): 2, ("rms_norm", True): 5, ("add_rms_norm", False): 4,
                     ("add_rms_norm", True): 8}[(op, with_backward)] * rows * hdim * 2
            times = {}
            for name, fn in (("fastsft", ours_fn), ("torch_compile", compiled)):
                times[name] = dev.time_ms(_norm_step(fn, inputs, weight, with_backward))
            fraction = moved / (times["fastsft"] * 1e-3) / 1e9 / copy
            direction = "fwd+bwd" if with_backward else "fwd"
            key = f"{op} {direction} {rows}x{hdim}"
            report.details[key] = {"ms": times, "bytes": moved, "of_copy": fraction}
            if hdim == 128:
                report.add(Target(f"q/k norm {key}: time / bandwidth floor", 1 / fraction, "<= 3.0"))
            else:
                report.add(Target(f"{key}: share of copy bandwidth", fraction, ">= 0.85"),
                           Target(f"{key}: speed vs torch.compile", times["torch_compile"] / times["fastsft"],
                                  ">= 1.3"))


def _norm_step(fn, inputs, weight, with_backward: bool):
    """One timed call of a norm: forward only (no autograd graph), or forward + backward with fixed random output
    gradients (torch.autograd.grad: nothing accumulates between calls)."""
    def call():
        out = fn(*inputs, weight, 1e-6)
        return out if isinstance(out, tuple) else (out,)

    if not with_backward:
        def forward():
            with torch.no_grad():
                return call()
        return forward
    grads = []

    def forward_backward():
        outs = call()
        if not grads:
            grads.extend(torch.randn_like(o) for o in outs)
        return torch.autograd.grad(outs, inputs, grads)
    return forward_backward


# ----------------------------------------------------------------------------------------------- attention


def measure_attention(dev: Device, shapes: Shapes, report: Report, seq_len: int, max_docs: int) -> None:
    docs = bench_step.make_rows(1)[0]
    lengths = [len(d) for d in docs]
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    tight = offsets + ([seq_len] if offsets[-1] < seq_len else [])  # documents, then the padding tail
    padded = tight + [seq_len] * (max_docs + 2 - len(tight))  # the fixed-length contract: max_docs + 2 entries
    tight_bound = max(max(lengths), seq_len - offsets[-1])
    dtype = dev.dtype if not dev.smoke else torch.float32
    q = torch.randn(seq_len, shapes.heads, shapes.head_dim, device=dev.type, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(seq_len, shapes.kv_heads, shapes.head_dim, device=dev.type, dtype=dtype, requires_grad=True)
            for _ in range(2))
    times = {}
    for name, cu, bound in (("padded", padded, seq_len), ("tight", tight, tight_bound)):
        cu_seqlens = torch.tensor(cu, device=dev.type, dtype=torch.int32)
        step = grad_step(lambda q, k, v, cu_seqlens=cu_seqlens, bound=bound:
                         varlen_attention(q, k, v, cu_seqlens, bound).float().sum(), [q, k, v])
        times[name] = dev.time_ms(step)
    overhead = times["padded"] - times["tight"]
    report.details["attention"] = {"ms": times, "documents": len(lengths), "longest": max(lengths),
                                   "cu_seqlens_entries": {"padded": len(padded), "tight": len(tight)}}
    report.add(Target(f"attention padding overhead per layer (fwd+bwd, seq {seq_len}, {len(lengths)} docs)",
                      overhead, "<= 0.2", unit="ms"))


# ------------------------------------------------------------------------------------------------ the step


def measure_step(dev: Device, shapes: Shapes, report: Report) -> None:
    rows = bench_step.make_rows(shapes.step_rows + shapes.step_warmup)
    lengths = [len(d) for docs in rows for d in docs]
    context = sum(x * x for x in lengths) / sum(lengths)
    with torch.device("meta"):
        model_config = bench_step.ModelConfig(**bench_step.LLAMA_3_2_1B)
        flops_per_token = bench_step.Transformer.from_config(model_config).flops_per_token(context)
    peak = dev.matmul_tflops() * 1e12
    results = {}
    for name, build in bench_step.VARIANTS.items():
        gc.collect()
        if not dev.smoke:
            torch.cuda.empty_cache()
        try:
            model, run, info = build(rows)
            for i in range(shapes.step_warmup):
                run(i)
            dev.sync()
            graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            start = time.perf_counter()
            losses = [run(shapes.step_warmup + i) for i in range(shapes.step_rows)]
            dev.sync()
            seconds = time.perf_counter() - start
            tokens = sum(sum(len(d) for d in rows[(shapes.step_warmup + i) % len(rows)])
                         for i in range(shapes.step_rows))
            result = {**info, "tokens_per_s": tokens / seconds, "step_ms": 1e3 * seconds / shapes.step_rows,
                      "last_loss": float(losses[-1].detach().float()),
                      "recompiles_after_warmup": torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before}
            result["mfu"] = result["tokens_per_s"] * flops_per_token / peak
            if name == "fastsft":
                result["host_sync_in_step"] = _syncs_in_a_step(dev, run, shapes.step_warmup + shapes.step_rows)
            del model, run
        except torch.cuda.OutOfMemoryError as e:
            result = {"error": f"out of memory: {str(e).splitlines()[0]}"}
        results[name] = result
    report.details["train_step"] = {"variants": results, "flops_per_token": flops_per_token,
                                    "matmul_tflops": peak / 1e12, "seq_len": bench_step.SEQ_LEN}
    ours = results.get("fastsft", {})
    padded, free = results.get("hf_padded_sdpa", {}), results.get("hf_padding_free", {})

    def ratio(other):
        if "tokens_per_s" not in ours or "tokens_per_s" not in other:
            return None
        return ours["tokens_per_s"] / other["tokens_per_s"]

    liger = free.get("liger") == "applied"
    sync = ours.get("host_sync_in_step")
    report.add(
        Target(f"train step seq {bench_step.SEQ_LEN}: MFU", ours.get("mfu"), ">= 0.45"),
        Target("train step: no host sync (sync debug mode error)", None if sync is None else float(not sync),
               ">= 1", note="" if sync is not None else "needs CUDA"),
        Target("train step: recompilations after warm-up", ours.get("recompiles_after_warmup"), "<= 0"),
        Target("train step: tokens/s vs transformers padded SDPA", ratio(padded), ">= 2.0"),
        Target("train step: tokens/s vs transformers padding-free + Liger", ratio(free) if liger else None,
               ">= 1.3", note="" if liger else f"liger: {free.get('liger', 'not run')}"),
    )


def _syncs_in_a_step(dev: Device, run, i: int) -> bool | None:
    """Whether one more step does a device-to-host sync (it raises under sync debug mode "error")."""
    if dev.smoke:
        return None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run(i)
        return False
    except RuntimeError as e:
        if "synchroniz" not in str(e).lower():
            raise
        return True
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ------------------------------------------------------------------------------------------------- driver


def print_table(report: Report) -> None:
    width = max(len(t.name) for t in report.targets)
    print(f"\n{'target':{width}}  {'measured':>10}  {'goal':>8}  result")
    for t in report.targets:
        value = "-" if t.measured is None or (isinstance(t.measured, float) and math.isnan(t.measured)) \
            else f"{t.measured:.3f}"
        print(f"{t.name:{width}}  {value:>10}  {t.goal:>8}  {t.status}{'  (' + t.note + ')' if t.note else ''}")
    counts = {s: sum(t.status == s for t in report.targets) for s in ("PASS", "FAIL", "n/a")}
    print(f"\n{counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['n/a']} n/a; seconds per section: "
          + ", ".join(f"{k} {v:.0f}" for k, v in report.seconds.items()))


def run(smoke: bool, results_dir: Path | None = None, skip_tests: bool = False) -> Report:
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_proof: no CUDA device here; run with --smoke for the CPU check of the same code")
    dev, shapes = Device(smoke), SMOKE if smoke else REALISTIC
    seq_len, max_docs = bench_step.SEQ_LEN, bench_step.MAX_DOCS
    if smoke:
        bench_step.DEVICE, bench_step.LLAMA_3_2_1B = "cpu", SMOKE_MODEL
        bench_step.SEQ_LEN = seq_len = SMOKE_SEQ_LEN
        bench_step.MAX_DOCS = max_docs = SMOKE_SEQ_LEN // 32
        bench_step.COMPILE = "none"
        bench_step.PADDED_BUDGET = 2 * SMOKE_SEQ_LEN
    report = Report()
    kernels = "triton" if smoke else "auto"  # CPU: the real kernels through the interpreter
    sections = [("gpu_tests", lambda: None if skip_tests else run_gpu_tests(dev, shapes, report)),
                ("cross_entropy", lambda: measure_cross_entropy(dev, shapes, report)),
                ("linear_cross_entropy", lambda: measure_linear_cross_entropy(dev, shapes, report)),
                ("rms_norm", lambda: measure_rms_norm(dev, shapes, report)),
                ("attention", lambda: measure_attention(dev, shapes, report, seq_len, max_docs)),
                ("train_step", lambda: measure_step(dev, shapes, report))]
    for name, section in sections:
        start = time.perf_counter()
        with backend("reference" if smoke and name == "train_step" else kernels):
            section()
        report.seconds[name] = time.perf_counter() - start
        print(f"[{name}: {report.seconds[name]:.0f} s]", flush=True)
    print_table(report)
    payload = {
        "mode": "smoke (CPU, tiny shapes: the numbers mean nothing)" if smoke else "realistic shapes",
        "targets": [{"name": t.name, "measured": t.measured, "goal": t.goal, "unit": t.unit, "status": t.status,
                     "note": t.note} for t in report.targets],
        "details": report.details, "seconds": report.seconds,
    }
    print(f"wrote {write_result('gpu_proof', payload, results_dir)}")
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: check the code runs (no claims)")
    parser.add_argument("--results-dir", type=Path, default=None, help="where gpu_proof.json goes "
                        "(default bench/results)")
    parser.add_argument("--skip-tests", action="store_true", help="measure only, without pytest -m gpu first")
    args = parser.parse_args(argv)
    report = run(args.smoke, args.results_dir, args.skip_tests)
    return 0 if args.smoke or all(t.status != "FAIL" for t in report.targets) else 1


if __name__ == "__main__":
    sys.exit(main())
