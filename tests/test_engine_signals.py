"""Ctrl-C (SIGINT) and SIGTERM stop a run after its current step with a checkpoint, the
``--resume`` command and exit code 130 / 143, and the resumed run is bit-identical to an
uninterrupted one; ``run.json`` says which step ``RUN/student`` holds; the progress line shows an
ETA from the first step and fits the terminal."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fewstep.engine.checkpoint import list_checkpoints, read_checkpoint
from fewstep.engine.rundir import describe_student, student_record
from fewstep.engine.trainer import SIGNAL_ENV, Trainer, TrainingInterrupted
from helpers import RUN, STEPS, assert_same_end, cli, cli_subprocess, losses, sets, trainer_state


def student_of(run) -> dict | None:
    return json.loads((run / "run.json").read_text()).get("student")


# ------------------------------------------------------------------------------------------------
# SIGTERM / SIGINT
# ------------------------------------------------------------------------------------------------

def test_sigterm_checkpoints_then_resume_is_exact(reference_run, teacher_dir, tmp_path, capsys):
    run = tmp_path / "run"
    # SIGTERM arrives while step 4 runs; no periodic checkpoints, so step 4's is the signal's
    env = {**os.environ, SIGNAL_ENV: "4:SIGTERM"}
    proc = cli_subprocess("distill", "--recipe", "finetune", "--out", run,
                          *sets(teacher_dir, *RUN, "train.checkpoint_every=0"), env=env)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert [step for step, _ in list_checkpoints(run)] == [4]  # the step in progress was finished
    assert read_checkpoint(run / "checkpoints" / "step_000004").trainer["step"] == 4
    assert sorted(losses(run)) == [1, 2, 3, 4]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: training interrupted by SIGTERM after step 4 of 6")
    assert str(run / "checkpoints" / "step_000004") in error
    assert error.endswith(f"continue with: fewstep distill --resume {run}")
    assert f"continue training with: fewstep distill --resume {run}" in proc.stdout
    # RUN/student holds step 4 and says so
    assert student_of(run) == {"step": 4, "of": STEPS}
    assert f"student: {run / 'student'} holds step 4 of 6 (partly trained)" in proc.stdout
    assert f"fewstep eval --model {run / 'student'} --out " in proc.stdout

    rc, out, err = cli(capsys, "distill", "--resume", run)
    assert rc == 0, err
    assert student_of(run) == {"step": STEPS, "of": STEPS}
    assert f"student: {run / 'student'} holds step 6 of 6 (fully trained)" in out
    assert_same_end(run, reference_run)  # weights, optimizer, EMA, update counts and every loss


def test_sigint_from_outside_twice(teacher_dir, tmp_path):
    """A real Ctrl-C mid-run (pressed twice): exit 130, one complete checkpoint of the step it
    stopped at, and --resume named."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "fewstep.cli", "distill", "--recipe", "finetune", "--out", str(run),
           *sets(teacher_dir, "train.steps=5000")]
    # SIGINT as a terminal would deliver it (a shell may have started us with it ignored)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        metrics = run / "metrics.jsonl"
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGINT)  # impatient: ignored, the first one is being handled
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    (step, path), = list_checkpoints(run)
    assert 3 <= step < 5000 and read_checkpoint(path).trainer["step"] == step  # complete and verified
    assert max(losses(run)) == step  # it stopped right after the step it was in
    assert not any(p.name.startswith(".tmp") for p in (run / "checkpoints").iterdir())
    assert "SIGINT received: finishing the current step" in err
    assert f"error: training interrupted by SIGINT after step {step} of 5000" in err
    assert err.rstrip().endswith(f"--resume {run}")
    assert student_of(run) == {"step": step, "of": 5000}


