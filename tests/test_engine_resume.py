"""Exact resume: a run stopped at step k and resumed is bit-identical to an uninterrupted run —
also after a `kill -9` in the middle of writing a checkpoint."""

from __future__ import annotations

import os

import pytest
import torch

from fewstep.engine.checkpoint import CRASH_ENV, list_checkpoints, read_checkpoint
from test_engine_support import cli, cli_subprocess, losses, sets, teacher_dir, tensors, trainer_state  # noqa: F401

STEPS = 6
#: two roles with different cadence, EMA, warm-up, caption dropout: everything resume must restore
RUN = ["train.steps=6", "roles.fake_score.optim.lr=1e-3", "roles.fake_score.every=2",
       "stages.finetune.objectives.critic.kind=flow_matching", "stages.finetune.objectives.critic.role=fake_score",
       "roles.student.optim.warmup_steps=4"]


@pytest.fixture(scope="module")
def reference_run(teacher_dir, tmp_path_factory):
    """The uninterrupted run (checkpoints at 3 and 6)."""
    run = tmp_path_factory.mktemp("resume") / "reference"
    from fewstep.cli import main

    assert main(["distill", "--recipe", "finetune", "--out", str(run),
                 *sets(teacher_dir, *RUN, "train.checkpoint_every=3")]) == 0
    return run


def assert_same_end(run, reference):
    for stem in ("roles/student", "ema/student", "optim/student", "roles/fake_score", "optim/fake_score"):
        got, want = tensors(run, STEPS, stem), tensors(reference, STEPS, stem)
        assert got.keys() == want.keys(), stem
        for k in want:
            assert torch.equal(got[k], want[k]), f"{stem}:{k}"
    assert trainer_state(run, STEPS)["roles"] == trainer_state(reference, STEPS)["roles"]
    assert losses(run) == losses(reference)  # every logged loss, grad norm and LR, bit for bit


def test_stop_and_resume_is_exact(reference_run, teacher_dir, tmp_path, capsys):
    run = tmp_path / "run"
    rc, _, _ = cli(capsys, "distill", "--recipe", "finetune", "--out", run,
                   *sets(teacher_dir, *RUN, "train.steps=3"))
    assert rc == 0 and sorted(losses(run)) == [1, 2, 3]
    rc, _, err = cli(capsys, "distill", "--resume", run, "--set", f"train.steps={STEPS}")
    assert rc == 0, err
    assert trainer_state(run, STEPS)["roles"] == {"student": {"updates": 6}, "fake_score": {"updates": 3}}
    assert_same_end(run, reference_run)


def test_kill_during_checkpoint_write(reference_run, teacher_dir, tmp_path, capsys):
    run = tmp_path / "run"
    env = {**os.environ, CRASH_ENV: "4"}
    proc = cli_subprocess("distill", "--recipe", "finetune", "--out", run,
                          *sets(teacher_dir, *RUN, "train.checkpoint_every=2"), env=env)
    assert proc.returncode == 137, proc.stderr[-2000:]
    # the interrupted write left only a temporary directory; step 2 is still the latest checkpoint
    assert [step for step, _ in list_checkpoints(run)] == [2]
    assert any(p.name.startswith(".tmp-step_000004") for p in (run / "checkpoints").iterdir())
    assert read_checkpoint(run / "checkpoints" / "step_000002").trainer["step"] == 2
    rc, _, err = cli(capsys, "distill", "--resume", run)
    assert rc == 0, err
    assert not any(p.name.startswith(".tmp") for p in (run / "checkpoints").iterdir())
    assert_same_end(run, reference_run)
