"""The run directory: what it holds, and the checks that keep one run from clobbering another.

::

    RUN/
      run.json          {"recipe": "finetune", "fewstep": "0.1.0", "student": {"step": 500, "of": 2000}}
                        — marks the directory as a run; "student" says which engine step RUN/student
                        holds (of train.steps), updated after every export (see :func:`record_student`)
      config.yaml       the resolved config (what --dry-run prints)
      metrics.jsonl     per-step scalars            tb/      TensorBoard events
      evals/            step_XXXXXX.json reports    checkpoints/step_XXXXXX/ (see checkpoint.py)
      student/          always a loadable model: ``load_model(RUN/student)``

Every check here runs before anything is written, so a refused command changes nothing.
``--overwrite`` replaces a run by deleting only the entries above (:data:`RUN_ENTRIES`); anything
else a user put in the directory (notes, plots) stays.

``RUN/student`` is exported at step 0 (so it is loadable from the start) and with every
checkpoint; a model directory carries no training state of its own, so ``run.json`` is where a
reader learns whether a student is trained: :func:`student_record` reads
it for a model directory, :func:`describe_student` words it ("step 0 of 400 (untrained …)").
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .. import __version__
from ..errors import UserError
from ..utils.io import write_text_atomic
from .checkpoint import latest_checkpoint, remove_partial


def read_run(run_dir: Path) -> dict | None:
    """``run.json`` of a run directory, or None if ``run_dir`` holds no run."""
    try:
        return json.loads((Path(run_dir) / "run.json").read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except ValueError:
        raise UserError(f"{run_dir}/run.json is corrupt") from None


def check_resume(run_dir: Path, recipe: str | None) -> tuple[str, Path]:
    """For ``--resume RUN``: the run's recipe and its latest complete checkpoint."""
    run = read_run(run_dir)
    if run is None:
        raise UserError(f"--resume {run_dir}: not a fewstep run directory (no run.json)")
    if recipe is not None and run.get("recipe") != recipe:
        raise UserError(f"--resume {run_dir}: that is a {run.get('recipe')!r} run; it cannot continue "
                        f"as recipe {recipe!r}")
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise UserError(f"--resume {run_dir}: the run has no complete checkpoint to resume from (it ended before "
                        f"its first checkpoint was written); start it again with --out {run_dir} --overwrite")
    return run["recipe"], ckpt


def check_out(out: Path, overwrite: bool, resuming_here: bool) -> None:
    """Refuse an ``--out`` that holds another run (unless ``--overwrite``) or unrelated files."""
    out = Path(out)
    if resuming_here or not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if not any(out.iterdir()):
        return
    run = read_run(out)
    if run is None:
        raise UserError(f"--out {out} is a non-empty directory that is not a fewstep run; choose another --out")
    if not overwrite:
        raise UserError(f"--out {out} already holds a {run.get('recipe')!r} run; pass --resume {out} to continue "
                        f"it or --overwrite to replace it")


#: What a run writes in its directory (all that ``--overwrite`` deletes).
RUN_ENTRIES = ("run.json", "config.yaml", "metrics.jsonl", "tb", "evals", "checkpoints", "student")


def clear_run(out: Path) -> None:
    """Delete what a run wrote in ``out`` (:data:`RUN_ENTRIES`); run.json last, so an interrupted
    clear still reads as a run and can be cleared again."""
    for name in (*RUN_ENTRIES[1:], RUN_ENTRIES[0]):
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def init_run_dir(out: Path, recipe: str, config_yaml: str, *, overwrite: bool, resuming_here: bool) -> None:
    """Create (or, with ``overwrite``, recreate) ``out`` as a run of ``recipe`` and save its config."""
    out = Path(out)
    if overwrite and not resuming_here and read_run(out) is not None:
        clear_run(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_partial(out)
    run = {"recipe": recipe, "fewstep": __version__}
    if resuming_here and (old := read_run(out)) is not None and "student" in old:
        run["student"] = old["student"]  # RUN/student is still the one exported before
    write_text_atomic(out / "run.json", json.dumps(run) + "\n")
    write_text_atomic(out / "config.yaml", config_yaml)


def update_run(run_dir: Path, **fields) -> dict:
    """Set top-level ``fields`` of ``run_dir/run.json``, atomically (rank 0 only); returns the run."""
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    if run is None:
        raise UserError(f"{run_dir} is not a fewstep run directory (no run.json)")
    run.update(fields)
    write_text_atomic(run_dir / "run.json", json.dumps(run) + "\n")
    return run


def record_student(run_dir: Path, step: int, of: int) -> None:
    """Record in run.json that ``RUN/student`` now holds the weights of engine step ``step`` of ``of``."""
    update_run(run_dir, student={"step": int(step), "of": int(of)})


def student_record(model_dir: Path | str) -> dict | None:
    """``{"step": N, "of": total}`` for a run's ``RUN/student`` directory (from ``RUN/run.json``);
    None for any other model directory (a shipped name, a copy elsewhere, an older run)."""
    model_dir = Path(model_dir)
    if model_dir.name != "student":
        return None
    try:
        run = read_run(model_dir.parent)
    except (UserError, OSError):  # an unreadable run.json says nothing about the model
        return None
    record = run.get("student") if isinstance(run, dict) else None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        return None
    return record


def describe_student(record: dict) -> str:
    """``step 0 of 400 (untrained: the initial weights)``, ``step 120 of 400 (partly trained)``,
    ``step 400 of 400 (fully trained)`` for a :func:`student_record`."""
    step, of = record["step"], record.get("of")
    text = f"step {step}" + (f" of {of}" if isinstance(of, int) else "")
    if step == 0:
        return f"{text} (untrained: the initial weights)"
    if isinstance(of, int) and step < of:
        return f"{text} (partly trained)"
    return f"{text} (fully trained)" if isinstance(of, int) else text
