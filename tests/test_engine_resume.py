"""Exact resume: a run stopped at step k and resumed is bit-identical to an uninterrupted run —
also after a `kill -9` in the middle of writing a checkpoint."""

from __future__ import annotations

import os

from fewstep.engine.checkpoint import CRASH_ENV, list_checkpoints, read_checkpoint
from helpers import RUN, STEPS, assert_same_end, cli, cli_subprocess, losses, sets, trainer_state


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
