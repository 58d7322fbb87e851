"""Progress display for long jobs: a rich progress bar on a TTY, plain lines otherwise.

Both forms put what a user looks for first — where the job is (``step/total``) and when it will
be done (``ETA h:mm:ss``, estimated from the time per step so far, shown from the first
completed step on) — and keep the line within the terminal width
(``shutil.get_terminal_size().columns``, 80 when stdout is not a terminal): the metrics after
them are cut (``…``), never the position or the ETA. The helpers here are shared with the
training loop's progress line (:mod:`fewstep.engine.logging`).
"""

from __future__ import annotations

import shutil
import sys
import time

#: Columns of the rich bar when the terminal leaves room for it (the metrics get the rest).
BAR_WIDTH = 20
#: A bar narrower than this is left out (a narrow terminal keeps the text instead).
MIN_BAR_WIDTH = 6
#: The bar shrinks (and then goes) before the metrics get fewer columns than this.
MIN_INFO_WIDTH = 30


def terminal_width() -> int:
    return max(shutil.get_terminal_size().columns, 20)


def format_duration(seconds: float) -> str:
    """``h:mm:ss`` (hours unbounded)."""
    secs = max(int(round(seconds)), 0)
    return f"{secs // 3600}:{secs // 60 % 60:02d}:{secs % 60:02d}"


def format_rate(seconds_per_step: float) -> str:
    """``2.31 it/s`` for fast steps, ``4.20 s/it`` for slow ones."""
    if seconds_per_step <= 0:
        return "- it/s"
    if seconds_per_step < 1:
        return f"{1 / seconds_per_step:.2f} it/s"
    return f"{seconds_per_step:.2f} s/it"


class Eta:
    """Time left from the time per step so far, measured from the moment it is created
    (or :meth:`restart`\\ ed) at ``done0`` completed steps."""

    def __init__(self, done0: int = 0, t0: float | None = None):
        self.restart(done0, t0)

    def restart(self, done0: int = 0, t0: float | None = None) -> None:
        """Measure from ``t0`` (a ``time.perf_counter()`` value; default: now) at ``done0`` steps."""
        self.t0, self.done0 = time.perf_counter() if t0 is None else t0, done0

    def seconds_per_step(self, done: int) -> float | None:
        n = done - self.done0
        return (time.perf_counter() - self.t0) / n if n > 0 else None

    def text(self, done: int, total: int, rate: bool = False) -> str:
        """``ETA 0:01:23`` (with ``rate``: ``ETA 0:01:23 (2.31 it/s)``) once a step has completed
        since the start, ``ETA ?`` before."""
        per = self.seconds_per_step(done)
        if per is None:
            return "ETA ?"
        eta = f"ETA {format_duration(per * max(total - done, 0))}"
        return f"{eta} ({format_rate(per)})" if rate else eta


def cut(text: str, room: int) -> str:
    """``text`` shortened to at most ``room`` characters, ending in ``…`` (at a space if one is near)."""
    if len(text) <= room:
        return text
    if room <= 1:
        return "…"[:max(room, 0)]
    head = text[:room - 1]
    space = head.rfind(" ")
    if space >= room // 2:  # drop the cut-off word when that keeps most of the text
        head = head[:space + 1]
    return head + "…"


def fit_line(head: str, body: str = "", tail: str = "", width: int | None = None, sep: str = " ") -> str:
    """``head + sep + body + tail`` within ``width`` columns: ``body`` is cut first (``…``), then
    left out for ``tail`` (without its leading `` | ``), and ``head`` is cut only when it alone is
    too long."""
    width = terminal_width() if width is None else width
    if len(head) >= width:
        return cut(head, width)
    if not body and not tail:
        return head
    room = width - len(head) - len(sep)
    if len(body) + len(tail) > room:
        if tail and len(tail) > room - 2:  # no room for the body: the tail alone (e.g. a health warning)
            return head + sep + cut(tail.lstrip(" |"), room)
        body = cut(body, room - len(tail))
    return head + sep + body + tail


