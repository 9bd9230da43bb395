"""What a run reports: progress bar, OUT/metrics.jsonl, TensorBoard, a loss-curve PNG and the end-of-run report;
and the measured matmul peak that MFU is divided by (the trainer's and bench/'s, one function).

Sits beside the trainer loop (`fastsft.train.trainer`): the loop hands host numbers (already read from the device
once per logging interval) to `RunLogger.log`, which appends one JSON object per call to OUT/metrics.jsonl, updates
the tqdm bar's postfix, and mirrors scalars to TensorBoard when it is installed. Only rank 0 logs.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def peak_matmul_flops(device: torch.device | str = "cuda", n: int = 8192) -> float:
    """Measured dense bf16 matmul rate of a GPU in FLOP/s: the denominator of MFU in the trainer's log and in
    bench/ (median time of an n x n x n matmul on random data, triton.testing.do_bench after warm-up)."""
    import triton.testing

    with torch.cuda.device(torch.device(device)):
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        ms = float(triton.testing.do_bench(lambda: a @ b, warmup=25, rep=100, return_mode="median"))
    return 2 * n**3 / (ms * 1e-3)


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl (a truncated last line from a crash is skipped)."""
    records = []
    path = Path(path)
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _drop_rows_after(path: Path, step: int) -> None:
    """Keep only the records of steps <= `step` (the checkpoint a run resumes from; 0 for a fresh start): rows
    logged after it were of steps trained again now, so each step appears once. Rewritten atomically."""
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path) if isinstance(r.get("step"), int) and r["step"] <= step and step > 0]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    tmp.replace(path)


class RunLogger:
    """Progress bar + metrics.jsonl + optional TensorBoard for one run (create only on rank 0). metrics.jsonl keeps
    the rows up to `start_step`, the step a resumed run continues from."""

    def __init__(
        self,
        out_dir: str | Path,
        total_steps: int,
        start_step: int = 0,
        progress_bar: bool = True,
        tensorboard: bool = True,
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        _drop_rows_after(self.metrics_path, start_step)
        self._file = open(self.metrics_path, "a", encoding="utf-8")
        self.total_steps = total_steps
        self.bar = None
        if progress_bar:
            from tqdm.auto import tqdm

            # Redrawn at most every 5 s when stderr is a log file rather than a terminal.
            interval = 0.1 if sys.stderr.isatty() else 5.0
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=interval)
        self.tb = _open_tensorboard(self.out_dir / "tensorboard") if tensorboard else None
        self._last_step = start_step

    def log(self, record: dict) -> None:
        """Append one record (must hold "step"); scalars also go to TensorBoard, a few to the bar's postfix."""
        record = {"time": round(time.time(), 3), **record}
        self._file.write(json.dumps(record, sort_keys=False) + "\n")
        self._file.flush()
        step = int(record["step"])
        if self.tb is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key, value, step)
        if self.bar is not None:
            self.bar.set_postfix_str(_postfix(record), refresh=False)

    def advance(self, step: int) -> None:
        if self.bar is not None and step > self._last_step:
            self.bar.update(step - self._last_step)
        self._last_step = step

    def write(self, text: str) -> None:
        """Print a line without breaking the progress bar."""
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if not self._file.closed:
            self._file.close()


def _postfix(record: dict) -> str:
    parts = []
    for key, label, fmt in (
        ("loss", "loss", "{:.4f}"),
        ("val_loss", "val", "{:.4f}"),
        ("lr", "lr", "{:.2e}"),
        ("tokens_per_s", "tok/s", "{:,.0f}"),
        ("mfu", "mfu", "{:.1%}"),
    ):
        value = record.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            parts.append(f"{label}={fmt.format(value)}")
    return " ".join(parts)


def _open_tensorboard(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: the JSONL file is the record
        return None
    return SummaryWriter(log_dir=str(log_dir))


def plot_loss_curve(metrics_path: str | Path, png_path: str | Path) -> Path | None:
    """Training and validation loss against step as a PNG; None when matplotlib is missing or there is nothing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    records = read_metrics(metrics_path)
    train = sorted({r["step"]: r["loss"] for r in records if isinstance(r.get("loss"), (int, float))}.items())
    val = sorted({r["step"]: r["val_loss"] for r in records if isinstance(r.get("val_loss"), (int, float))}.items())
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if val:
        ax.plot(*zip(*val, strict=True), marker="o", label="val loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per supervised token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return Path(png_path)


def strip_samples(result: dict | None) -> dict | None:
    return None if result is None else {k: v for k, v in result.items() if k != "samples"}


def format_report(summary: dict) -> str:
    """The end-of-run report: held-out metrics before and after training, time, where things are."""
    lines = [f"done: {summary['steps']}/{summary['total_steps']} steps in {format_duration(summary['train_time_s'])} "
             f"of training, {summary['tokens_seen']:,} tokens"]
    if summary["stop_reason"]:
        lines.append(f"  ({summary['stop_reason']})")
    before, after = summary["initial_eval"] or {}, summary["final_eval"] or {}
    rows = [("held-out loss", "val_loss", "{:.4f}"), ("token accuracy", "val_token_accuracy", "{:.1%}"),
            ("exact match (greedy)", "exact_match", "{:.1%}")]
    shown = [(label, key, fmt) for label, key, fmt in rows if key in before or key in after]
    if shown:
        # An evaluation older than the last step (a stopped run) is labelled with its step, not "after".
        after_label = "after" if after.get("step", summary["steps"]) == summary["steps"] else f"step {after['step']}"
        lines.append(f"  {'':22s} {'before':>10s} {after_label:>10s}")
        for label, key, fmt in shown:
            b = fmt.format(before[key]) if key in before else "-"
            a = fmt.format(after[key]) if key in after else "-"
            lines.append(f"  {label:22s} {b:>10s} {a:>10s}")
    if summary["nonfinite_steps"]:
        lines.append(f"  steps skipped for a non-finite loss: {summary['nonfinite_steps']}")
    if summary["best_checkpoint"]:
        lines.append(f"  best checkpoint (val loss {summary['best_val_loss']:.4f}): {summary['best_checkpoint']}")
    if summary["checkpoint"]:
        lines.append(f"  last checkpoint: {summary['checkpoint']}")
        lines.append(f"  export: fastsft export --checkpoint {summary['checkpoint']} --out {summary['output_dir']}/hf")
    return "\n".join(lines)
