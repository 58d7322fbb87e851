"""The ``rgtd`` recipe (RGTD Eq. 15): resolved config, Table 2 presets, the ablation variants, a 30-step smoke run
through the CLI that lowers the losses and exports a loadable 4-step student, 10 steps on a tiny Wan with the toy
and pixel rewards, and the transformers-backed rewards as roles by config."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fewstep.engine.distributed import DistEnv
from fewstep.engine.trainer import Trainer
from fewstep.models.family import load_model
from fewstep.recipes.base import recipe_class
from fewstep.objectives.base import StepContext
from helpers import FakeRole, assert_same_checkpoint, cli, losses, make_tiny_clip, make_tiny_xclip, tensors

RGTD = recipe_class("rgtd")

pytestmark = pytest.mark.usefixtures("one_thread")

#: A tiny run: batch 4, every step logged, no evaluation; learning rates raised for 30 steps of a tiny random
#: teacher (the fake score learns its student's trajectories visibly at 1e-2, not at 1e-3).
TINY = ["train.batch_size=4", "train.log_every=1", "train.eval_every=0", "train.checkpoint_every=0",
        "train.tensorboard=false", "roles.student.optim.lr=1e-3", "roles.fake_score.optim.lr=1e-2",
        "roles.student.optim.warmup_steps=0", "roles.fake_score.optim.warmup_steps=0"]
#: The discriminator on the tiny teachers' 2 blocks.
HEADS = ["roles.discriminator.build.blocks=[0,1]", "roles.discriminator.build.width=16",
         "roles.discriminator.optim.lr=1e-2"]
STUDENT_TERMS = ["tdm/traj", "gen/gen", "spatial/spatial", "temporal/temporal"]


def rgtd_args(teacher, out, *extra: str) -> list[str]:
    sets = [f"model={teacher}", *TINY, *extra]
    return ["distill", "--recipe", "rgtd", "--out", out, *[a for s in sets for a in ("--set", s)]]


def dry_run(capsys, teacher, tmp_path, *extra) -> dict:
    rc, out, err = cli(capsys, *rgtd_args(teacher, tmp_path / "run", *extra), "--dry-run")
    assert rc == 0, err
    return yaml.safe_load(out)


# ------------------------------------------------------------------------------------ the config
def test_dry_run_is_eq15_with_the_papers_weights(teacher_dir, tmp_path, capsys):
    cfg = dry_run(capsys, teacher_dir, tmp_path)
    assert cfg["generator"] == {"sampler": "euler", "times": "uniform4", "cfg_scale": None, "snap_to_data": False}
    assert list(cfg["roles"]) == ["student", "teacher", "fake_score", "discriminator", "reward_image_text",
                                  "reward_image_quality", "reward_video_text"]
    assert cfg["roles"]["discriminator"]["build"]["kind"] == "feature_heads"
    assert {r["build"]["name"] for n, r in cfg["roles"].items() if n.startswith("reward_")} == {
        "toy-clip-frame", "sharpness", "toy-clip-video"}
    assert all(cfg["roles"][n]["optim"] is None for n in cfg["roles"] if n.startswith("reward_") or n == "teacher")
    objectives = cfg["stages"]["rgtd"]["objectives"]
    assert {name: (o["kind"], o["role"], o["weight"]) for name, o in objectives.items()} == {
        "tdm": ("tdm", "student", 1.0), "gen": ("feature_gan_generator", "student", 0.5),  # λ1
        "spatial": ("spatial_reward", "student", 1.0), "temporal": ("temporal_reward", "student", 1.5),  # λ2, λ3
        "fake": ("tdm_fake_score", "fake_score", 1.0), "disc": ("feature_gan_discriminator", "discriminator", 1.0)}
    assert objectives["tdm"]["huber_c"] is None and objectives["gen"]["loss"] == objectives["disc"]["loss"] == "hinge"
    again = RGTD.load_config(None, [], base=cfg)  # the resolved config is a fixed point (resume)
    assert yaml.safe_load(yaml.safe_dump(again.model_dump(mode="json"))) == cfg


@pytest.mark.parametrize("preset,objectives", [
    ("traj_only", ["tdm", "fake"]),
    ("gan", ["tdm", "gen", "fake", "disc"]),
    ("reward", ["tdm", "spatial", "temporal", "fake"]),
    ("full", ["tdm", "gen", "spatial", "temporal", "fake", "disc"]),
])
def test_table2_presets(teacher_dir, tmp_path, capsys, preset, objectives):
    cfg = dry_run(capsys, teacher_dir, tmp_path, f"preset={preset}")
    assert list(cfg["stages"]["rgtd"]["objectives"]) == objectives
    used = {"student", "teacher", "fake_score"} | ({"discriminator"} if "disc" in objectives else set()) | (
        {"reward_image_text", "reward_image_quality", "reward_video_text"} if "spatial" in objectives else set())
    assert set(cfg["roles"]) == used


def test_the_two_step_student_is_one_override(teacher_dir, tmp_path, capsys):
    assert dry_run(capsys, teacher_dir, tmp_path, "preset=steps2")["generator"]["times"] == "uniform2"
    assert dry_run(capsys, teacher_dir, tmp_path, "generator.times=uniform2")["generator"]["times"] == "uniform2"


def test_every_ablation_variant_is_a_valid_overlay(teacher_dir, tmp_path):
    variants = yaml.safe_load((Path(__file__).parents[1] / "benchmarks" / "ablations" / "rgtd.yaml").read_text())
    assert {"traj_only", "gan", "reward", "full"} <= set(variants)
    for name, overlay in variants.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(overlay))
        assert RGTD.load_config(path, [f"model={teacher_dir}"]).preset == overlay["preset"], name


def test_bad_blocks_and_rewards_are_one_line_errors(teacher_dir, tmp_path, capsys):
    rc, _, err = cli(capsys, *rgtd_args(teacher_dir, tmp_path / "run", "roles.discriminator.build.blocks=[5]"))
    assert rc == 2 and "blocks" in err and err.count("\n") == 1, err
    rc, _, err = cli(capsys, *rgtd_args(teacher_dir, tmp_path / "run2", *HEADS,
                                        "roles.reward_video_text.build.name=vbench"))
    assert rc == 2 and "roles.reward_video_text.build.name" in err and err.count("\n") == 1, err


# ------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def smoke_run(teacher_dir, tmp_path_factory):
    """30 steps of the full recipe through the CLI on the tiny teacher."""
    from fewstep.cli import main

    run = tmp_path_factory.mktemp("rgtd") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(rgtd_args(teacher_dir, run, *HEADS, "train.steps=30")) == 0
    finally:
        torch.set_num_threads(threads)
    return run


def test_a_30_step_run_lowers_the_losses(smoke_run, teacher_dir, tmp_path):
    """Each role lowers its own loss, measured on one fixed probe (batch, noise) before and after the 30 steps.

    (The logged per-step losses are not monotone in a distribution-matching run: the fake score starts as the
    teacher, so Δ = s_fake − s_real grows while it learns the student; each step also sees a new batch.)
    """
    seen = losses(smoke_run)
    assert sorted(seen) == list(range(1, 31))
    assert all(np.isfinite(v) for rec in seen.values() for v in rec.values())
    assert {f"loss/student/{t}" for t in STUDENT_TERMS} <= set(seen[30])

    trainer = Trainer(RGTD(RGTD.load_config(None, [f"model={teacher_dir}", *TINY, *HEADS, "train.steps=30"])),
                      tmp_path / "probe", DistEnv())
    before = {name: trainer.roles[name].module for name in ("student", "fake_score", "discriminator")}
    after = {}
    for name, module in before.items():
        after[name] = copy.deepcopy(module)
        after[name].load_state_dict(tensors(smoke_run, 30, f"roles/{name}"))
    batch = trainer.source.batch(range(8), torch.device("cpu"))
    objectives = {o.name: o for o in trainer.stages[0].objectives}

    def probe(name: str, **modules) -> float:
        objective = objectives[name]
        roles = {n: FakeRole(n, modules.get(n, r.module), trainable=r.trainable) for n, r in trainer.roles.items()}
        ctx = StepContext(step=10**6, stage=0, stage_step=0, role=objective.role, seed=0, device=torch.device("cpu"),
                          sample_ids=batch.sample_ids, generator=torch.Generator(), student=trainer.student)
        out = objective(batch, roles, ctx.with_batch(batch.sample_ids, 0))
        return float(sum(loss.detach().float().mean() for loss in out.losses.values()))

    student, fake, heads = after["student"], after["fake_score"], after["discriminator"]
    # the fake score has learned the trained student's trajectories (Eq. 8 / 10); the heads tell its samples from
    # real clips (Eq. 12)
    assert probe("fake", student=student, fake_score=fake) < 0.95 * probe("fake", student=student)
    assert probe("disc", student=student, discriminator=heads) < probe("disc", student=student) - 0.01
    # the student: Eq. 15 against the trained critics, and its rewards (Eq. 13–14) alone. (In 30 steps its GAN
    # term is a small part of the total: the trajectory term's push has norm ~1 per sample and step.)
    weights = {name: objectives[name].weight for name in ("tdm", "gen", "spatial", "temporal")}

    def eq15(**modules) -> float:
        return sum(w * probe(name, fake_score=fake, discriminator=heads, **modules) for name, w in weights.items())

    assert eq15(student=student) < eq15()
    rewards = {name: weights[name] for name in ("spatial", "temporal")}
    assert sum(w * probe(n, student=student) for n, w in rewards.items()) < sum(w * probe(n) for n, w in rewards.items())


def test_stop_and_resume_is_exact(smoke_run, teacher_dir, tmp_path, capsys):
    """Stopped at step 12 and resumed to 30: every role, EMA, optimiser state and logged loss as in one run."""
    run = tmp_path / "run"
    rc, _, err = cli(capsys, *rgtd_args(teacher_dir, run, *HEADS, "train.steps=12", "train.checkpoint_every=12"))
    assert rc == 0, err
    rc, _, err = cli(capsys, "distill", "--resume", run, "--set", "train.steps=30", "--set", "train.checkpoint_every=0")
    assert rc == 0, err
    assert_same_checkpoint(run, smoke_run, 30, must=("roles/student", "roles/fake_score", "roles/discriminator",
                                                     "optim/student"))


def test_the_student_is_exported_as_a_4_step_model(smoke_run):
    run = json.loads((smoke_run / "run.json").read_text())
    assert run["recipe"] == "rgtd"
    student = load_model(smoke_run / "student")
    assert student.sampling.sampler == "euler" and student.sampling.cfg_scale is None
    assert student.sampling.times == [1.0, 0.75, 0.5, 0.25, 0.0] and student.default_steps() == 4
    videos, result = student.generate(["a red circle moves left"], seed=0)
    assert videos.shape == (1, 8, 16, 16, 3) and result.nfe == 4


def test_rgtd_on_a_tiny_wan_by_config(wan_dir, tmp_path, capsys):
    """A real (diffusers) teacher: Wan's VAE decodes for the toy CLIP and sharpness rewards, its blocks feed D."""
    wan = wan_dir
    run = tmp_path / "run"
    rc, _, err = cli(capsys, *rgtd_args(wan, run, *HEADS, "train.steps=10", "train.batch_size=2"))
    assert rc == 0, err
    seen = losses(run)
    assert sorted(seen) == list(range(1, 11))
    for term in ["loss/student", *(f"loss/student/{t}" for t in STUDENT_TERMS), "loss/fake_score",
                 "loss/discriminator"]:
        assert all(np.isfinite(rec[term]) for rec in seen.values()), term
    settings = json.loads((run / "student" / "fewstep_model.json").read_text())
    assert settings["sampling"]["sampler"] == "euler" and len(settings["sampling"]["times"]) == 5


