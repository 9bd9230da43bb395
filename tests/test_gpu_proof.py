"""`bench/gpu_proof.py --smoke`: the one-command GPU proof runs end to end on CPU at tiny shapes, so it cannot rot
between GPU runs. The numbers of a smoke run mean nothing; what is checked is that every target of the issue gets a
line with a finite measurement (or "n/a" for a baseline that is not installed / needs CUDA), and that the JSON
result records the environment and every line."""

import json
import math
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_gpu_proof_smoke(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_proof

    for name in ("DEVICE", "LLAMA_3_2_1B", "SEQ_LEN", "MAX_DOCS", "COMPILE", "PADDED_BUDGET"):  # restored after
        monkeypatch.setattr(gpu_proof.bench_step, name, getattr(gpu_proof.bench_step, name))
    report = gpu_proof.run(smoke=True, results_dir=tmp_path)

    names = [t.name for t in report.targets]
    expected = ["GPU tests", "cross_entropy fwd+bwd V=1001 N=48 masked 0%", "masked 50%", "V=257 (rows padded to 272)",
                "time / matmul floor", "vs Liger", "vs torch F.linear_cross_entropy", "vs eager",
                "GB beyond inputs and outputs", "fp32 master weight", "rms_norm fwd 24x64", "rms_norm fwd+bwd 24x96",
                "add_rms_norm fwd+bwd 24x96: speed vs torch.compile", "q/k norm rms_norm fwd+bwd 48x128",
                "attention padding overhead", "MFU", "no host sync", "recompilations", "padded SDPA",
                "padding-free + Liger"]
    for fragment in expected:
        assert any(fragment in name for name in names), (fragment, names)
    for t in report.targets:
        assert t.status in ("PASS", "FAIL", "n/a")
        if t.status != "n/a":
            assert math.isfinite(t.measured), t
    # CPU measurements that must exist even in smoke mode (kernels through the interpreter, the step on CPU).
    measured = {t.name for t in report.targets if t.status != "n/a"}
    for fragment in ("masked 50%", "time / matmul floor", "vs eager", "speed vs torch.compile", "q/k norm",
                     "attention padding overhead", "MFU", "recompilations", "padded SDPA"):
        assert any(fragment in name for name in measured), fragment
    assert next(t for t in report.targets if t.name.startswith("GPU tests")).status == "PASS"  # collected

    data = json.loads((tmp_path / "gpu_proof.json").read_text())
    (entry,) = data.values()
    env = entry["environment"]
    assert env["torch"] and env["date"] and "git_commit" in env and env["device"].startswith("cpu")
    assert [t["name"] for t in entry["targets"]] == names
    assert set(entry["seconds"]) == {"gpu_tests", "cross_entropy", "linear_cross_entropy", "rms_norm", "attention",
                                     "train_step"}
    torch._dynamo.reset()  # the smoke run compiled the references (backend "eager"): leave no state behind
