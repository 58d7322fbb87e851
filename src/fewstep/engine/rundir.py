"""The run directory: what it holds, and the checks that keep one run from clobbering another.

::

    RUN/
      run.json          {"recipe": "finetune", "fewstep": "0.1.0"} — marks the directory as a run
      config.yaml       the resolved config (what --dry-run prints)
      metrics.jsonl     per-step scalars            tb/      TensorBoard events
      evals/            step_XXXXXX.json reports    checkpoints/step_XXXXXX/ (see checkpoint.py)
      student/          always a loadable model: ``VideoPipeline.load(RUN/student)``

Every check here runs before anything is written, so a refused command changes nothing.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .. import __version__
from ..errors import UserError
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
        raise UserError(f"--resume {run_dir}: the run has no complete checkpoint to resume from")
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


def init_run_dir(out: Path, recipe: str, config_yaml: str, *, overwrite: bool, resuming_here: bool) -> None:
    """Create (or, with ``overwrite``, recreate) ``out`` as a run of ``recipe`` and save its config."""
    out = Path(out)
    if overwrite and not resuming_here and read_run(out) is not None:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_partial(out)
    _write_atomic(out / "run.json", json.dumps({"recipe": recipe, "fewstep": __version__}) + "\n")
    _write_atomic(out / "config.yaml", config_yaml)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
