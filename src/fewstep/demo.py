"""``fewstep demo`` (``make demo``): the main job on the embedded default, end to end.

1. **Distil** the shipped ``toy-teacher`` into a 4-step DOLLAR student (``fewstep distill
   --recipe dollar`` with :data:`DEMO_SETTINGS`, a CPU budget of a few minutes) → ``OUT/run``.
2. **Evaluate** (toy VBench, :mod:`fewstep.eval.runner`) the teacher at 50 Euler steps with its
   CFG, the teacher at the student's step count (the gap a student must close), and the student
   at 4, 2 and 1 steps, all on the same eval prompts, seeds and initial noise.
3. **Report**: ``OUT/report.html`` (the table, loss curves, GIFs side by side per prompt),
   ``OUT/losses.png`` and ``OUT/summary.json``::

       {"teacher": metrics (50 steps), "teacher_few_step": metrics (student steps),
        "students": {"4": metrics, "2": …, "1": …}, "seconds": {"distill": …, "eval": …, "total": …},
        "run": "OUT/run", "config": {the demo's overrides}}

Everything the demo writes is published atomically: the evaluation outputs appear in ``OUT`` only
once complete (:class:`~fewstep.utils.io.OutputDir`); the training run directory is the
engine's, with its own checkpoints.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .errors import UserError

#: The demo's budget on top of ``dollar.yaml`` (2 CPU cores, a few minutes of training).
DEMO_SETTINGS: list[str] = [
    "train.steps=400",
    "train.batch_size=8",
    "train.eval_every=0",
    "train.checkpoint_every=300",
    "train.log_every=10",
]

#: Loss series drawn in the report: ``loss/<role>/<objective>/<term>`` of ``RUN/metrics.jsonl``.
LOSS_PREFIX = "loss/"


def loss_curves(metrics_jsonl: Path, png: Path) -> Path:
    """One panel per role with its objectives' loss terms against the step (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for line in metrics_jsonl.read_text().splitlines():
        row = json.loads(line)
        for key, value in row.items():
            parts = key.split("/")
            if not key.startswith(LOSS_PREFIX) or len(parts) != 4 or not isinstance(value, (int, float)):
                continue
            steps, values = series.setdefault(parts[1], {}).setdefault("/".join(parts[2:]), ([], []))
            steps.append(row["step"])
            values.append(value)
    if not series:
        raise UserError(f"{metrics_jsonl} has no loss entries to plot")
    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.2), squeeze=False)
    for ax, (role, terms) in zip(axes[0], sorted(series.items())):
        for name, (steps, values) in sorted(terms.items()):
            ax.plot(steps, values, label=name, linewidth=1.2)
        ax.set_title(role)
        ax.set_xlabel("step")
        ax.set_yscale("log" if all(v > 0 for _, vs in terms.values() for v in vs) else "linear")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(png)
    return png


def run_demo(out: str | Path = "runs/demo", *, model: str = "toy-teacher", overrides: list[str] = (),
             teacher_steps: int = 50, student_steps: tuple[int, ...] = (4, 2, 1), num: int = 4,
             seed: int = 0, overwrite: bool = False) -> dict:
    """Distil, evaluate and report (module doc); returns the summary. A non-empty ``out`` needs
    ``overwrite`` (``make demo`` passes it); files fewstep did not write there are kept."""
    from .eval.features import VideoFeatureNet, reference_stats
    from .eval.report import write_report
    from .utils.io import OutputDir, write_json_atomic
    from .eval.runner import evaluate_with_samples
    from .models.pipeline import VideoPipeline
    from .recipes.launch import distill
    from .utils.progress import StageProgress

    out = Path(out)
    output = OutputDir(out, "demo", overwrite, ["report.html", "losses.png", "summary.json", "gifs"])
    output.check()
    settings = [f"model={model}", *DEMO_SETTINGS, *overrides]
    start = time.monotonic()
    seconds: dict[str, float] = {}

    # 1. Distil (the engine shows its own progress bar).
    run_dir = out / "run"
    distill("dollar", None, settings, run_dir, overwrite=True)
    seconds["distill"] = time.monotonic() - start

    # 2. Evaluate the teacher and the student on the same suite.
    teacher = VideoPipeline.load(model)
    student = VideoPipeline.load(run_dir / "student")
    few = max(student_steps)
    plan = [("teacher", teacher, teacher_steps), ("teacher_few_step", teacher, few),
            *((f"student/{n}", student, n) for n in student_steps)]
    features = VideoFeatureNet.load()
    results, metrics_by = [], {}
    eval_start = time.monotonic()
    with StageProgress(every_seconds=5.0) as progress:
        ref = reference_stats(net=features, frames=teacher.config.frames, size=teacher.config.size)
        for key, pipe, steps in plan:
            label = f"{'student' if pipe is student else 'teacher'} · {steps} steps"
            t0 = time.monotonic()
            metrics, videos = evaluate_with_samples(
                pipe, steps=steps, num_per_prompt=num, seed=seed, feature_net=features, ref_stats=ref,
                progress=lambda done, total, label=label: progress(f"eval {label}", done, total, {}))
            seconds[f"eval/{key}"] = time.monotonic() - t0
            metrics_by[key] = metrics
            results.append((label, metrics, videos))
    seconds["eval"] = time.monotonic() - eval_start

    # 3. Report.
    summary = {
        "teacher": metrics_by["teacher"],
        "teacher_few_step": metrics_by["teacher_few_step"],
        "students": {str(n): metrics_by[f"student/{n}"] for n in student_steps},
        "seconds": seconds,
        "run": str(run_dir),
        "config": settings,
    }
    with output as stage:
        loss_curves(run_dir / "metrics.jsonl", stage / "losses.png")
        ratio = summary["students"][str(few)]["total"] / max(summary["teacher"]["total"], 1e-12)
        headline = (f"<p>{few}-step student total / {teacher_steps}-step teacher total = {ratio:.3f}; "
                    f"NFE {summary['students'][str(few)]['nfe']} vs {summary['teacher']['nfe']}. "
                    f"Run directory: <code>{run_dir}</code>.</p>")
        write_report(stage, results, title="fewstep demo: toy teacher → 4-step DOLLAR student",
                     sections=[("Summary", headline), ("Training losses", "<img src='losses.png' alt='losses'>")])
        seconds["total"] = time.monotonic() - start
        write_json_atomic(stage / "summary.json", summary)
    return summary


def summary_table(summary: dict) -> str:
    """The demo's headline numbers as aligned text lines (printed at the end of ``fewstep demo``)."""
    rows = [("teacher", summary["teacher"]), ("teacher (few-step)", summary["teacher_few_step"]),
            *((f"student {n}-step", m) for n, m in summary["students"].items())]
    keys = ("steps", "grid", "nfe", "total", "quality", "semantic", "fvd", "vendi_pixel", "seconds_per_video")
    lines = [f"{'model':<20}" + "".join(f"{k:>18}" for k in keys)]
    for name, m in rows:
        cells = "".join(f"{m.get(k):>18.4g}" if isinstance(m.get(k), float) else f"{m.get(k, '–')!s:>18}" for k in keys)
        lines.append(f"{name:<20}{cells}")
    lines.append(f"sharpness: teacher-{summary['teacher']['steps']} "
                 f"{summary['teacher']['dimensions'].get('sharpness', np.nan):.3f}, "
                 f"teacher few-step {summary['teacher_few_step']['dimensions'].get('sharpness', np.nan):.3f}, "
                 + ", ".join(f"student-{n} {m['dimensions'].get('sharpness', np.nan):.3f}"
                             for n, m in summary["students"].items()))
    return "\n".join(lines)
