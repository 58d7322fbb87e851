"""Recipes on an image-to-video toy teacher by config alone: the data sources attach each sample's own first
frame, synthesized trajectory and preference stores keep it, and dollar / accvideo / rgtd / swiftvideo run a
few steps (the periodic evaluation conditioned on toy first frames). Tiny random models only."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fewstep.data.toyworld import ToyWorld
from fewstep.diffusion.samplers import sample_euler
from fewstep.errors import UserError
from fewstep.models.pipeline import VideoPipeline, image_to_video
from fewstep.recipes.sources import PreferenceSource, ToyWorldSource, TrajectorySource
from fewstep.synth import sample_noise, synthesize, synthesize_pairs
from helpers import cli, losses, make_tiny_pipeline, perturb

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("i2v_recipes")
    i2v = image_to_video(make_tiny_pipeline())
    perturb(i2v.denoiser.backbone.module.patch_embed, scale=0.2, seed=1)  # the image matters
    return {"i2v": i2v.eval().save(root / "i2v"), "t2v": make_tiny_pipeline().save(root / "t2v"), "root": root}


def first_frames(indices) -> torch.Tensor:
    """(B, H, W, 3): the first frames of the toy world's training clips ``indices`` at the tiny geometry."""
    return ToyWorld("train", frames=8, size=16, length=2**62).batch(list(indices))["frames"][:, 0]


def test_toy_world_source_conditions_each_clip_on_its_own_first_frame(models):
    model = VideoPipeline.load(models["i2v"])
    batch = ToyWorldSource(model, seed=0).batch([0, 1, 2], CPU)
    with torch.no_grad():
        want = model.encode_images(first_frames([0, 1, 2]))
    for name, value in want.items():
        assert torch.allclose(batch.cond.extra[name], value, atol=1e-6)
        assert torch.equal(batch.uncond.extra[name], batch.cond.extra[name])  # the image stays unconditional too
    plain = ToyWorldSource(VideoPipeline.load(models["t2v"]), seed=0).batch([0, 1], CPU)
    assert plain.cond.extra == {} and plain.uncond.extra == {}


def test_trajectory_store_keeps_each_samples_image(models):
    out = models["root"] / "store"
    store = synthesize(models["i2v"], out, 4, steps=5, batch_size=2, shard_size=2, cfg_scale=2.0)
    assert set(store.settings.visual_shapes) == {"image_latent", "image_mask"}
    model = VideoPipeline.load(models["i2v"])
    batch = TrajectorySource(out, model).batch([0, 1, 2, 3], CPU)
    with torch.no_grad():
        visual = model.encode_images(first_frames(range(4)))
        for name, value in visual.items():
            assert torch.allclose(batch.cond.extra[name], value, atol=1e-6)
            assert torch.equal(batch.uncond.extra[name], batch.cond.extra[name])
        # the stored sample is the teacher's solve on that image (an independent Euler solve with CFG)
        prompts = [ToyWorld("train", length=2**62).prompt_and_seed(i)[0] for i in range(4)]
        cond = model.encode_prompts(prompts).with_extra(visual)
        noise = sample_noise(model.latent_shape(1)[1:], 0, range(4))
        want = sample_euler(model.denoiser, noise, store.times.new_tensor(store.settings.grid), cond, cfg_scale=2.0,
                            uncond=model.null_condition(4)).x
    assert torch.allclose(batch.latents, want, atol=1e-4)
    with pytest.raises(UserError, match="visual extras .*text-to-video"):
        TrajectorySource(out, VideoPipeline.load(models["t2v"]))
    prompts_file = models["root"] / "prompts.txt"
    prompts_file.write_text("a red circle moves left\n")
    with pytest.raises(UserError, match="--prompts .*image-to-video model"):
        synthesize(models["i2v"], models["root"] / "store2", 2, prompts=str(prompts_file), steps=5)


def test_preference_store_keeps_each_pairs_image(models):
    out = models["root"] / "pairs"
    synthesize_pairs(models["i2v"], out, 2, preferred=4, dispreferred=2, batch_size=2)
    model = VideoPipeline.load(models["i2v"])
    batch = PreferenceSource(out, model).batch([0, 1], CPU)
    with torch.no_grad():
        visual = model.encode_images(first_frames([0, 1]))
        prompts = [ToyWorld("train", length=2**62).prompt_and_seed(i)[0] for i in range(2)]
        noise = sample_noise(model.latent_shape(1)[1:], 0, [0, 1])
        lose = model.sample_latents(prompts, steps=2, noise=noise, images=first_frames([0, 1])).x
    for name, value in visual.items():
        assert torch.allclose(batch.cond.extra[name], value, atol=1e-6)
    assert torch.allclose(batch.extra["dispreferred"], lose, atol=1e-5)


TINY = ["train.batch_size=2", "train.log_every=1", "train.checkpoint_every=0", "train.tensorboard=false",
        "train.steps=3", "train.eval_every=0"]
RECIPES = {
    "dollar": ["train.eval_every=3", "train.eval_prompts=1", "train.eval_samples=2", "roles.student.every=1"],
    "accvideo": ["data=STORE"],
    "rgtd": ["roles.discriminator.build.blocks=[0,1]", "roles.discriminator.build.width=16"],
    "swiftvideo": ["stages.ccd.steps=2", "stages.ccd.objectives.ccd.warmup_steps=1",
                   "stages.ccd_da.objectives.ccd.warmup_steps=1"],
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_runs_on_an_image_to_video_teacher_by_config(models, recipe, tmp_path, capsys):
    store = models["root"] / "store"
    if not (store / "manifest.json").is_file():
        synthesize(models["i2v"], store, 4, steps=5, batch_size=2, shard_size=2, cfg_scale=2.0)
    extra = [s.replace("STORE", str(store)) for s in RECIPES[recipe]]
    run = tmp_path / "run"
    sets = [a for s in [f"model={models['i2v']}", *TINY, *extra] for a in ("--set", s)]
    rc, out, err = cli(capsys, "distill", "--recipe", recipe, "--out", run, *sets)
    assert rc == 0, err
    assert "fewstep generate --model" in out + err and "--image 'toy:" in out + err  # the hint names the image
    seen = losses(run)
    assert sorted(seen) == [1, 2, 3] and all(np.isfinite(v) for rec in seen.values() for v in rec.values())
    student = VideoPipeline.load(run / "student")
    assert student.image_conditioned  # exported with its image conditioning
    with torch.no_grad():
        student.sample_latents(["a red circle moves left"], images=first_frames([0]))
    if recipe == "dollar":  # the periodic evaluation samples on toy first frames and scores VBench-I2V
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in records if any(k.endswith("/i2v_subject") for k in r)]
        assert evals and all(0 <= v <= 1 for r in evals for k, v in r.items() if "/i2v_" in k)


def test_bench_speed_of_an_image_to_video_student(models):
    """fewstep bench samples an image-to-video pair on each prompt's first frame (it would refuse without);
    a text-to-video student against an image-to-video teacher is one line."""
    from fewstep.bench import bench_speed

    i2v = VideoPipeline.load(models["i2v"])
    result = bench_speed(i2v, i2v, student_steps=(2,), teacher_steps=4, num_videos=2, repeats=1)
    assert result["students"]["2"]["nfe"] == 2 and result["teacher"]["nfe"] in (4, 8)  # CFG or not
    assert result["students"]["2"]["speedup"]["sampling"] > 0
    with pytest.raises(UserError, match="differ in conditioning"):
        bench_speed(VideoPipeline.load(models["t2v"]), i2v, student_steps=(2,), teacher_steps=4, num_videos=2)
