"""The ``dollar`` recipe (DOLLAR Alg. 1): resolved config, switches, ablation presets, a smoke run
through the CLI, the exported few-step student, and bad input (one line, exit 2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from fewstep.diffusion.schedules import FlowMatching
from fewstep.engine.distributed import DistEnv
from fewstep.engine.trainer import Trainer
from fewstep.models.pipeline import VideoPipeline
from fewstep.objectives.student import step_times
from fewstep.recipes.base import recipe_class
from helpers import cli, losses, tensors

Dollar = recipe_class("dollar")

pytestmark = pytest.mark.usefixtures("one_thread")

#: A tiny run: batch 4, every step logged, no evaluation; the learning rates are raised for 30 steps.
TINY = ["train.batch_size=4", "train.log_every=1", "train.eval_every=0", "train.checkpoint_every=0",
        "train.tensorboard=false", "roles.student.optim.lr=1e-3", "roles.student.optim.warmup_steps=0",
        "roles.fake_score.optim.lr=3e-3", "roles.fake_score.optim.warmup_steps=0"]


def dollar_sets(teacher, *extra: str) -> list[str]:
    out = []
    for item in [f"model={teacher}", *TINY, *extra]:
        out += ["--set", item]
    return out


def dry_run(capsys, teacher, tmp_path, *extra) -> dict:
    rc, out, err = cli(capsys, "distill", "--recipe", "dollar", "--out", tmp_path / "run", "--dry-run",
                       *dollar_sets(teacher, *extra))
    assert rc == 0, err
    assert not (tmp_path / "run").exists()
    return yaml.safe_load(out)


# ------------------------------------------------------------------------------------ the config
def test_dry_run_prints_the_resolved_config(teacher_dir, tmp_path, capsys):
    cfg = dry_run(capsys, teacher_dir, tmp_path)
    assert list(cfg)[:5] == ["model", "preset", "data", "evaluator", "generator"] and cfg["preset"] == []
    assert "presets" not in cfg  # the overlays never reach the validated config
    roles = cfg["roles"]
    assert list(roles) == ["student", "teacher", "fake_score"]  # no lrm without the lrm preset
    assert roles["student"]["every"] == 5 and roles["student"]["ema"] == 0.95
    assert roles["fake_score"]["every"] == 1 and roles["teacher"]["optim"] is None
    objectives = cfg["stages"]["dollar"]["objectives"]
    assert {name: (o["kind"], o["role"], o["weight"]) for name, o in objectives.items()} == {
        "vsd": ("vsd", "student", 1.0), "cd": ("cd", "student", 0.5), "fake": ("fake_score", "fake_score", 1.0)}
    assert cfg["generator"] == {"sampler": "consistency", "times": "dollar4", "cfg_scale": None,
                                "snap_to_data": False}
    assert not any("student_times" in o for o in objectives.values())  # one generator, read by all
    assert objectives["cd"]["m"] == 5 and objectives["cd"]["parameterization"] == "native"
    assert cfg["train"]["eval_steps"] is None  # the evaluation samples the student as exported
    # the resolved config is a fixed point (what --resume re-reads from RUN/config.yaml)
    again = Dollar.load_config(None, [], base=cfg)
    assert yaml.safe_load(yaml.safe_dump(again.model_dump(mode="json"))) == cfg


def test_presets_overlay_in_order_and_explicit_keys_win(teacher_dir, tmp_path, capsys):
    cfg = dry_run(capsys, teacher_dir, tmp_path, "preset=[lrm, steps2, m1, x0]",
                  "stages.dollar.objectives.lrm.reward=sharpness")
    assert cfg["preset"] == ["lrm", "steps2", "m1", "x0"]
    objectives = cfg["stages"]["dollar"]["objectives"]
    assert list(objectives) == ["vsd", "cd", "fake", "lrm", "ft"]  # Alg. 1's order
    assert cfg["generator"]["times"] == "dollar2"
    assert objectives["cd"]["m"] == 1 and objectives["cd"]["parameterization"] == "x0"
    assert objectives["lrm"]["reward"] == "sharpness" and objectives["lrm"]["decoder"] is None  # the model's codec
    assert list(cfg["roles"]) == ["student", "teacher", "fake_score", "lrm"]
    # --set beats a preset whatever the order on the command line; vsd removes cd
    cfg = dry_run(capsys, teacher_dir, tmp_path, "stages.dollar.objectives.cd.m=3", "preset=m1")
    assert cfg["stages"]["dollar"]["objectives"]["cd"]["m"] == 3
    cfg = dry_run(capsys, teacher_dir, tmp_path, "preset=vsd")
    assert list(cfg["stages"]["dollar"]["objectives"]) == ["vsd", "fake"]


def test_presets_are_listed_and_fixed_at_the_start(teacher_dir, tmp_path, capsys):
    rc, out, _ = cli(capsys, "recipes", "dollar")
    assert rc == 0 and all(f"--preset {name}" in out for name in ("vsd", "lrm", "ddpo", "steps2", "m1", "x0"))
    rc, out, _ = cli(capsys, "recipes")
    assert rc == 0 and {line.split()[0] for line in out.splitlines()} >= {"dollar", "accvideo", "finetune"}
    cfg = Dollar.load_config(None, [f"model={teacher_dir}", "preset=lrm"]).model_dump(mode="json")
    assert Dollar.load_config(None, ["train.steps=10"], base=cfg).preset == ["lrm"]  # resume: not re-applied
    with pytest.raises(Exception, match="presets are applied when a run starts"):
        Dollar.load_config(None, ["preset=[lrm, m1]"], base=cfg)


#: The loss term each objective kind logs.
TERM = {"vsd": "vsd", "cd": "cd", "fake_score": "mse", "lrm_fit": "mse", "lrm_finetune": "ft", "ddpo": "ddpo"}


@pytest.mark.parametrize("presets,kinds,roles", [  # DOLLAR Tab. 3 and 5 rows
    ("vsd", ["vsd", "fake_score"], ["student", "fake_score"]),
    ("", ["vsd", "cd", "fake_score"], ["student", "fake_score"]),
    ("vsd,lrm", ["vsd", "fake_score", "lrm_fit", "lrm_finetune"], ["student", "fake_score", "lrm"]),
    ("lrm", ["vsd", "cd", "fake_score", "lrm_fit", "lrm_finetune"], ["student", "fake_score", "lrm"]),
    ("vsd,ddpo", ["vsd", "fake_score", "ddpo"], ["student", "fake_score"]),
])
def test_ablation_presets_build_their_objectives(teacher_dir, tmp_path, presets, kinds, roles):
    overrides = [f"model={teacher_dir}", *TINY, f"preset={presets},steps2", "train.steps=1",
                 "roles.student.every=1"]
    trainer = Trainer(Dollar(Dollar.load_config(None, overrides)), tmp_path / "run", DistEnv())
    (stage,) = trainer.stages
    assert [o.kind for o in stage.objectives] == kinds
    assert stage.order == roles  # the engine's update order: student, fake score, LRM
    assert sorted(trainer.roles) == sorted(["teacher", *roles])
    record = trainer.train_step()  # one step of every term, student included
    expected = {f"loss/{o.role}/{o.name}/{TERM[o.kind]}" for o in stage.objectives}
    assert expected <= set(record) and all(np.isfinite(record[k]) for k in expected), record


# ------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def smoke_run(teacher_dir, tmp_path_factory):
    """30 steps of the default recipe (VSD + CD): fake score every step, the student every 5th."""
    import torch

    from fewstep.cli import main

    run = tmp_path_factory.mktemp("dollar") / "run"
    threads = torch.get_num_threads()  # a module fixture runs before the function-scoped one_thread
    torch.set_num_threads(1)
    try:
        assert main(["distill", "--recipe", "dollar", "--out", str(run),
                     *dollar_sets(teacher_dir, "train.steps=30")]) == 0
    finally:
        torch.set_num_threads(threads)
    return run


def test_smoke_run_lowers_the_fake_score_loss(smoke_run):
    logged = losses(smoke_run)
    assert sorted(logged) == list(range(1, 31))
    student = [s for s, rec in logged.items() if "loss/student" in rec]
    assert student == [5, 10, 15, 20, 25, 30]  # 6 student updates: fake_score : student = 5 : 1
    assert all({"loss/student/vsd/vsd", "loss/student/cd/cd"} <= set(logged[s]) for s in student)
    fake = [logged[s]["loss/fake_score/fake/mse"] for s in range(1, 31)]
    assert np.isfinite(fake).all()
    # the fake score tracks the (moving) student distribution: its loss falls (0.88–0.94 over 6 seeds)
    assert np.mean(fake[-5:]) < 0.97 * np.mean(fake[:5]), fake
    trainer = json.loads((smoke_run / "checkpoints" / "step_000030" / "trainer.json").read_text())
    assert trainer["roles"]["student"]["updates"] == 6 and trainer["roles"]["fake_score"]["updates"] == 30


def test_exported_student_samples_on_its_grid(smoke_run):
    student = VideoPipeline.load(smoke_run / "student")
    sampling = student.config.sampling
    grid = step_times("dollar4", student.denoiser.schedule).tolist()
    assert sampling.sampler == "consistency" and sampling.cfg_scale is None
    assert sampling.times == [*grid, 0.0]
    videos, result = student.generate(["a red circle moves right"], seed=0)
    assert result.nfe == 4 and videos.shape == (1, 8, 16, 16, 3) and videos.dtype == np.uint8
    ema = tensors(smoke_run, 30, "ema/student")  # RUN/student holds the EMA weights
    assert all((v == ema[k]).all() for k, v in student.denoiser.state_dict().items())


def test_resume_continues_the_expanded_config(smoke_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    rc, _, err = cli(capsys, "distill", "--resume", run, "--set", "train.steps=35")
    assert rc == 0, err
    assert sorted(losses(run))[-1] == 35 and 35 in [s for s, r in losses(run).items() if "loss/student" in r]


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_student_export_uses_the_generator(teacher_dir, tmp_path, steps):
    preset = {1: "steps1", 2: "steps2", 4: ""}[steps]
    recipe = Dollar(Dollar.load_config(None, [f"model={teacher_dir}", f"preset={preset}"]))
    recipe.student_pipeline().save(tmp_path / "student")
    student = VideoPipeline.load(tmp_path / "student")
    _, result = student.generate(["a red circle moves right"], seed=0)
    assert result.nfe == steps and len(student.config.sampling.times) == steps + 1
    assert student.config.sampling.times[:-1] == step_times(f"dollar{steps}", FlowMatching()).tolist()
    assert recipe.pipeline.config.sampling.sampler == "euler"  # the teacher itself is untouched


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("override,message", [
    ("preset=vsd_gan", "config key 'preset': unknown preset 'vsd_gan' of recipe 'dollar'; known: vsd, lrm"),
    ("ablatoin=vsd", "unknown config key 'ablatoin'"),
    ("generator.times=dollar3", "config key 'generator.times': Value error, unknown timestep grid 'dollar3'"),
    ("stages.dollar.objectives.cd.m=0", "config key 'stages.dollar.objectives.cd.m': Input should be greater"),
    ("stages.dollar.objectives.cd.m=60", "m = 60 teacher steps exceed the 50 steps of grid 'ddim50'"),
    ("stages.dollar.objectives.cd.parameterization=homogeneous", "'stages.dollar.objectives.cd.parameterization'"),
    ("stages.dollar.objectives.vsd.student_times=dollar2",
     "unknown config key 'stages.dollar.objectives.vsd.student_times'"),
    ("stages.dollar.objectives.ddpo.etaa=1", "missing config key 'stages.dollar.objectives.ddpo.kind'"),
    ("roles.discriminator.optim.lr=1e-4", "role 'discriminator' has an optimizer but no objective updates it"),
    ("generator=null", "objective 'vsd' samples the student, which needs a generator: block"),
])
def test_bad_config_is_one_line_exit_2(teacher_dir, tmp_path, capsys, override, message):
    rc, _, err = cli(capsys, "distill", "--recipe", "dollar", "--out", tmp_path / "run",
                     *dollar_sets(teacher_dir, override))
    assert rc == 2
    assert message in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override,message", [
    ("stages.dollar.objectives.lrm.reward=pickscore", "unknown reward 'pickscore'"),
    ("stages.dollar.objectives.ddpo.etaa=1", "unknown config key 'stages.dollar.objectives.ddpo.etaa'"),
])
def test_bad_keys_of_preset_objectives(teacher_dir, tmp_path, capsys, override, message):
    rc, _, err = cli(capsys, "distill", "--recipe", "dollar", "--out", tmp_path / "run", "--preset", "lrm",
                     "--preset", "ddpo", *dollar_sets(teacher_dir, override))
    assert rc == 2 and message in err and err.count("\n") == 1, err


def test_ddpo_needs_two_student_steps(teacher_dir, tmp_path, capsys):
    rc, _, err = cli(capsys, "distill", "--recipe", "dollar", "--out", tmp_path / "run",
                     *dollar_sets(teacher_dir, "preset=vsd,ddpo,steps1"))
    assert rc == 2 and "objectives.ddpo" in err and "at least 2 student steps" in err and err.count("\n") == 1, err


def test_every_ablation_variant_is_a_valid_overlay(teacher_dir, tmp_path):
    """benchmarks/ablations/dollar.yaml: each variant is a YAML overlay (--config) the recipe validates."""
    from pathlib import Path

    variants = yaml.safe_load((Path(__file__).parents[1] / "benchmarks" / "ablations" / "dollar.yaml").read_text())
    assert {"vsd", "vsd_cd", "vsd_cd_lrm_jpeg", "vsd_lrm_jpeg", "vsd_ddpo_jpeg", "vsd_cd_m1", "vsd_cd_x0"} <= set(variants)
    for name, overlay in variants.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(overlay))
        cfg = Dollar.load_config(path, [f"model={teacher_dir}"])
        assert cfg.preset == overlay.get("preset", []), name
