"""Checkpoints: atomic writes, pruning, RNG state, exact resume (stop at step k, resume, same weights as an
uninterrupted run), a kill -9 in the middle of a save, and SIGTERM writing a checkpoint before a clean exit."""

import errno
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
from helpers import assert_same_weights, final_weights, stop_after, tiny_config, tiny_overrides, write_tiny_data

from fastsft.train import checkpoint as ckpt
from fastsft.train.distributed import DistInfo
from fastsft.train.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent


def _objects(seed: int):
    """A small model and its AdamW with state (two steps taken), different for each seed."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.9))
    for _ in range(2):
        model(torch.randn(5, 4)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def _save(out, step, seed=0, write_shared=lambda d: None):
    model, optimizer = _objects(seed)
    return ckpt.save(out, step, model=model, optimizer=optimizer, rank_state={"seed": seed},
                     trainer_state={"note": seed}, write_shared=write_shared, info=DistInfo())


def _load(path):
    """Load into fresh objects (another seed, no optimizer state yet): (model, optimizer, trainer_state, rank_state)."""
    torch.manual_seed(99)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    trainer_state, rank_state = ckpt.load(path, model=model, optimizer=optimizer, info=DistInfo())
    return model, optimizer, trainer_state, rank_state


def test_save_load_list_and_prune(tmp_path):
    paths = [_save(tmp_path, step, seed=step) for step in (2, 4, 6, 8)]
    assert [p.name for p in paths] == ["checkpoint-00000002", "checkpoint-00000004", "checkpoint-00000006",
                                       "checkpoint-00000008"]
    model, optimizer, state, rank = _load(paths[1])
    ref_model, ref_optimizer = _objects(4)
    for a, b in zip(model.state_dict().values(), ref_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    got, want = optimizer.state_dict(), ref_optimizer.state_dict()
    assert got["param_groups"] == want["param_groups"]  # lr, betas, ... restored too
    for key in want["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(got["state"][key][name], want["state"][key][name])
    assert state == {"note": 4, "step": 4} and rank["seed"] == 4
    assert ckpt.verify(paths[1]) is None
    removed = ckpt.prune_checkpoints(tmp_path, keep_last=2, keep=(paths[0],))
    assert [p.name for p in removed] == ["checkpoint-00000004"]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 6, 8]
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_checkpoint_holds_no_pickle(tmp_path):
    """Every file is safetensors or JSON/YAML: nothing torch.load or pickle would open."""
    path = _save(tmp_path, 1, write_shared=lambda d: (d / "config.yaml").write_text("x: 1\n"))
    names = sorted(p.name for p in path.iterdir())
    assert names == ["checksums.json", "config.yaml", "model-index.json", "model-rank0.safetensors",
                     "state-rank0.json", "state-rank0.safetensors", "trainer_state.json"]
    for p in path.iterdir():
        head = p.read_bytes()[:2]
        assert head != b"\x80\x02" and head[:1] != b"\x80" and not p.read_bytes().startswith(b"PK"), p.name


def test_resave_same_step_replaces_it(tmp_path):
    _save(tmp_path, 5, seed=1)
    path = _save(tmp_path, 5, seed=2)
    assert _load(path)[3]["seed"] == 2
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [5]


def test_half_written_checkpoint_is_invisible_and_cleaned(tmp_path):
    good = _save(tmp_path, 3)
    half = tmp_path / f"{ckpt.TMP_PREFIX}00000006"  # what a crash mid-save leaves behind
    half.mkdir()
    (half / "model-rank0.safetensors").write_bytes(b"partial")
    broken = tmp_path / "checkpoint-00000009"  # a directory without checksums.json is not a checkpoint either
    broken.mkdir()
    (broken / "trainer_state.json").write_text("{}")
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert ckpt.remove_stale_temporaries(tmp_path) == [half]
    assert not half.exists() and good.exists()


def test_rng_state_round_trip():
    state = ckpt.capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(2))
    random.random(), np.random.rand(), torch.rand(5)  # move every generator on
    ckpt.restore_rng_state(*state)
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_corrupt_newest_checkpoint_is_skipped(tmp_path):
    """A flipped byte, a truncated file or a deleted file in the newest checkpoint: resume takes the older one and
    says why; when none verifies the error names the files."""
    old, new = _save(tmp_path, 2, seed=2), _save(tmp_path, 4, seed=4)
    said = []
    data = bytearray((new / "state-rank0.safetensors").read_bytes())
    data[-3] ^= 0x40
    (new / "state-rank0.safetensors").write_bytes(bytes(data))
    assert ckpt.find_resumable(tmp_path, DistInfo(), said.append) == old
    assert said == [f"skipping checkpoint-00000004: {new / 'state-rank0.safetensors'} does not match its SHA-256 in "
                    "checksums.json (corrupted or changed)"]
    (old / "state-rank0.json").unlink()  # deleted: "missing", not "a run with fewer ranks"
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.find_resumable(tmp_path, DistInfo(), said.append)
    message = str(info.value)
    assert f"{old / 'state-rank0.json'} is missing (listed in checksums.json)" in message
    assert str(new / "state-rank0.safetensors") in message and "fewer ranks" not in message
    with open(new / "model-rank0.safetensors", "r+b") as f:
        f.truncate(10)
    assert "has 10 bytes" in ckpt.verify(new)


_PAYLOAD = """
import os, pickle
class Boom:
    def __reduce__(self):
        return (os.system, ("touch {marker}",))
