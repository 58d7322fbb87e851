"""The ``accvideo`` recipe (AccVideo Alg. 1): resolved config and switches, the ablations, a smoke run
through the CLI on a tiny synthesized store, the exported 5-step student, resume, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fewstep.engine.distributed import DistEnv
from fewstep.engine.trainer import Trainer
from fewstep.models.pipeline import VideoPipeline
from fewstep.diffusion.schedules import TIME_GRIDS
from fewstep.recipes.base import recipe_class
from fewstep.recipes.sources import ToyWorldSource
from fewstep.synth import synthesize
from helpers import cli, losses, make_tiny_pipeline, tensors

AccVideo = recipe_class("accvideo")

pytestmark = pytest.mark.usefixtures("one_thread")

#: A tiny run: batch 4, every step logged, no evaluation; learning rates raised for 20 steps.
TINY = ["train.batch_size=4", "train.log_every=1", "train.eval_every=0", "train.checkpoint_every=0",
        "train.tensorboard=false", "roles.student.optim.lr=3e-3", "roles.student.optim.warmup_steps=0"]
KEYS = list(TIME_GRIDS["accvideo_keys"])
UNIFORM = list(TIME_GRIDS["accvideo_uniform"])


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Stores of *another* tiny teacher (so the student has something to learn): key times, and the
    whole 10-step path (``--keep all``, for the uniform-grid ablation)."""
    root = tmp_path_factory.mktemp("accvideo")
    threads = torch.get_num_threads()  # a module fixture runs before the function-scoped one_thread
    torch.set_num_threads(1)
    try:
        make_tiny_pipeline(seed=1).save(root / "other")
        keys = synthesize(root / "other", root / "keys", 16, steps=10, batch_size=8, shard_size=8)
        full = synthesize(root / "other", root / "all", 8, steps=10, batch_size=8, shard_size=8, keep="all")
    finally:
        torch.set_num_threads(threads)
    return {"keys": keys.directory, "all": full.directory}


def accvideo_sets(teacher, data, *extra: str) -> list[str]:
    out = []
    for item in [f"model={teacher}", *([f"data={data}"] if data else []), *TINY, *extra]:
        out += ["--set", item]
    return out


def dry_run(capsys, teacher, data, tmp_path, *extra) -> dict:
    rc, out, err = cli(capsys, "distill", "--recipe", "accvideo", "--out", tmp_path / "run", "--dry-run",
                       *accvideo_sets(teacher, data, *extra))
    assert rc == 0, err
    assert not (tmp_path / "run").exists()
    return yaml.safe_load(out)


def overrides(teacher, data, *extra) -> list[str]:
    return [f"model={teacher}", *([f"data={data}"] if data else []), *TINY, *extra]


# ------------------------------------------------------------------------------------ the config
def test_dry_run_prints_the_resolved_config(teacher_dir, stores, tmp_path, capsys):
    cfg = dry_run(capsys, teacher_dir, stores["keys"], tmp_path)
    assert cfg["preset"] == [] and cfg["data"] == {"kind": "trajectory_store", "path": str(stores["keys"])}
    assert cfg["generator"] == {"sampler": "euler", "times": "accvideo_keys", "cfg_scale": None, "snap_to_data": True}
    assert list(cfg["roles"]) == ["student", "teacher", "discriminator"] and cfg["roles"]["teacher"]["optim"] is None
    assert cfg["roles"]["discriminator"]["build"]["single_head"] is False
    objectives = cfg["stages"]["accvideo"]["objectives"]
    assert {name: (o["kind"], o["role"], o["weight"]) for name, o in objectives.items()} == {
        "traj": ("trajectory_guidance", "student", 1.0), "adv_g": ("queue_gan_generator", "student", 0.1),
        "adv_d": ("queue_gan_discriminator", "discriminator", 0.1)}  # λ_adv = 0.1
    assert {o["source"] for o in objectives.values()} == {"trajectory"}
    assert not any("times" in o for o in objectives.values())  # the key times are the generator's
    assert objectives["adv_g"]["features"] == {"role": "teacher", "block": -1, "clean_block": None}
    assert cfg["train"]["eval_steps"] is None
    # the resolved config is a fixed point (what --resume re-reads from RUN/config.yaml)
    again = AccVideo.load_config(None, [], base=cfg)
    assert yaml.safe_load(yaml.safe_dump(again.model_dump(mode="json"))) == cfg


