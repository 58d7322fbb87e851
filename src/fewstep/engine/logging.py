"""Run logging (rank 0 only): ``metrics.jsonl``, TensorBoard, and a progress line.

* ``RUN/metrics.jsonl`` — one JSON record per logged step: ``{"step": 10, "stage": "main",
  "loss/student": …, "loss/student/flow/mse": …, "grad_norm/student": …, "lr/student": …}``.
  On resume, records after the checkpoint's step are dropped so the file reads as one run.
* ``RUN/tb/`` — the same scalars and sample frame strips (TensorBoard ``purge_step`` discards
  events after a resume point).
* progress — a rich progress bar (step, losses, ETA) on a terminal; plain lines otherwise.
  Messages (``HEALTH: …``, skipped steps) get their own line; while a health issue is active
  the progress line ends in ``| HEALTH: <kinds>``.

Other ranks get a :class:`NullLogger`, so the trainer never asks which rank it is on to log.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np


def _fmt(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only the records of steps ``<= last_step``."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
        except ValueError:  # a line cut by a crash
            break
    path.write_text("".join(f"{line}\n" for line in keep))


class RunLogger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.total, self.start_step = total_steps, start_step
        truncate_metrics(self.run_dir / "metrics.jsonl", start_step)
        self.metrics = open(self.run_dir / "metrics.jsonl", "a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step + 1)
        self.t0 = time.perf_counter()
        self.bar = None
        if sys.stdout.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self.task = self.bar.add_task("train", total=total_steps, completed=start_step, info="")
            self.bar.start()

    # -- progress -----------------------------------------------------------------------------
    def _eta(self, step: int) -> str:
        done = step - self.start_step
        if done <= 0:
            return "?"
        rate = done / (time.perf_counter() - self.t0)
        secs = int((self.total - step) / rate)
        return f"{rate:.2f} it/s, ETA {secs // 3600}:{secs // 60 % 60:02d}:{secs % 60:02d}"

    def progress(self, step: int, record: dict) -> None:
        losses = " ".join(f"{k}={_fmt(v)}" for k, v in record.items()
                          if k.startswith("loss/") and k.count("/") == 1)
        if record.get("health"):
            losses += f" | HEALTH: {record['health']}"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=losses)
        else:
            print(f"step {step}/{self.total} [{record.get('stage', '')}] {losses} | {self._eta(step)}", flush=True)

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text)
        else:
            print(text, flush=True)

    # -- records -------------------------------------------------------------------------------
    def log(self, step: int, record: dict) -> None:
        """Append ``record`` (scalars) for ``step`` to metrics.jsonl and TensorBoard."""
        self.metrics.write(json.dumps({"step": step, **record}) + "\n")
        self.metrics.flush()
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(key, value, step)

    def frames(self, tag: str, videos: np.ndarray, step: int) -> None:
        """Sample videos ``(n, T, H, W, 3)`` uint8 as one image per sample: its frames side by side."""
        if self.tb is None:
            return
        strips = np.concatenate(list(np.moveaxis(videos, 1, 0)), axis=2)  # (n, H, T·W, 3)
        self.tb.add_images(tag, strips, step, dataformats="NHWC")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        self.metrics.close()
        if self.tb is not None:
            self.tb.close()


class NullLogger:
    """What ranks other than 0 log with: nothing."""

    def progress(self, step, record): pass
    def message(self, text): pass
    def log(self, step, record): pass
    def frames(self, tag, videos, step): pass
    def close(self): pass