def test_sigint_then_more_signals_while_saving(teacher_dir, tmp_path, capsys, monkeypatch):
    """In-process (as a notebook or the demo would call it): Ctrl-C, then Ctrl-C and SIGTERM while
    the checkpoint is written — ignored; exit code 130; the caller's handlers are back afterwards."""
    from fewstep.engine import trainer as trainer_module

    write = trainer_module.ckpt.write_checkpoint

    def impatient_write(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        return write(*args, **kwargs)

    monkeypatch.setattr(trainer_module.ckpt, "write_checkpoint", impatient_write)
    monkeypatch.setenv(SIGNAL_ENV, "2:SIGINT")
    # a caller with Python's own Ctrl-C handler (a job started in the background, as CI may be,
    # inherits SIGINT ignored, which the trainer rightly leaves ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    run = tmp_path / "run"
    try:
        rc, out, err = cli(capsys, "distill", "--recipe", "finetune", "--out", run, *sets(teacher_dir))
        assert rc == 130, err
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    finally:
        signal.signal(signal.SIGINT, previous)
    assert [step for step, _ in list_checkpoints(run)] == [2]
    assert read_checkpoint(run / "checkpoints" / "step_000002").trainer["step"] == 2
    assert err.startswith("error: training interrupted by SIGINT after step 2 of 4")
    assert TrainingInterrupted("x", signal.SIGTERM).exit_code == 143
    assert TrainingInterrupted("x", signal.SIGINT).exit_code == 130


def test_signal_during_the_last_step_just_finishes(teacher_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(SIGNAL_ENV, "4:SIGTERM")
    rc, out, err = cli(capsys, "distill", "--recipe", "finetune", "--out", tmp_path / "run", *sets(teacher_dir))
    assert rc == 0, err
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [4]
    assert "done: step 4 of 4" in out


def test_torchrun_ranks_stop_at_the_same_step(teacher_dir, tmp_path):
    """Only rank 1 gets SIGTERM: both ranks agree to stop after the same step and checkpoint it."""
    run = tmp_path / "run"
    env = {**os.environ, SIGNAL_ENV: "2:SIGTERM:1"}
    proc = cli_subprocess("distill", "--recipe", "finetune", "--out", run,
                          *sets(teacher_dir, "train.distributed=ddp"), env=env,
                          launcher=("-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"))
    assert proc.returncode != 0
    assert [step for step, _ in list_checkpoints(run)] == [2], proc.stderr[-3000:]
    assert trainer_state(run, 2)["world_size"] == 2
    assert sorted(losses(run)) == [1, 2]
    assert "training interrupted by SIGTERM after step 2 of 4" in proc.stderr
    assert f"torchrun --nproc_per_node=2 -m fewstep.cli distill --resume {run}" in proc.stderr


# ------------------------------------------------------------------------------------------------
# run.json: which step RUN/student holds
# ------------------------------------------------------------------------------------------------

def test_run_json_records_the_students_step(teacher_dir, tmp_path, capsys, monkeypatch):
    run, other = tmp_path / "run", tmp_path / "other"
    seen = []  # what run.json / student_record say when each step starts
    step = Trainer.train_step

    def spy(self, batch=None):
        seen.append((self.state.step, student_record(self.run_dir / "student")))
        return step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", spy)
    rc, out, err = cli(capsys, "distill", "--recipe", "finetune", "--out", run,
                       *sets(teacher_dir, "train.checkpoint_every=2"))
    assert rc == 0, err
    # exported at the start (step 0), then with every checkpoint
    assert seen == [(0, {"step": 0, "of": 4}), (1, {"step": 0, "of": 4}), (2, {"step": 2, "of": 4}),
                    (3, {"step": 2, "of": 4})]
    assert student_of(run) == {"step": 4, "of": 4} and student_record(run / "student")["step"] == 4
    assert f"student: {run / 'student'} holds step 4 of 4 (fully trained)" in out
    assert student_record(teacher_dir) is None  # not a run's student
    assert describe_student({"step": 0, "of": 400}) == "step 0 of 400 (untrained: the initial weights)"

    # resuming in place keeps the record; a longer run updates "of", then the step
    seen.clear()
    rc, _, err = cli(capsys, "distill", "--resume", run, "--set", "train.steps=6")
    assert rc == 0, err
    assert seen[0] == (4, {"step": 4, "of": 4}) and student_of(run) == {"step": 6, "of": 6}
    # resuming into another directory exports the checkpoint's student there at once
    seen.clear()
    rc, _, err = cli(capsys, "distill", "--resume", run, "--out", other, "--set", "train.steps=7")
    assert rc == 0, err
    assert seen[0] == (6, {"step": 6, "of": 7}) and student_of(other) == {"step": 7, "of": 7}


# ------------------------------------------------------------------------------------------------
# progress: ETA from the first step, within the terminal width
# ------------------------------------------------------------------------------------------------

LOSSES = {f"loss/{name}": 0.123456 for name in ("student", "fake_score", "discriminator", "critic", "reward")}


@pytest.mark.parametrize("columns", [80, 60])
def test_progress_line_eta_first_and_fits(tmp_path, capsys, monkeypatch, columns):
    from fewstep.engine.logging import RunLogger

    monkeypatch.setenv("COLUMNS", str(columns))
    logger = RunLogger(tmp_path, 1000, 0, tensorboard=False)
    try:
        logger.start_clock(0)
        time.sleep(0.01)
        logger.tick(1)  # not a logged step: its own line, with an ETA at once
        logger.tick(2)  # only once
        logger.progress(10, {"stage": "main", **LOSSES})
        logger.progress(20, {"stage": "main", **LOSSES, "health": "low_diversity"})
    finally:
        logger.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3, lines
    assert all(len(line) <= columns for line in lines)
    assert lines[0].startswith("ETA 0:") and lines[0].endswith("| step 1/1000")
    assert "it/s" in lines[0] or "s/it" in lines[0]
    # position and ETA first, then the losses, cut (at a loss) to fit
    assert lines[1].startswith("ETA 0:") and "| step 10/1000 [main] loss/student=0.1235 " in lines[1]
    assert lines[1].endswith("…") and "loss/reward" not in lines[1]
    # an active health issue stays visible; the losses give way
    assert lines[2].startswith("ETA 0:") and "| step 20/1000 [main] " in lines[2]
    assert lines[2].endswith("HEALTH: low_diversity")
    if columns == 80:
        assert "loss/student=0.1235 … | HEALTH: low_diversity" in lines[2]


def test_stage_progress_plain_and_rich(capsys, monkeypatch):
    from rich.console import Console

    from fewstep.utils.progress import RichLines, StageProgress

    monkeypatch.setenv("COLUMNS", "80")
    with StageProgress(every_seconds=1e9) as progress:
        assert not progress.tty
        progress("eval student · 4 steps", 0, 64, {})
        progress("eval student · 4 steps", 8, 64, {f"metric_{i}": 1.5 for i in range(20)})
        progress("eval student · 4 steps", 16, 64, {})  # throttled
        progress("eval student · 4 steps", 64, 64, {})
    lines = capsys.readouterr().out.splitlines()
    # step 0 only starts the clock: the first line already has an ETA
    assert [line.split(" ETA")[0] for line in lines] == ["[eval student · 4 steps] 8/64",
                                                          "[eval student · 4 steps] 64/64"]
    assert "ETA 0:" in lines[0] and lines[0].endswith("…")
    assert all(len(line) <= 80 for line in lines)

    # the terminal form: every row within the console width, head (position, ETA) intact
    for width in (80, 50):
        buf = io.StringIO()
        console = Console(file=buf, width=width, force_terminal=True, color_system=None)
        rows = RichLines(console=console)
        task = rows.add(1000, 0, "step 0/1000 ETA ?")
        rows.update(task, 5, "step 5/1000 ETA 0:01:23", " ".join(f"{k}={v}" for k, v in LOSSES.items()),
                    " | HEALTH: low_diversity")
        rows.add(64, 3, "eval 3/64 ETA 0:00:12", "x=1")
        console.print(rows.progress.make_tasks_table(rows.progress.tasks))
        out = buf.getvalue().splitlines()
        assert len(out) == 2 and all(len(line) <= width for line in out), out
        assert out[0].startswith("step 5/1000 ETA 0:01:23") and "HEALTH: low_diversity" in out[0]
        assert out[1].startswith("eval 3/64 ETA 0:00:12")