@pytest.mark.parametrize("preset,store,objectives,source", [
    ("traj_only", "keys", ["traj"], "trajectory"),
    ("single_head", "keys", ["traj", "adv_g", "adv_d"], "trajectory"),
    ("uniform_times", "all", ["traj", "adv_g", "adv_d"], "trajectory"),
    ("forward", None, ["traj", "adv_g", "adv_d"], "forward"),
])
def test_presets_reach_the_objectives(teacher_dir, stores, tmp_path, capsys, preset, store, objectives, source):
    cfg = dry_run(capsys, teacher_dir, stores[store] if store else None, tmp_path, f"preset={preset}")
    stage = cfg["stages"]["accvideo"]["objectives"]
    assert list(stage) == objectives and {o["source"] for o in stage.values()} == {source}
    assert ("discriminator" in cfg["roles"]) == (preset != "traj_only")
    assert cfg["generator"]["times"] == ("accvideo_uniform" if preset == "uniform_times" else "accvideo_keys")
    assert cfg["data"]["kind"] == ("toy_world" if preset == "forward" else "trajectory_store")


# ------------------------------------------------------------------------------------ the ablations
@pytest.mark.parametrize("preset", ["traj_only", "single_head", "uniform_times", "forward"])
def test_ablations_build_and_train(teacher_dir, stores, tmp_path, preset):
    store = {"uniform_times": stores["all"], "forward": None}.get(preset, stores["keys"])
    recipe = AccVideo(AccVideo.load_config(None, overrides(teacher_dir, store, f"preset={preset}", "train.steps=1")))
    trainer = Trainer(recipe, tmp_path / "run", DistEnv())
    (stage,) = trainer.stages
    record = trainer.train_step()
    assert np.isfinite(record["loss/student/traj/traj"])
    if preset == "traj_only":
        assert [o.kind for o in stage.objectives] == ["trajectory_guidance"] and "discriminator" not in trainer.roles
        return
    assert stage.order == ["student", "discriminator"]  # Alg. 1: s_β, then H_k
    assert np.isfinite(record["loss/discriminator/adv_d/adv"]) and np.isfinite(record["loss/student/adv_g/adv"])
    heads = trainer.roles["discriminator"].module
    assert len(heads.heads) == (1 if preset == "single_head" else 5)
    grid = recipe.student_pipeline().config.sampling.times
    trained = [*trainer.student.step_times(recipe.pipeline.denoiser.schedule).tolist(), 0.0]
    assert grid == trained  # the exported sampler is the generator the objectives trained
    if preset == "uniform_times":  # the nearest stored times of the 10-step path: "selected from our trajectories"
        assert grid[0] == 1.0 and grid[-1] == 0.0 and grid != KEYS
        assert max(abs(a - b) for a, b in zip(grid, UNIFORM)) < 0.05
    else:
        assert grid == KEYS
    assert isinstance(trainer.source, ToyWorldSource) == (preset == "forward")


# ------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def smoke_run(teacher_dir, stores, tmp_path_factory):
    """20 steps of the full recipe through the CLI, distilling the other teacher's store."""
    from fewstep.cli import main

    run = tmp_path_factory.mktemp("accvideo-run") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["distill", "--recipe", "accvideo", "--out", str(run),
                     *accvideo_sets(teacher_dir, stores["keys"], "train.steps=20",
                                    "train.checkpoint_every=10")]) == 0
    finally:
        torch.set_num_threads(threads)
    return run


def test_smoke_run_lowers_the_trajectory_loss(smoke_run):
    logged = losses(smoke_run)
    assert sorted(logged) == list(range(1, 21))
    terms = ("loss/student/traj/traj", "loss/student/adv_g/adv", "loss/discriminator/adv_d/adv")
    assert all(set(terms) <= set(rec) and all(np.isfinite(rec[t]) for t in terms) for rec in logged.values())
    traj = [logged[s]["loss/student/traj/traj"] for s in range(1, 21)]
    assert np.mean(traj[-5:]) < 0.5 * np.mean(traj[:5]), traj  # ≈ 0.1× over 20 steps at lr 3e-3
    metrics = [json.loads(line) for line in (smoke_run / "metrics.jsonl").read_text().splitlines()]
    ks = [r["metric/student/adv_g/k"] for r in metrics if "metric/student/adv_g/k" in r]
    assert ks == [4, 3, 2, 1, 0] * 4  # Alg. 1's inner loop, one k per step
    trainer = json.loads((smoke_run / "checkpoints" / "step_000020" / "trainer.json").read_text())
    assert trainer["roles"]["student"]["updates"] == 20 and trainer["roles"]["discriminator"]["updates"] == 20


def test_checkpoint_holds_the_queues(smoke_run):
    state = tensors(smoke_run, 20, "objectives/accvideo.adv_d")
    assert state["cycle"].tolist() == [20, 19]  # 20 steps seen, the last one step 19
    assert state["q0/latents"].shape == (16, 4, 4, 4, 4)  # Q_0: 4 finished cycles of 4 samples
    assert "q5/latents" not in state  # Q_5 is emptied as soon as it is filled
    assert set(tensors(smoke_run, 20, "objectives/accvideo.adv_g")) == set(state)


