"""What a run reports while it goes: progress bar, OUT/metrics.jsonl, TensorBoard, and a loss-curve PNG at the end.

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


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


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


class RunLogger:
    """Progress bar + metrics.jsonl + optional TensorBoard for one run (create only on rank 0)."""

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
    # A resumed run appends again the steps logged after its checkpoint: the last record of a step wins.
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
