"""The ``swiftvideo`` recipe (papers/003): resolved config and Table 2 presets, a two-stage run on the tiny toy
teacher whose exported student samples with Euler at 4 steps, and 10 steps on a tiny Wan with a DINOv2 loaded
from a directory."""

from __future__ import annotations

import json

import pytest
import yaml

from fewstep.models.family import load_model
from fewstep.engine.health import HealthConfig, HealthMonitor
from helpers import cli, losses, make_tiny_dinov2

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["train.batch_size=2", "train.log_every=1", "train.eval_every=0", "train.checkpoint_every=0",
        "train.tensorboard=false", "roles.student.optim.warmup_steps=0"]


def args(model, out, *extra, dry=False):
    sets = [a for s in [f"model={model}", *TINY, *extra] for a in ("--set", s)]
    return ["distill", "--recipe", "swiftvideo", "--out", out, *(["--dry-run"] if dry else []), *sets]


def dry_run(capsys, model, tmp_path, *extra) -> dict:
    rc, out, err = cli(capsys, *args(model, tmp_path / "run", *extra, dry=True))
    assert rc == 0, err
    return yaml.safe_load(out)


def test_stages_roles_and_generator(teacher_dir, tmp_path, capsys):
    cfg = dry_run(capsys, teacher_dir, tmp_path)
    assert list(cfg["roles"]) == ["student", "teacher", "discriminator"]
    assert cfg["roles"]["student"]["ema"] == 0.95 and cfg["roles"]["teacher"]["optim"] is None
    assert cfg["roles"]["discriminator"]["build"]["kind"] == "feature_discriminator"
    stages = cfg["stages"]
    assert {s: list(v["objectives"]) for s, v in stages.items()} == {"ccd": ["ccd"], "ccd_da": ["ccd", "da_g", "da_d"]}
    ccd = stages["ccd"]["objectives"]["ccd"]
    assert ccd["timesteps"] == {"kind": "logit_normal", "mean": -0.6, "std": 1.4}
    assert (ccd["normalization"], ccd["norm_c"], ccd["jvp"]) == ("rms", 0.1, "blockwise")
    da = stages["ccd_da"]["objectives"]
    assert (da["da_g"]["role"], da["da_g"]["weight"], da["da_d"]["role"]) == ("student", 0.01, "discriminator")
    assert cfg["generator"]["sampler"] == "euler" and cfg["generator"]["times"] == "uniform4"


@pytest.mark.parametrize("preset,stages,roles", [
    ("da_only", {"ccd_da": ["da_g", "da_d"]}, ["student", "teacher", "discriminator"]),
    ("dcd_da", {"ccd": ["dcd"], "ccd_da": ["da_g", "da_d", "dcd"]}, ["student", "teacher", "discriminator"]),
    ("ccd_only", {"ccd": ["ccd"], "ccd_da": ["ccd"]}, ["student", "teacher"]),
])
def test_table2_presets(preset, stages, roles, teacher_dir, tmp_path, capsys):
    cfg = dry_run(capsys, teacher_dir, tmp_path, f"preset={preset}")
    assert {s: list(v["objectives"]) for s, v in cfg["stages"].items()} == stages
    assert list(cfg["roles"]) == roles
    if preset == "dcd_da":
        assert cfg["stages"]["ccd"]["objectives"]["dcd"]["kind"] == "cd"


def test_time_sampler_and_step_presets(teacher_dir, tmp_path, capsys):
    cfg = dry_run(capsys, teacher_dir, tmp_path, "preset=[t_uniform, steps2]")
    kinds = {o["timesteps"]["kind"] for s in cfg["stages"].values() for o in s["objectives"].values()}
    assert kinds == {"uniform"} and cfg["generator"]["times"] == "uniform2"
    cfg = dry_run(capsys, teacher_dir, tmp_path, "preset=t_lognorm_08")
    assert cfg["stages"]["ccd_da"]["objectives"]["da_d"]["timesteps"] == {"kind": "logit_normal", "mean": -0.8,
                                                                           "std": 1.0}
    cfg = dry_run(capsys, teacher_dir, tmp_path, "preset=[t_uniform, consistency_sampler]")
    assert cfg["generator"]["sampler"] == "consistency" and cfg["generator"]["times"] == "uniform4"