def test_transformers_rewards_are_roles_by_config(teacher_dir, tmp_path):
    """R_it, R_iq and R_v from local CLIP / X-CLIP directories: the reward roles' build keys, nothing else."""
    clip, xclip = make_tiny_clip(tmp_path / "clip"), make_tiny_xclip(tmp_path / "xclip")
    overrides = [f"model={teacher_dir}", *TINY, "train.steps=1", "preset=reward",
                 "roles.reward_image_text.build.name=clip", f"roles.reward_image_text.build.kwargs.path={clip}",
                 "roles.reward_image_quality.build.name=clip-iqa",
                 f"roles.reward_image_quality.build.kwargs.path={clip}",
                 "roles.reward_video_text.build.name=xclip", f"roles.reward_video_text.build.kwargs.path={xclip}"]
    trainer = Trainer(RGTD(RGTD.load_config(None, overrides)), tmp_path / "run", DistEnv())
    assert type(trainer.roles["reward_video_text"].module).__name__ == "XClipReward"
    record = trainer.train_step()
    for key in ("loss/student/spatial/spatial", "loss/student/temporal/temporal", "metric/student/spatial/image_quality"):
        assert np.isfinite(record[key]), key
    assert 0 < record["metric/student/spatial/image_quality"] < 1


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_train_as_one(teacher_dir, tmp_path, capsys, mode):
    """DDP / FSDP2: every role, the multi-head discriminator and the reward roles included, as in one process (grad
    norms all-reduced, step by step)."""
    from helpers import cli_subprocess

    extra = ["train.steps=2", "train.grad_accum=2", *HEADS]
    rc, _, err = cli(capsys, *rgtd_args(teacher_dir, tmp_path / "one", *extra))
    assert rc == 0, err
    proc = cli_subprocess(*rgtd_args(teacher_dir, tmp_path / "two", *extra, f"train.distributed={mode}"),
                          launcher=("-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    for step in (1, 2):
        for key in ("grad_norm/discriminator", "grad_norm/student", "grad_norm/fake_score", "loss/discriminator",
                    *(f"loss/student/{t}" for t in STUDENT_TERMS)):
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-4, abs=1e-6), (step, key)