def test_exported_student_samples_on_the_key_times(smoke_run):
    student = VideoPipeline.load(smoke_run / "student")
    sampling = student.config.sampling
    assert (sampling.sampler, sampling.times, sampling.cfg_scale) == ("euler", KEYS, None)
    videos, result = student.generate(["a red circle moves right"], seed=0)
    assert result.nfe == 5 and videos.shape == (1, 8, 16, 16, 3) and videos.dtype == np.uint8
    weights = tensors(smoke_run, 20)  # no EMA: RUN/student holds the live weights
    assert all((v == weights[k]).all() for k, v in student.denoiser.state_dict().items())


def test_resume_continues_with_the_queues(smoke_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    rc, _, err = cli(capsys, "distill", "--resume", run, "--set", "train.steps=23")
    assert rc == 0, err
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ks = [r["metric/student/adv_g/k"] for r in metrics if "metric/student/adv_g/k" in r]
    assert ks[-3:] == [4, 3, 2]  # the cycle continues where the checkpoint left it
    assert tensors(run, 23, "objectives/accvideo.adv_d")["cycle"].tolist() == [23, 22]


def test_stop_and_resume_is_exact(smoke_run, teacher_dir, stores, tmp_path, capsys):
    """Stopped mid-cycle (step 12: k = 2 next) and resumed, the run ends bit-identical to the smoke run."""
    run = tmp_path / "run"
    rc, _, err = cli(capsys, "distill", "--recipe", "accvideo", "--out", run,
                     *accvideo_sets(teacher_dir, stores["keys"], "train.steps=12", "train.checkpoint_every=10"))
    assert rc == 0, err
    rc, _, err = cli(capsys, "distill", "--resume", run, "--set", "train.steps=20")
    assert rc == 0, err
    for stem in ("roles/student", "roles/discriminator", "optim/student", "optim/discriminator",
                 "objectives/accvideo.adv_g", "objectives/accvideo.adv_d"):
        got, want = tensors(run, 20, stem), tensors(smoke_run, 20, stem)
        assert got.keys() == want.keys(), stem
        assert all(torch.equal(got[k], want[k]) for k in want), stem
    assert losses(run) == losses(smoke_run)


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("store,override,message", [
    (None, "train.steps=5", "config key 'data': this recipe trains on data you give"),
    ("keys", "preset=uniform_times", "config key 'generator.times': 'accvideo_uniform' on trajectory_store data: "
                                     "no stored latent near t=0.4"),
    ("keys", "generator.times=linear", "config key 'generator.times': Value error, unknown timestep grid 'linear'"),
    ("keys", "generator.sampler=consistency", "objective 'trajectory_guidance' trains the student's Euler steps"),
    ("keys", "generator.snap_to_data=false", None),  # the keys store holds the key times exactly: fine
    ("keys", "roles.discriminator.build.single_head=maybe", "config key 'roles.discriminator.build.single_head'"),
    ("keys", "stages.accvideo.objectives.traj.times=uniform", "unknown config key 'stages.accvideo.objectives.traj.times'"),
    ("keys", "stages.accvideo.objectives.adv_g.loss=wasserstein", "config key 'stages.accvideo.objectives.adv_g.loss'"),
    ("keys", "roles.lrm.optim.lr=1e-4", "role 'lrm' has an optimizer but no objective updates it"),
    ("keys", "roles.discriminator.optim=null", "objective 'queue_gan_discriminator' updates role 'discriminator', "
                                               "which is frozen"),
    ("keys", "data={kind: toy_world}", "objective 'trajectory_guidance' needs batches with 'trajectory'"),
])
def test_bad_config_is_one_line_exit_2(teacher_dir, stores, tmp_path, capsys, store, override, message):
    args = ["distill", "--recipe", "accvideo", "--out", tmp_path / "run", *(["--dry-run"] if message is None else [])]
    rc, _, err = cli(capsys, *args, *accvideo_sets(teacher_dir, stores[store] if store else None, override))
    if message is None:
        assert rc == 0, err
        return
    assert rc == 2
    assert message in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_missing_store_is_one_line_exit_2(teacher_dir, tmp_path, capsys):
    rc, _, err = cli(capsys, "distill", "--recipe", "accvideo", "--out", tmp_path / "run",
                     *accvideo_sets(teacher_dir, tmp_path / "nowhere"))
    assert rc == 2 and "no manifest.json" in err and err.count("\n") == 1, err


def test_dollar_lrm_on_accvideo_trajectories_is_a_config_change(teacher_dir, stores, tmp_path, capsys):
    """DOLLAR's latent reward model (an ``lrm`` role from the builder registry, lrm_fit + lrm_finetune)
    added to AccVideo's trajectories and heads by a second --config: it trains, and every student
    sample comes from AccVideo's 5-step Euler generator, the one the student is exported with."""
    overlay = tmp_path / "lrm.yaml"
    overlay.write_text(yaml.safe_dump({
        "roles": {"lrm": {"build": {"kind": "lrm", "width": 16, "groups": 4, "kernel_size": 3, "stride": 1},
                          "optim": {"lr": 1e-3}}},
        "stages": {"accvideo": {"objectives": {
            "lrm": {"kind": "lrm_fit", "role": "lrm", "reward": "sharpness", "generated_from": "sample"},
            "ft": {"kind": "lrm_finetune", "role": "student", "weight": 0.25}}}},
    }))
    run = tmp_path / "run"
    rc, _, err = cli(capsys, "distill", "--recipe", "accvideo", "--config", overlay, "--out", run,
                     *accvideo_sets(teacher_dir, stores["keys"], "train.steps=3"))
    assert rc == 0, err
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["generator"] == {"sampler": "euler", "times": "accvideo_keys", "cfg_scale": None, "snap_to_data": True}
    record = losses(run)[3]
    for key in ("loss/lrm/lrm/mse", "loss/student/ft/ft", "loss/student/traj/traj", "loss/discriminator/adv_d/adv"):
        assert np.isfinite(record[key]), key
    student = VideoPipeline.load(run / "student")
    assert student.config.sampling.sampler == "euler" and student.config.sampling.times == KEYS


def test_yaml_only_recipe_trains_dollar_lrm_on_accvideo_trajectories(teacher_dir, stores, tmp_path, capsys):
    """``accvideo_lrm`` is its YAML alone (no Python module): DOLLAR's LRM fit + fine-tuning on AccVideo's
    trajectories and heads. 20 steps train every term; the exported student samples with the generator
    every term trained on (AccVideo's 5 Euler steps on the stored key times), and --dry-run shows it."""
    from fewstep import recipes

    assert (Path(recipes.__file__).parent / "accvideo_lrm.yaml").is_file()
    assert not (Path(recipes.__file__).parent / "accvideo_lrm.py").exists()
    sets = [f"model={teacher_dir}", f"data={stores['keys']}", "train.batch_size=4", "train.log_every=1",
            "train.eval_every=0", "train.checkpoint_every=0", "train.tensorboard=false",
            "roles.student.optim.lr=3e-3", "roles.student.optim.warmup_steps=0",
            "roles.lrm.build.width=16", "roles.lrm.build.groups=4"]
    args = [a for item in sets for a in ("--set", item)]
    rc, out, err = cli(capsys, "distill", "--recipe", "accvideo_lrm", "--dry-run", *args)
    assert rc == 0, err
    cfg = yaml.safe_load(out)
    assert cfg["generator"] == {"sampler": "euler", "times": "accvideo_keys", "cfg_scale": None, "snap_to_data": True}
    assert {n: o["kind"] for n, o in cfg["stages"]["main"]["objectives"].items()} == {
        "traj": "trajectory_guidance", "adv_g": "queue_gan_generator", "ft": "lrm_finetune",
        "adv_d": "queue_gan_discriminator", "lrm": "lrm_fit"}
    assert list(cfg["roles"]) == ["student", "teacher", "discriminator", "lrm"]

    run = tmp_path / "run"
    rc, _, err = cli(capsys, "distill", "--recipe", "accvideo_lrm", "--out", run, "--set", "train.steps=20", *args)
    assert rc == 0, err
    logged = losses(run)
    terms = ("loss/student/traj/traj", "loss/student/adv_g/adv", "loss/student/ft/ft", "loss/discriminator/adv_d/adv",
             "loss/lrm/lrm/mse")
    assert sorted(logged) == list(range(1, 21))
    assert all(np.isfinite(logged[s][t]) for s in logged for t in terms)
    traj = [logged[s]["loss/student/traj/traj"] for s in range(1, 21)]
    assert np.mean(traj[-5:]) < 0.7 * np.mean(traj[:5]), traj
    student = VideoPipeline.load(run / "student")
    sampling = student.config.sampling
    assert (sampling.sampler, sampling.times, sampling.cfg_scale) == ("euler", KEYS, None)
    _, result = student.generate(["a red circle moves right"], seed=0)
    assert result.nfe == 5


def test_every_ablation_variant_is_a_valid_overlay(teacher_dir, stores, tmp_path):
    """benchmarks/ablations/accvideo.yaml: each variant is a YAML overlay (--config) the recipe validates."""
    variants = yaml.safe_load((Path(__file__).parents[1] / "benchmarks" / "ablations" / "accvideo.yaml").read_text())
    assert set(variants) == {"synthetic", "forward", "no_adversarial", "single_head", "uniform_times"}
    for name, overlay in variants.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(overlay))
        cfg = AccVideo.load_config(path, [f"model={teacher_dir}", f"data={stores['all']}"])
        assert cfg.preset == overlay.get("preset", []), name
