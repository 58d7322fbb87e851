"""Shared helpers of the engine tests (no tests here): a tiny teacher on disk, CLI runs, readers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import make_tiny_pipeline
from fewstep.cli import main

#: A cheap finetune run: tiny batch, every step logged, no evaluation, TensorBoard off.
TINY = ["train.steps=4", "train.batch_size=4", "train.log_every=1", "train.eval_every=0",
        "train.checkpoint_every=0", "train.tensorboard=false", "roles.student.optim.warmup_steps=2",
        "roles.student.optim.lr=1e-3", "train.eval_steps=[2]"]


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    """A tiny random model saved as a model directory (the toy teacher's weights are never used)."""
    path = tmp_path_factory.mktemp("engine") / "teacher"
    make_tiny_pipeline().save(path)
    return path


def sets(teacher: Path, *extra: str) -> list[str]:
    """``--set`` arguments: the tiny run on ``teacher`` plus ``extra`` overrides."""
    out = []
    for item in [f"model={teacher}", *TINY, *extra]:
        out += ["--set", item]
    return out


def cli(capsys, *argv) -> tuple[int, str, str]:
    """Run ``fewstep`` in-process: exit code, stdout, stderr."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def cli_subprocess(*argv, env=None, launcher=()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *launcher, "-m", "fewstep.cli", *map(str, argv)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def losses(run_dir: Path) -> dict[int, dict[str, float]]:
    """``step → {loss/... : value}`` from metrics.jsonl (training records only)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        vals = {k: v for k, v in rec.items() if k.startswith(("loss/", "grad_norm/", "lr/"))}
        if vals:
            out[rec["step"]] = vals
    return out


def tensors(run_dir: Path, step: int, stem: str = "roles/student") -> dict:
    return load_file(Path(run_dir) / "checkpoints" / f"step_{step:06d}" / f"{stem}.safetensors")


def trainer_state(run_dir: Path, step: int) -> dict:
    return json.loads((Path(run_dir) / "checkpoints" / f"step_{step:06d}" / "trainer.json").read_text())