class RichLines:
    """A rich ``Progress`` whose rows — ``head``, a bar, ``info + tail`` — never wrap: on every
    update the bar width and each row's info are fitted to the console width (the info is cut,
    never the head; the bar is left out on a narrow terminal)."""

    def __init__(self, console=None):
        from rich.progress import BarColumn, Progress, TextColumn
        from rich.table import Column
        from rich.text import Text

        class _Bar(BarColumn):
            def render(self, task):
                return Text("") if not self.bar_width else super().render(task)

        self._barcol = _Bar(bar_width=BAR_WIDTH)
        self.progress = Progress(TextColumn("{task.fields[head]}", markup=False,
                                            table_column=Column(no_wrap=True, overflow="crop")),
                                 self._barcol,
                                 TextColumn("{task.fields[info]}", markup=False,
                                            table_column=Column(no_wrap=True, overflow="ellipsis")),
                                 console=console)
        self._rows: dict[int, tuple[str, str, str]] = {}  # task id → (head, info, tail) as given

    @property
    def console(self):
        return self.progress.console

    def start(self) -> None:
        self.progress.start()

    def stop(self) -> None:
        self.progress.stop()

    def add(self, total: int, completed: int = 0, head: str = "", info: str = "", tail: str = "") -> int:
        task = self.progress.add_task("", total=total, completed=completed, head=head, info=info + tail)
        self._rows[task] = (head, info, tail)
        self._layout()
        return task

    def update(self, task: int, completed: int, head: str, info: str | None = None, tail: str | None = None,
               total: int | None = None) -> None:
        old = self._rows[task]
        self._rows[task] = (head, old[1] if info is None else info, old[2] if tail is None else tail)
        self.progress.update(task, completed=completed, **({"total": total} if total is not None else {}))
        self._layout()

    def _layout(self) -> None:
        width = self.console.width
        head_width = max(len(h) for h, _, _ in self._rows.values())
        room = width - head_width - 2  # rich puts one space between columns
        has_info = any(i or t for _, i, t in self._rows.values())
        bar = min(BAR_WIDTH, room - MIN_INFO_WIDTH if has_info else room)  # the info comes before the bar
        bar = bar if bar >= MIN_BAR_WIDTH else 0
        self._barcol.bar_width = bar
        for task, (head, info, tail) in self._rows.items():
            self.progress.update(task, head=head, info=fit_line("", info, tail, room - bar, sep=""))


class StageProgress:
    """``progress(stage, step, total, metrics)`` callback with one bar (or line stream) per stage.

    On a terminal it shows a rich row per stage — ``stage step/total ETA …``, a bar, the latest
    metrics — within the terminal width; when stdout is not a TTY (CI, logs) it prints a plain
    line ``[stage] step/total ETA … metrics``, cut to the terminal width, at most every
    ``every_seconds`` — and at a stage's first report, at the first one with an ETA and at its
    end.

    A stage is timed from its first report (a stage may start midway, e.g. a resumed one, so
    what came before is not assumed to have been timed): report ``step`` 0 (or the step it
    resumes at) before the first batch, and the ETA shows from the first batch on.
    """

    def __init__(self, every_seconds: float = 10.0):
        self.tty = sys.stdout.isatty()
        self.every = every_seconds
        self._lines: RichLines | None = None
        self._tasks: dict[str, int] = {}
        self._etas: dict[str, Eta] = {}
        self._started: set[str] = set()  # stages with a plain line printed
        self._timed: set[str] = set()  # stages whose plain line has shown an ETA
        self._last = 0.0

    def __enter__(self):
        if self.tty:
            self._lines = RichLines()
            self._lines.start()
        return self

    def __exit__(self, *exc):
        if self._lines is not None:
            self._lines.stop()

    def _eta(self, stage: str, step: int) -> Eta:
        if stage not in self._etas:
            self._etas[stage] = Eta(step)
        return self._etas[stage]

    def __call__(self, stage: str, step: int, total: int, metrics: dict) -> None:
        info = " ".join(f"{k}={v:.4g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in metrics.items())
        eta = self._eta(stage, step)
        text = eta.text(step, total)
        if self._lines is not None:
            head = f"{stage} {step}/{total} {text}"
            if stage not in self._tasks:
                self._tasks[stage] = self._lines.add(total, step, head, info)
            else:
                self._lines.update(self._tasks[stage], step, head, info, total=total)
            return
        now = time.monotonic()
        timed = text != "ETA ?"
        if step == 0 and total > 0:  # the clock starts; nothing to say yet
            self._started.add(stage)
            return
        if (now - self._last >= self.every or step == total or stage not in self._started
                or (timed and stage not in self._timed)):
            self._started.add(stage)
            self._last = now
            if timed:
                self._timed.add(stage)
            print(fit_line(f"[{stage}] {step}/{total} {text}", info), flush=True)
