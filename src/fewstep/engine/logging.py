"""Run logging (rank 0 only): ``metrics.jsonl``, TensorBoard, and a progress line.

* ``RUN/metrics.jsonl`` — one JSON record per logged step: ``{"step": 10, "stage": "main",
  "loss/student": …, "loss/student/flow/mse": …, "grad_norm/student": …, "lr/student": …}``.
  On resume, records after the checkpoint's step are dropped so the file reads as one run.
* ``RUN/tb/`` — the same scalars and sample frame strips (TensorBoard ``purge_step`` discards
  events after a resume point).
* progress — on a terminal, a rich bar moved after every step: ``step k/N ETA h:mm:ss``, the
  bar, the latest losses; otherwise a plain line per logged step, ``ETA h:mm:ss | step k/N
  [stage] loss/…``, plus one after the first step when that is not a logged one
  (``ETA h:mm:ss (rate) | step 1/N``). The ETA comes from the time per step so far, from the
  first step on. Both stay within the terminal width (``shutil.get_terminal_size``; 80 columns
  when stdout is not a terminal): the losses are cut, never the position or the ETA. Messages
  (``HEALTH: …``, skipped steps) get their own line; while a health issue is active the
  progress line ends in ``| HEALTH: <kinds>`` (kept when the losses are cut).

Other ranks get a :class:`NullLogger`, so the trainer never asks which rank it is on to log.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from ..utils.progress import Eta, RichLines, fit_line


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
        self.eta = Eta(start_step)  # restarted by start_clock() when the first step begins
        self._timed = False  # a plain line with an ETA has been printed
        self.lines: RichLines | None = None
        if sys.stdout.isatty():
            self.lines = RichLines()
            self.task = self.lines.add(total_steps, start_step, self._head(start_step))
            self.lines.start()

    # -- progress -----------------------------------------------------------------------------
    def start_clock(self, step: int) -> None:
        """Time the ETA from now, at ``step`` steps done (call it right before the first step)."""
        self.eta.restart(step)

    def _head(self, step: int) -> str:
        return f"step {step}/{self.total} {self.eta.text(step, self.total)}"

    def tick(self, step: int) -> None:
        """After every step: move the bar and its ETA; without a terminal, print the first ETA at
        once (``ETA … | step k/N``) if the first step was not a logged one."""
        if self.lines is not None:
            self.lines.update(self.task, step, self._head(step))
        elif not self._timed and step > self.eta.done0:
            self._timed = True
            print(fit_line(f"{self.eta.text(step, self.total, rate=True)} | step {step}/{self.total}"), flush=True)

    def progress(self, step: int, record: dict) -> None:
        """The progress line of a logged step: position and ETA first, then the losses (cut to the
        terminal width), then ``| HEALTH: <kinds>`` while a health issue is active."""
        losses = " ".join(f"{k}={_fmt(v)}" for k, v in record.items()
                          if k.startswith("loss/") and k.count("/") == 1)
        health = f" | HEALTH: {record['health']}" if record.get("health") else ""
        if self.lines is not None:
            self.lines.update(self.task, step, self._head(step), losses, health)
        else:
            self._timed = self._timed or step > self.eta.done0
            head = f"{self.eta.text(step, self.total)} | step {step}/{self.total} [{record.get('stage', '')}]"
            print(fit_line(head, losses, health), flush=True)

    def message(self, text: str) -> None:
        if self.lines is not None:
            self.lines.console.print(text, markup=False, highlight=False, soft_wrap=True)
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
        if self.lines is not None:
            self.lines.stop()
        self.metrics.close()
        if self.tb is not None:
            self.tb.close()


class NullLogger:
    """What ranks other than 0 log with: nothing."""

    def start_clock(self, step): pass
    def tick(self, step): pass
    def progress(self, step, record): pass
    def message(self, text): pass
    def log(self, step, record): pass
    def frames(self, tag, videos, step): pass
    def close(self): pass
