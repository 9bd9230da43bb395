"""Checkpoints: atomic writes, pruning, RNG state, exact resume (stop at step k, resume, same weights as an
uninterrupted run), a kill -9 in the middle of a save, and SIGTERM writing a checkpoint before a clean exit."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_same_weights, final_weights, tiny_config, tiny_overrides, write_tiny_data

from fastsft.train import checkpoint as ckpt
from fastsft.train.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent


def _save(out, step, value):
    return ckpt.save_local(
        out, step, model_state={"w": torch.full((3,), float(value))}, optimizer_state={"s": value},
        rank_state={"r": value}, trainer_state={"note": value}, config_yaml="x: 1\n",
    )


def test_save_load_list_and_prune(tmp_path):
    paths = [_save(tmp_path, step, step * 1.5) for step in (2, 4, 6, 8)]
    assert [p.name for p in paths] == ["checkpoint-00000002", "checkpoint-00000004", "checkpoint-00000006",
                                       "checkpoint-00000008"]
    model, optim, rank, state = ckpt.load_local(paths[1])
    assert torch.equal(model["w"], torch.full((3,), 6.0)) and optim == {"s": 6.0} and rank == {"r": 6.0}
    assert state == {"note": 6.0, "step": 4}
    removed = ckpt.prune_checkpoints(tmp_path, keep_last=2, keep=(paths[0],))
    assert [p.name for p in removed] == ["checkpoint-00000004"]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 6, 8]
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_resave_same_step_replaces_it(tmp_path):
    _save(tmp_path, 5, 1.0)
    path = _save(tmp_path, 5, 2.0)
    assert ckpt.load_local(path)[1] == {"s": 2.0}
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [5]


def test_half_written_checkpoint_is_invisible_and_cleaned(tmp_path):
    good = _save(tmp_path, 3, 1.0)
    half = ckpt.begin_save(tmp_path, 6)  # what a crash mid-save leaves behind
    torch.save({"w": torch.zeros(3)}, half / "model.pt")
    broken = tmp_path / "checkpoint-00000009"  # a directory without trainer_state.json is not a checkpoint either
    broken.mkdir()
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert ckpt.remove_stale_temporaries(tmp_path) == [half]
    assert not half.exists() and good.exists()


def test_rng_state_round_trip():
    state = ckpt.capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(2))
    random.random(), np.random.rand(), torch.rand(5)  # move every generator on
    ckpt.restore_rng_state(state)
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


# ---------------------------------------------------------------------------------------------------------------------
# Exact resume through the trainer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("data")
    write_tiny_data(directory)
    return directory


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
    """A 6-step run with a checkpoint every 2 steps, never interrupted: the reference the resumed runs must match."""
    out = tmp_path_factory.mktemp("straight")
    summary = Trainer(tiny_config(out, data_dir, log__save_steps=2, log__save_total_limit=5)).fit()
    assert summary["steps"] == 6
    return out


def test_resume_is_exact(tmp_path, data_dir, uninterrupted):
    cfg = tiny_config(tmp_path, data_dir, log__save_steps=2, log__save_total_limit=5)
    first = Trainer(cfg, stop_at_step=3).fit()
    assert first["steps"] == 3 and "stop_at_step" in first["stop_reason"]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 3]
    second = Trainer(tiny_config(tmp_path, data_dir, log__save_steps=2, log__save_total_limit=5)).fit()
    assert second["steps"] == 6 and second["stop_reason"] is None
    assert_same_weights(final_weights(tmp_path), final_weights(uninterrupted))
    # The optimizer state continued exactly too (not only the weights).
    a = torch.load(ckpt.latest_checkpoint(tmp_path) / "optimizer.pt", weights_only=False)["state"]
    b = torch.load(ckpt.latest_checkpoint(uninterrupted) / "optimizer.pt", weights_only=False)["state"]
    for key in a:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a[key][name], b[key][name])
    # The logged loss of the resumed steps equals the uninterrupted run's.
    from fastsft.train.metrics import read_metrics

    def losses(run):
        return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}

    resumed, straight = losses(tmp_path), losses(uninterrupted)
    assert sorted(resumed) == list(range(1, 7))
    assert all(resumed[k] == straight[k] for k in range(1, 7))


def test_resume_always_without_checkpoint_is_an_error(tmp_path, data_dir, capsys):
    from fastsft.train.run import train

    cfg = tiny_config(tmp_path, data_dir, resume="always")
    assert train(cfg) == 1
    assert "no checkpoint in" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# Subprocesses: kill -9 during a save, SIGTERM


def _launch(out, data_dir, env_extra, **extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env_extra}
    cmd = [sys.executable, "-m", "fastsft", "train", *tiny_overrides(out, data_dir, **extra)]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(predicate, proc, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process exited early ({proc.returncode}):\n{proc.stdout.read()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"timed out:\n{proc.stdout.read()}")


def test_kill_during_save_keeps_previous_checkpoint(tmp_path, data_dir, uninterrupted):
    marker = tmp_path / "saving"
    env = {ckpt.SAVE_SLEEP_ENV: "60", ckpt.SAVE_SLEEP_ENV + "_STEP": "4", ckpt.SAVE_SLEEP_ENV + "_MARKER": str(marker)}
    out = tmp_path / "run"
    proc = _launch(out, data_dir, env, log__save_steps=2, log__save_total_limit=5)
    _wait_for(marker.exists, proc)  # the step-4 save has written model.pt and is sleeping
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2]
    assert any(p.name.startswith(ckpt.TMP_PREFIX) for p in out.iterdir())  # the half-written save
    intact = ckpt.read_trainer_state(out / "checkpoint-00000002")
    assert intact["step"] == 2
    # Resume (auto) from step 2: the stale temporary is removed and the run ends exactly like the uninterrupted one.
    summary = Trainer(tiny_config(out, data_dir, log__save_steps=2, log__save_total_limit=5)).fit()
    assert summary["steps"] == 6
    assert not any(p.name.startswith(ckpt.TMP_PREFIX) for p in out.iterdir())
    assert_same_weights(final_weights(out), final_weights(uninterrupted))


def test_sigterm_finishes_step_and_checkpoints(tmp_path, data_dir):
    out = tmp_path / "run"
    proc = _launch(out, data_dir, {}, train__max_steps=100000, log__save_steps=0)
    metrics = out / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "stopped by SIGTERM" in output and "Traceback" not in output
    saved = ckpt.latest_checkpoint(out)
    assert saved is not None
    step = ckpt.read_trainer_state(saved)["step"]
    assert 3 <= step < 100000
    assert f"checkpoint-{step:08d}" in output


def test_rerun_of_finished_run_and_resume_never(tmp_path, data_dir, uninterrupted, capsys):
    import shutil

    from fastsft.train.run import train

    shutil.copytree(uninterrupted, tmp_path / "run")
    before = final_weights(tmp_path / "run")
    summary = Trainer(tiny_config(tmp_path / "run", data_dir)).fit()  # auto-resume of a complete run: nothing to do
    assert summary["steps"] == 6
    assert "already complete" in capsys.readouterr().err
    assert_same_weights(final_weights(tmp_path / "run"), before)
    assert train(tiny_config(tmp_path / "run", data_dir, resume="never")) == 1
    assert "already holds checkpoints" in capsys.readouterr().err