pickle.dump({{"state": Boom()}}, open("{target}", "wb"))
"""


def _plant_pickle(target: Path, marker: Path) -> None:
    """A pickle that creates `marker` if anything ever unpickles it (written by a subprocess, not imported here)."""
    subprocess.run([sys.executable, "-c", _PAYLOAD.format(marker=marker, target=target)], check=True)


def test_crafted_pickle_is_an_error_never_run(tmp_path, capsys):
    """A checkpoint's tensor file replaced by a crafted pickle (checksums updated to match), and a checkpoint of the
    older pickle format: resume and export fail with one line naming the file; the pickle never runs."""
    import hashlib
    import json

    from fastsft.cli import main

    marker = tmp_path / "pwned"
    path = _save(tmp_path / "run", 3)
    target = path / "state-rank0.safetensors"
    _plant_pickle(target, marker)
    manifest = json.loads((path / "checksums.json").read_text())
    manifest["files"][target.name] = {"bytes": target.stat().st_size,
                                      "sha256": hashlib.sha256(target.read_bytes()).hexdigest()}
    (path / "checksums.json").write_text(json.dumps(manifest))
    assert ckpt.find_resumable(tmp_path / "run", DistInfo(), print) == path  # it verifies: the checksums match
    with pytest.raises(ckpt.CheckpointError, match=f"{target}: not a readable safetensors file"):
        _load(path)
    assert not marker.exists()

    # The format before this one: model.pt / optimizer.pt pickles.
    old = tmp_path / "old" / "checkpoint-00000002"
    old.mkdir(parents=True)
    _plant_pickle(old / "optimizer.pt", marker)
    _plant_pickle(old / "model.pt", marker)
    (old / "trainer_state.json").write_text('{"step": 2}')
    with pytest.raises(ckpt.CheckpointError, match="older fastsft format"):
        ckpt.find_resumable(tmp_path / "old", DistInfo(), print)
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(tmp_path / "old"), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(old) in err and "older fastsft format" in err and "new --out" in err
    assert not marker.exists()


def test_export_skips_a_corrupt_newest_checkpoint_and_says_so(tmp_path, capsys):
    old, new = _save(tmp_path, 2, seed=2), _save(tmp_path, 4, seed=4)
    (new / "model-rank0.safetensors").write_bytes(b"garbage")
    assert ckpt.resolve(tmp_path) == old
    err = capsys.readouterr().err
    assert err == f"skipping checkpoint-00000004: {new / 'model-rank0.safetensors'} has 7 bytes, checksums.json says " \
                  f"{ckpt.read_checksums(new)['files']['model-rank0.safetensors']['bytes']} (truncated or changed)\n"
    with pytest.raises(ckpt.CheckpointError, match="has 7 bytes"):
        ckpt.resolve(new)  # a checkpoint named directly is verified, not replaced by another


def test_full_disk_removes_the_partial_checkpoint(tmp_path, monkeypatch):
    good = _save(tmp_path, 2)
    real = ckpt._save_tensors

    def full(tensors, path):
        if "state" in path.name:
            path.write_bytes(b"x")  # a partial file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path)

    monkeypatch.setattr(ckpt, "_save_tensors", full)
    with pytest.raises(ckpt.CheckpointError) as info:
        _save(tmp_path, 4)
    assert str(info.value).startswith(f"disk full at {tmp_path / (ckpt.TMP_PREFIX + '00000004')}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [good.name]


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
    first = stop_after(Trainer(cfg), 3).fit()
    assert first["steps"] == 3 and first["stop_reason"] == "stopped by SIGTERM at step 3"
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 3]
    second = Trainer(tiny_config(tmp_path, data_dir, log__save_steps=2, log__save_total_limit=5)).fit()
    assert second["steps"] == 6 and second["stop_reason"] is None
    assert_same_weights(final_weights(tmp_path), final_weights(uninterrupted))
    # The optimizer state and RNG states continued exactly too (not only the weights).
    from safetensors.torch import load_file

    a = load_file(ckpt.latest_checkpoint(tmp_path) / "state-rank0.safetensors")
    b = load_file(ckpt.latest_checkpoint(uninterrupted) / "state-rank0.safetensors")
    assert a.keys() == b.keys() and any(k.endswith("/exp_avg_sq") for k in a) and "rng/torch" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The logged loss of the resumed steps equals the uninterrupted run's.
    from fastsft.train.metrics import read_metrics

    def losses(run):
        return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}

    resumed, straight = losses(tmp_path), losses(uninterrupted)
    assert sorted(resumed) == list(range(1, 7))
    rows = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert rows == list(range(1, 7))  # each step logged once
    assert all(resumed[k] == straight[k] for k in range(1, 7))


def test_resume_always_without_checkpoint_is_an_error(tmp_path, data_dir, capsys):
    from fastsft.train.run import train

    cfg = tiny_config(tmp_path, data_dir, resume="always")
    assert train(cfg) == 1
    assert "no checkpoint in" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# Subprocesses: kill -9 during a save, SIGTERM


def _launch(out, data_dir, inject: str = "", **extra):
    """`fastsft train` in a subprocess; `inject` is Python run first in it (a test's slow-down of one function)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = ["train", *tiny_overrides(out, data_dir, **extra)]
    code = f"{inject}\nimport sys\nfrom fastsft.cli import main\nsys.exit(main({args!r}))\n"
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


# Run in the subprocess: the save of step STEP writes MARKER and sleeps once its model file is written.
SLOW_SAVE = """
import time
from pathlib import Path
from fastsft.train import checkpoint as ckpt
_real = ckpt._save_tensors
def _slow(tensors, path):
    _real(tensors, path)
    if path.parent.name == ckpt.TMP_PREFIX + "{step:08d}" and path.name.startswith("model-"):
        Path("{marker}").write_text("saving")
        time.sleep({seconds})
ckpt._save_tensors = _slow
"""


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
    out = tmp_path / "run"
    proc = _launch(out, data_dir, SLOW_SAVE.format(step=4, marker=marker, seconds=60), log__save_steps=2,
                   log__save_total_limit=5)
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
    # Steps 3 and 4 were logged before the kill and trained again from checkpoint 2: each appears once.
    from fastsft.train.metrics import read_metrics

    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_sigterm_finishes_step_and_checkpoints(tmp_path, data_dir):
    out = tmp_path / "run"
    proc = _launch(out, data_dir, train__max_steps=100000, log__save_steps=0)
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


# Run in the subprocess: the final evaluation (at step STEP) writes MARKER, then takes SECONDS.
SLOW_FINAL_EVAL = """
import time
from pathlib import Path
from fastsft.train import evaluation
_real = evaluation.Evaluator.__call__
def _slow(self, model, step):
    if step == {step}:
        Path("{marker}").write_text("evaluating")
        time.sleep({seconds})
    return _real(self, model, step)
evaluation.Evaluator.__call__ = _slow
"""


@pytest.mark.parametrize("moment", ["final_eval", "final_save"])
def test_signal_after_the_last_step_keeps_the_run(tmp_path, data_dir, moment):
    """SIGTERM during the final evaluation, or SIGINT twice during the final save (save_steps=0: the only
    checkpoint of the run): the run still ends with a complete checkpoint of its last step and exit code 0."""
    marker, out = tmp_path / "marker", tmp_path / "run"
    if moment == "final_eval":
        inject = SLOW_FINAL_EVAL.format(step=6, marker=marker, seconds=4)
    else:
        inject = SLOW_SAVE.format(step=6, marker=marker, seconds=4)
    proc = _launch(out, data_dir, inject, log__save_steps=0)
    _wait_for(marker.exists, proc)
    if moment == "final_eval":
        proc.send_signal(signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)  # a second Ctrl-C does not cut the save short either
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [6]
    assert ckpt.verify(out / "checkpoint-00000006") is None
    assert not any(p.name.startswith(ckpt.TMP_PREFIX) for p in out.iterdir())
    assert "received after the last step; the final checkpoint was written" in output


def test_second_ctrl_c_outside_a_save_stops_at_once_with_one_line(tmp_path, data_dir):
    """Ctrl-C twice during the final evaluation (not a save): exit code 130, one line, no traceback; the checkpoint
    of the last step, written before the evaluation, is intact."""
    marker, out = tmp_path / "marker", tmp_path / "run"
    proc = _launch(out, data_dir, SLOW_FINAL_EVAL.format(step=6, marker=marker, seconds=30), log__save_steps=2)
    _wait_for(marker.exists, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "Traceback" not in output
    assert "fastsft train: interrupted (second Ctrl-C): stopped without a checkpoint of the current step" in output
    assert ckpt.verify(ckpt.latest_checkpoint(out)) is None and ckpt.latest_checkpoint(out).name == "checkpoint-00000006"


def test_one_run_per_output_directory(tmp_path, data_dir):
    """A second `fastsft train` on the --out of a running one stops with one line naming the holder; once the first
    is killed (kill -9, no cleanup) the lock is free again and a new run resumes."""
    marker, out = tmp_path / "saving", tmp_path / "run"
    first = _launch(out, data_dir, SLOW_SAVE.format(step=2, marker=marker, seconds=120), log__save_steps=2)
    _wait_for(marker.exists, first)
    second = _launch(out, data_dir, log__save_steps=2)
    output, _ = second.communicate(timeout=120)
    assert second.returncode == 1, output
    lines = [line for line in output.splitlines() if "error" in line]
    assert lines == [f"fastsft train: error: {out} (--out) is in use by another process (pid {first.pid}); wait for "
                     "it to finish or use another --out"]
    assert first.poll() is None and (out / f"{ckpt.TMP_PREFIX}00000002").is_dir()  # the first run was left alone
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    first.stdout.close()
    summary = Trainer(tiny_config(out, data_dir, log__save_steps=2)).fit()
    assert summary["steps"] == 6


def test_output_directory_errors_are_one_line(tmp_path, data_dir, capsys, monkeypatch):
    """--out that is a file, or on a full disk (the checkpoint writer fails with ENOSPC): exit code 1, one line, no
    traceback, no partial checkpoint left."""
    from fastsft.train.run import train

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert train(tiny_config(blocker, data_dir)) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"fastsft train: error: output_dir={blocker} (--out): a file is in the way (not a directory); give a directory path"
    assert train(tiny_config(blocker / "sub", data_dir)) == 1
    assert "a file is in the way" in capsys.readouterr().err

    def disk_full(tensors, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ckpt, "_save_tensors", disk_full)
    out = tmp_path / "run"
    assert train(tiny_config(out, data_dir, train__max_steps=2)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"fastsft train: error: disk full at {out / (ckpt.TMP_PREFIX + '00000002')}")
    assert not any(p.name.startswith((ckpt.TMP_PREFIX, ckpt.PREFIX)) for p in out.iterdir())


def test_read_only_output_directory(tmp_path, data_dir, capsys, monkeypatch):
    from fastsft.train.run import train

    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() == 0:  # root writes into read-only directories: make the directory's creation fail as it would
        def refuse(self, *args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))

        monkeypatch.setattr(Path, "mkdir", refuse)
    try:
        assert train(tiny_config(locked / "run", data_dir)) == 1
    finally:
        monkeypatch.undo()
        locked.chmod(0o700)
    err = capsys.readouterr().err.strip()
    assert err == (f"fastsft train: error: output_dir={locked / 'run'} (--out): cannot write there (Permission denied); "
                   "choose a writable directory")
