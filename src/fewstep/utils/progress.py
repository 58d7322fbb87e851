"""Progress display for long jobs: a rich progress bar on a TTY, plain lines otherwise."""

from __future__ import annotations

import sys
import time


class StageProgress:
    """``progress(stage, step, total, metrics)`` callback with one bar (or line stream) per stage.

    On a terminal it shows a rich bar with step/total, ETA and the latest metrics; when stdout
    is not a TTY (CI, logs) it prints a plain line at most every ``every_seconds``.
    """

    def __init__(self, every_seconds: float = 10.0):
        self.tty = sys.stdout.isatty()
        self.every = every_seconds
        self._bar = None
        self._tasks: dict[str, int] = {}
        self._last = 0.0

    def __enter__(self):
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
            self._bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def __call__(self, stage: str, step: int, total: int, metrics: dict) -> None:
        info = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        if self._bar is not None:
            if stage not in self._tasks:
                self._tasks[stage] = self._bar.add_task(stage, total=total, info="")
            self._bar.update(self._tasks[stage], completed=step, info=info)
            return
        now = time.monotonic()
        if now - self._last >= self.every or step == total:
            self._last = now
            print(f"[{stage}] {step}/{total} {info}", flush=True)
