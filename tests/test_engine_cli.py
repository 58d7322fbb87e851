"""`fewstep distill` end to end: a finetune run's outputs, dry-run, and bad input (one line, exit 2,
nothing written or overwritten)."""

from __future__ import annotations

import json

import pytest
import yaml

from fewstep.engine.checkpoint import read_checkpoint
from fewstep.models.pipeline import VideoPipeline
from helpers import cli, losses, sets, tensors


@pytest.fixture(scope="module")
def base_run(teacher_dir, tmp_path_factory):
    """A 4-step finetune run with a checkpoint at step 2, an evaluation and TensorBoard."""
    run = tmp_path_factory.mktemp("cli") / "run"
    from fewstep.cli import main

    rc = main(["distill", "--recipe", "finetune", "--out", str(run),
               *sets(teacher_dir, "train.checkpoint_every=2", "train.eval_every=4", "train.tensorboard=true")])
    assert rc == 0
    return run


def snapshot(directory):
    """Every file under ``directory`` with its bytes (to prove nothing changed)."""
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_run_outputs(base_run):
    assert json.loads((base_run / "run.json").read_text())["recipe"] == "finetune"
    cfg = yaml.safe_load((base_run / "config.yaml").read_text())
    assert cfg["train"]["steps"] == 4 and cfg["roles"]["student"]["ema"] == 0.999
    assert sorted(losses(base_run)) == [1, 2, 3, 4]
    assert sorted(p.name for p in (base_run / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
    data = read_checkpoint(base_run / "checkpoints" / "step_000004")
    assert data.trainer["step"] == 4 and data.trainer["data_position"] == 16
    assert {"roles/student", "ema/student", "optim/student"} <= set(data.tensors)
    assert any((base_run / "tb").iterdir())
    report = json.loads((base_run / "evals" / "step_000004.json").read_text())
    assert {"quality", "semantic", "total", "diversity"} <= set(report["results"]["2"]["scores"])
    # RUN/student is a loadable model holding the EMA weights
    student = VideoPipeline.load(base_run / "student")
    ema = tensors(base_run, 4, "ema/student")
    for name, value in student.denoiser.state_dict().items():
        assert (value == ema[name]).all(), name
    assert not (value == tensors(base_run, 4)[name]).all()


def test_dry_run_prints_config_and_writes_nothing(teacher_dir, tmp_path, capsys):
    rc, out, _ = cli(capsys, "distill", "--recipe", "finetune", "--out", tmp_path / "run", "--dry-run",
                     *sets(teacher_dir, "train.seed=7"))
    assert rc == 0
    cfg = yaml.safe_load(out)
    assert cfg["train"]["seed"] == 7 and cfg["stages"]["finetune"]["objectives"]["flow"]["kind"] == "flow_matching"
    assert cfg["stages"]["finetune"]["objectives"]["flow"]["timesteps"] == {"kind": "logit_normal", "mean": 0.0,
                                                                             "std": 1.0}
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override,message", [
    ("train.stepz=3", "unknown config key 'train.stepz'"),
    ("train.steps=many", "config key 'train.steps': Input should be a valid integer"),
    ("stages.finetune.objectives.flow.timestepz=1", "unknown config key 'stages.finetune.objectives.flow.timestepz'"),
    ("stages.finetune.objectives.flow.kind=flow_matchin", "unknown objective 'flow_matchin'"),
    ("stages.finetune.objectives.flow.role=fake_score", "uses role 'fake_score', which is not declared"),
    ("stages.finetune.objectives.flow.role=critic", "uses role 'critic', which is not declared under roles"),
    ("stages.finetune.objectives.flow.role=Critic", "config key 'stages.finetune.objectives.flow.role': String should "
                                                   "match pattern"),
    ("roles.student.every=0", "config key 'roles.student.every': Input should be greater than or equal to 1"),
    ("stages.finetune.every.student=0", "config key 'stages.finetune.every.student': Input should be greater"),
    ("stages.finetune.every.fake_score=2", "role 'fake_score' is not declared under roles"),
    ("roles.discriminator.optim.lr=1e-4", "role 'discriminator' has an optimizer but no objective updates it"),
    ("roles.teacher.optim.lr=1e-4", "the teacher is frozen"),
    ("train.grad_accum=3", "train.batch_size"),
])
def test_bad_config_is_one_line_exit_2(teacher_dir, tmp_path, capsys, override, message):
    rc, _, err = cli(capsys, "distill", "--recipe", "finetune", "--out", tmp_path / "run",
                     *sets(teacher_dir, override))
    assert rc == 2
    assert message in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_unknown_recipe_and_missing_model(teacher_dir, tmp_path, capsys):
    rc, _, err = cli(capsys, "distill", "--recipe", "nope", "--out", tmp_path / "run")
    assert rc == 2 and "unknown recipe 'nope'" in err
    rc, _, err = cli(capsys, "distill", "--recipe", "finetune", "--out", tmp_path / "run",
                     *sets(teacher_dir, f"model={tmp_path / 'missing'}"))
    assert rc == 2 and "not a shipped model" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_out_holding_another_run(base_run, teacher_dir, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    before = snapshot(run)
    rc, _, err = cli(capsys, "distill", "--recipe", "finetune", "--out", run, *sets(teacher_dir))
    assert rc == 2 and "already holds a 'finetune' run" in err and err.count("\n") == 1
    assert snapshot(run) == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    rc, _, err = cli(capsys, "distill", "--recipe", "finetune", "--out", tmp_path / "other", "--overwrite",
                     *sets(teacher_dir))
    assert rc == 2 and "not a fewstep run" in err
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    (run / "my_plot.png").write_bytes(b"mine")  # the user's file in a run directory survives --overwrite
    rc, _, _ = cli(capsys, "distill", "--recipe", "finetune", "--out", run, "--overwrite",
                   *sets(teacher_dir, "train.steps=1"))
    assert rc == 0 and sorted(losses(run)) == [1]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000001"]
    assert (run / "my_plot.png").read_bytes() == b"mine"


def test_resume_from_another_recipes_run(base_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    data = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**data, "recipe": "dollar"}))
    before = snapshot(run)
    rc, _, err = cli(capsys, "distill", "--recipe", "finetune", "--resume", run)
    assert rc == 2 and "that is a 'dollar' run; it cannot continue as recipe 'finetune'" in err
    assert snapshot(run) == before
    rc, _, err = cli(capsys, "distill", "--resume", tmp_path / "nowhere")
    assert rc == 2 and "not a fewstep run directory" in err


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest"])
def test_corrupt_checkpoint(base_run, tmp_path, capsys, damage):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    latest = run / "checkpoints" / "step_000004"
    weights = latest / "roles" / "student.safetensors"
    blob = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(blob[: len(blob) // 2])
    elif damage == "flip":
        weights.write_bytes(blob[:-1] + bytes([blob[-1] ^ 0xFF]))
    else:
        (latest / "manifest.json").write_text("{not json")
    before = snapshot(run)
    rc, _, err = cli(capsys, "distill", "--resume", run, "--set", "train.steps=6")
    assert rc == 2 and "checkpoint" in err and "corrupt" in err and err.count("\n") == 1, err
    assert snapshot(run) == before