def test_two_stages_on_the_toy_teacher_and_a_4_step_euler_student(teacher_dir, tmp_path, capsys):
    run = tmp_path / "run"
    rc, _, err = cli(capsys, *args(teacher_dir, run, "train.steps=4", "stages.ccd.steps=2",
                                   "stages.ccd.objectives.ccd.warmup_steps=2",
                                   "stages.ccd_da.objectives.ccd.warmup_steps=2"))
    assert rc == 0, err
    seen = losses(run)
    assert sorted(seen) == [1, 2, 3, 4]
    assert "loss/discriminator" not in seen[2] and "loss/discriminator" in seen[3]  # DA after N_warmup steps
    assert {"loss/student/ccd/ccd", "loss/student/da_g/adv"} <= set(seen[3])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    r = {rec["step"]: rec["metric/student/ccd/r"] for rec in records if "metric/student/ccd/r" in rec}
    assert r[1] == 0.0 and r[2] == 0.5 and r[4] == 1.0  # tangent warm-up over H = 2 engine steps
    student = load_model(run / "student")
    assert student.sampling.sampler == "euler" and student.sampling.times == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_ten_steps_on_a_tiny_wan_with_dinov2_features(wan_dir, tmp_path, capsys):
    dino = make_tiny_dinov2(tmp_path / "dinov2")
    run = tmp_path / "run"
    rc, _, err = cli(capsys, *args(wan_dir, run, "train.steps=10", "stages.ccd.steps=5",
                                   "roles.discriminator.build.features=dinov2", f"roles.discriminator.build.path={dino}",
                                   "roles.discriminator.build.layers=[1]", "roles.discriminator.build.size=16",
                                   "roles.discriminator.build.width=8"))
    assert rc == 0, err
    seen = losses(run)
    assert sorted(seen) == list(range(1, 11))
    assert "loss/discriminator" in seen[10] and all(v == v for rec in seen.values() for v in rec.values())
    assert (run / "student" / "model_index.json").is_file()


def test_a_new_stage_restarts_the_loss_trend():
    """Stage 2 adds λ_adv·DA to the student's loss; the health monitor's trend restarts at a stage (engine)."""
    monitor = HealthMonitor(HealthConfig(window=4))
    for _ in range(8):
        monitor.observe({"loss/student": 1e-3})  # CCD alone
    for _ in range(4):
        monitor.observe({"loss/student": 6e-2})  # CCD + DA
    assert [i.kind for i in monitor.check_losses()] == ["exploding"]
    monitor.restart_losses()
    for _ in range(8):
        monitor.observe({"loss/student": 6e-2})
    assert monitor.check_losses() == []


def test_stop_in_stage_1_and_resume_across_the_stage_change_is_exact(teacher_dir, tmp_path, capsys):
    """Stopped in CCD's stage and resumed through CCD + DA: the same weights, EMA, optimisers and losses as one run."""
    from helpers import assert_same_checkpoint

    stages = ["stages.ccd.steps=3", "stages.ccd.objectives.ccd.warmup_steps=2",
              "stages.ccd_da.objectives.ccd.warmup_steps=2"]
    one, two = tmp_path / "one", tmp_path / "two"
    rc, _, err = cli(capsys, *args(teacher_dir, one, "train.steps=6", *stages))
    assert rc == 0, err
    rc, _, err = cli(capsys, *args(teacher_dir, two, "train.steps=2", *stages, "train.checkpoint_every=2"))
    assert rc == 0, err
    rc, _, err = cli(capsys, "distill", "--resume", two, "--set", "train.steps=6", "--set", "train.checkpoint_every=0")
    assert rc == 0, err
    assert_same_checkpoint(two, one, 6, must=("roles/student", "ema/student", "roles/discriminator"))
