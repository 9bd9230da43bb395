"""The trainer on a GPU (skipped without CUDA): bf16 autocast with fp32 master weights, per-block torch.compile,
activation checkpointing, MFU in the logs, exact resume of a compiled bf16 run on the same device, and FSDP2 with
nccl on two GPUs when there are two."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import stop_after, tiny_config, tiny_overrides, write_tiny_data

from fastsft.train import checkpoint as ckpt
from fastsft.train.metrics import read_metrics
from fastsft.train.trainer import Trainer

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parent.parent


def _gpu_config(out, data_dir, **extra):
    options = dict(train__device="cuda", train__precision="bf16", train__torch_compile=True,
                   train__gradient_checkpointing=True, train__max_steps=8, data__seq_len=128, log__save_steps=4,
                   log__save_total_limit=3, eval__generation_samples=4)
    options.update(extra)
    return tiny_config(out, data_dir, **options)


def test_bf16_compiled_run_logs_mfu_and_learns(tmp_path):
    write_tiny_data(tmp_path / "data")
    summary = Trainer(_gpu_config(tmp_path / "run", tmp_path / "data")).fit()
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 8 and all(0 < r["mfu"] < 1 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert summary["final_eval"]["val_loss"] < 5.6  # below uniform over the byte vocabulary (ln 263)


def test_gpu_resume_matches_uninterrupted(tmp_path):
    write_tiny_data(tmp_path / "data")
    Trainer(_gpu_config(tmp_path / "a", tmp_path / "data")).fit()
    stop_after(Trainer(_gpu_config(tmp_path / "b", tmp_path / "data")), 4).fit()
    Trainer(_gpu_config(tmp_path / "b", tmp_path / "data")).fit()
    a = ckpt.load_model_state(ckpt.latest_checkpoint(tmp_path / "a"))
    b = ckpt.load_model_state(ckpt.latest_checkpoint(tmp_path / "b"))
    for name in a:  # GPU kernels may reduce in a different order between processes: close, not necessarily bitwise
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_fsdp2_nccl_two_gpus(tmp_path):
    write_tiny_data(tmp_path / "data")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "fastsft",
           "train", *tiny_overrides(tmp_path / "run", tmp_path / "data", train__device="cuda",
                                    train__precision="bf16", train__max_steps=4)]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    last = ckpt.latest_checkpoint(tmp_path / "run")
    assert (last / "model-rank1.safetensors").is_file() and ckpt.verify(last) is None
