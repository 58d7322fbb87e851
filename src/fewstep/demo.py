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

#: Readable names of the objectives of the shipped recipes (recipes/*.yaml),
#: by objective name (the key under a stage's ``objectives:``) and by objective ``kind``.
OBJECTIVE_LABELS: dict[str, str] = {
    "vsd": "VSD / DMD (generator)", "dmd": "VSD / DMD (generator)",
    "cd": "consistency distillation",
    "fake": "fake-score denoising", "fake_score": "fake-score denoising",
    "lrm": "latent reward model fit", "lrm_fit": "latent reward model fit",
    "ft": "latent reward fine-tuning", "lrm_finetune": "latent reward fine-tuning",
    "ddpo": "DDPO (reward RL)",
    "traj": "trajectory guidance", "guidance": "trajectory guidance", "trajectory_guidance": "trajectory guidance",
    "adv_g": "adversarial (generator)", "queue_gan_generator": "adversarial (generator)",
    "adv_d": "adversarial (discriminator)", "queue_gan_discriminator": "adversarial (discriminator)",
    "flow": "flow matching", "flow_matching": "flow matching",
}
#: Term names that say nothing beyond the objective (the label then shows the objective only).
GENERIC_TERMS = frozenset({"mse", "loss", "total", "adv", "ft", "l2", "huber"})
#: Readable role names (panel titles); others show with "_" as spaces.
ROLE_LABELS: dict[str, str] = {"fake_score": "fake score", "lrm": "latent reward model"}


def loss_label(key: str) -> str:
    """A readable name for a logged loss term ``<objective>/<term>`` (or a full
    ``loss/<role>/<objective>/<term>`` key): the objective's :data:`OBJECTIVE_LABELS` name (an
    unknown ``adv…`` one reads "adversarial …"), followed by `` · <term>`` unless the term repeats
    the objective or is generic (:data:`GENERIC_TERMS`); otherwise the key with "/" as " · "."""
    parts = key.split("/")
    if key.startswith(LOSS_PREFIX) and len(parts) == 4:
        parts = parts[2:]
    objective, terms = parts[0], parts[1:]
    if terms and (terms[-1] == objective or terms[-1] in GENERIC_TERMS):
        terms = terms[:-1]
    name = OBJECTIVE_LABELS.get(objective)
    if name is None and objective.startswith("adv") and objective != "adv":
        name = "adversarial " + objective[3:].strip("_-").replace("_", " ")
    return " · ".join([name or objective, *terms])


def role_label(role: str) -> str:
    """A readable role name for a loss panel's title: ``fake_score`` → "fake score"."""
    return ROLE_LABELS.get(role, role.replace("_", " "))


def ema(values: list[float], beta: float) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard-style smoothing) of ``values``."""
    out, acc = [], 0.0
    for i, v in enumerate(values, 1):
        acc = beta * acc + (1.0 - beta) * v
        out.append(acc / (1.0 - beta ** i) if beta > 0 else v)
    return out


def loss_curves(metrics_jsonl: Path, png: Path) -> Path:
    """One panel per role with its objectives' loss terms against the step (matplotlib, Agg):
    each term as an EMA-smoothed line (span ≈ an eighth of its points) over its raw values (faint),
    named by :func:`loss_label`; with two or more terms also the role's weighted total (dashed);
    a log y axis where a panel's positive values span more than ~1.3 decades."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogFormatter

    class PlainLog(LogFormatter):  # matplotlib picks which ticks to label; they read 0.2, not 2×10⁻¹
        def _num_to_string(self, x, vmin, vmax):
            return f"{x:.2g}"
    series: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    totals: dict[str, tuple[list[int], list[float]]] = {}
    for line in metrics_jsonl.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        for key, value in row.items():
            parts = key.split("/")
            if not key.startswith(LOSS_PREFIX) or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if len(parts) == 2:
                steps, values = totals.setdefault(parts[1], ([], []))
            elif len(parts) == 4:
                steps, values = series.setdefault(parts[1], {}).setdefault("/".join(parts[2:]), ([], []))
            else:
                continue
            steps.append(row["step"])
            values.append(value)
    if not series:
        raise UserError(f"{metrics_jsonl} has no loss entries to plot")
    order = ["student", *sorted(r for r in series if r != "student")] if "student" in series else sorted(series)
    fig, axes = plt.subplots(1, len(order), figsize=(4.6 * len(order), 3.4), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, role in zip(axes[0], order):
        terms = series[role]
        lines = [(loss_label(name), terms[name], colours[i % len(colours)], "-")
                 for i, name in enumerate(sorted(terms))]
        if len(terms) > 1 and role in totals:
            lines.append(("total (weighted)", totals[role], "0.25", "--"))
        for label, (steps, values), colour, style in lines:
            beta = 1.0 - 2.0 / (max(1.0, len(values) / 8) + 1.0)
            ax.plot(steps, values, color=colour, alpha=0.22, linewidth=0.8)
            ax.plot(steps, ema(values, beta), color=colour, linestyle=style, linewidth=1.8, label=label)
        ax.set_title(role_label(role), fontsize=11)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        every = [v for _, (_, vs), _, _ in lines for v in vs]
        ax.set_yscale("log" if min(every) > 0 and max(every) > 20 * min(every) else "linear")  # log: > 1 decade
        if ax.get_yscale() == "log":
            ax.yaxis.set_major_formatter(PlainLog(labelOnlyBase=False))
            ax.yaxis.set_minor_formatter(PlainLog(labelOnlyBase=False))
            ax.tick_params(axis="y", which="minor", labelsize=8)
        ax.legend(fontsize=8, framealpha=0.85)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle("training losses (EMA-smoothed; faint: raw values)", fontsize=10, color="0.3")
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
    from .models.family import load_model
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
    teacher = load_model(model)
    student = load_model(run_dir / "student")
    few = max(student_steps)
    plan = [("teacher", teacher, teacher_steps), ("teacher_few_step", teacher, few),
            *((f"student/{n}", student, n) for n in student_steps)]
    features = VideoFeatureNet.load()
    results, metrics_by = [], {}
    eval_start = time.monotonic()
    with StageProgress(every_seconds=5.0) as progress:
        frames, height, _ = teacher.geometry
        ref = reference_stats(net=features, frames=frames, size=height)
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
