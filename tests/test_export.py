"""``fewstep export``: a run on a tiny random WanPipeline becomes a diffusers pipeline directory that
diffusers' own WanPipeline loads and samples in the student's steps, giving exactly what
``fewstep generate --model RUN/student`` gives from the same initial noise; ``--lora-only`` writes
adapters ``load_lora_weights`` accepts; bad input is one line with exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fewstep.export import fit_flow_scheduler, stock_sigmas
from fewstep.models.family import load_model
from helpers import cli, make_tiny_cogvideox_pipeline, make_tiny_hunyuan_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a cat runs in the park"


def train(recipe, model, out, *extra):
    from fewstep.cli import main

    sets = [f"model={model}", "train.steps=3", "train.batch_size=2", "train.eval_every=0", "train.log_every=3",
            "train.tensorboard=false", *extra]
    assert main(["distill", "--recipe", recipe, "--out", str(out), *[a for s in sets for a in ("--set", s)]]) == 0
    return out


@pytest.fixture(scope="module")
def runs(wan_dir, tmp_path_factory):
    where = tmp_path_factory.mktemp("runs")
    return {
        # a LoRA consistency student on the exportable uniform4 grid (1, 0.75, 0.5, 0.25)
        "lora": train("dollar", wan_dir, where / "lora", "generator.times=uniform4", "roles.student.lora.rank=4",
                      "roles.student.lora.alpha=8", "roles.fake_score.lora.rank=4", "roles.student.every=1"),
        # an Euler student (AccVideo's sampler) on its uniform grid, on data latents forward-diffused (no store)
        "euler": train("accvideo", wan_dir, where / "euler", "preset=[forward]", "generator.times=accvideo_uniform"),
    }


def diffusers_latents(directory, noise, steps, seed, **kwargs):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(directory, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(seed)  # WanPipeline's scheduler.step draws consistency noise from the global generator
    return pipe(PROMPT, height=32, width=32, num_frames=9, num_inference_steps=steps, guidance_scale=1.0,
                latents=noise.clone(), max_sequence_length=16, **kwargs).frames


@pytest.mark.parametrize("name,steps", [("lora", 4), ("euler", 5)])
def test_export_samples_in_diffusers_as_fewstep_generate(name, steps, runs, tmp_path, capsys):
    run, out = runs[name], tmp_path / "export"
    rc, stdout, err = cli(capsys, "export", run, "--out", out)
    assert rc == 0, err
    assert f"num_inference_steps={steps}, guidance_scale=1.0" in stdout and "note:" not in stdout
    record = json.loads((out / "export.json").read_text())
    assert record["exact"] and record["max_sigma_gap"] < 1e-5  # float32 round-off
    assert record["sampler"] == ("consistency" if name == "lora" else "euler")
    student = load_model(run / "student")
    noise = torch.randn(student.latent_shape(1), generator=torch.Generator().manual_seed(3))
    ours = student.sample_latents([PROMPT], noise=noise, seed=7).x
    theirs = diffusers_latents(out, noise, steps, seed=7, output_type="latent")
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)  # the grids agree to float32 round-off
    assert float((ours - noise).abs().mean()) > 0.05
    video = diffusers_latents(out, noise, steps, seed=7, output_type="np")  # (1, T, H, W, 3) in [0, 1]
    with torch.no_grad():
        frames = student.decode(ours)
    np.testing.assert_allclose((frames.numpy() + 1) / 2, video, atol=2e-3)
    # fewstep reads the export too, sampling the same grid
    exported = load_model(out)
    torch.testing.assert_close(exported.sample_latents([PROMPT], noise=noise, seed=7).x, ours, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def cog_runs(tmp_path_factory):
    where = tmp_path_factory.mktemp("cog")
    cog = make_tiny_cogvideox_pipeline(where / "cog")
    return {
        # DOLLAR's consistency student on dollar4 = [999, 749, 499, 249]: an LCMScheduler export
        "consistency": train("dollar", cog, where / "dollar", "roles.student.lora.rank=4", "roles.student.every=1"),
        # a deterministic DDIM student on the 5-step trailing grid: the teacher's DDIM scheduler, trailing
        "euler": train("accvideo", cog, where / "accvideo", "preset=[forward]", "generator.times=accvideo_uniform"),
    }


@pytest.mark.parametrize("name,steps", [("consistency", 4), ("euler", 5)])
def test_a_cogvideox_student_exports_to_a_stock_vp_scheduler(name, steps, cog_runs, tmp_path, capsys, monkeypatch):
    """VP, v-prediction, zero terminal SNR: the export samples in CogVideoXPipeline as fewstep does. The
    pipeline draws a consistency step's noise frames-first (B, F, C, H, W); the test draws it from the same
    generator in fewstep's (B, C, F, H, W) layout, so the two use the same noise at every position."""
    import diffusers.schedulers.scheduling_lcm as lcm
    from diffusers import CogVideoXPipeline

    run, out = cog_runs[name], tmp_path / "export"
    rc, stdout, err = cli(capsys, "export", run, "--out", out)
    assert rc == 0 and "note:" not in stdout, err
    record = json.loads((out / "export.json").read_text())
    assert record["exact"] and record["scheduler"]["class"] == ("LCMScheduler" if name == "consistency"
                                                                 else "CogVideoXDDIMScheduler")
    student = load_model(run / "student")
    noise = torch.randn(student.latent_shape(1), generator=torch.Generator().manual_seed(3))  # (B, C, F, H, W)
    ours = student.sample_latents([PROMPT], noise=noise, seed=7).x
    generator = torch.Generator().manual_seed(7)

    def randn_tensor(shape, generator_=None, device=None, dtype=None, **_):
        b, f, c, *hw = shape
        return torch.randn((b, c, f, *hw), generator=generator, dtype=dtype).permute(0, 2, 1, 3, 4)

    monkeypatch.setattr(lcm, "randn_tensor", randn_tensor)
    pipe = CogVideoXPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPT, height=16, width=16, num_frames=9, num_inference_steps=steps, guidance_scale=1.0,
                  latents=noise.permute(0, 2, 1, 3, 4).clone(), max_sequence_length=16, output_type="latent").frames
    torch.testing.assert_close(theirs.permute(0, 2, 1, 3, 4), ours, rtol=1e-4, atol=1e-4)
    exported = load_model(out)  # fewstep reads the export (an LCMScheduler's trained betas) as well
    torch.testing.assert_close(exported.sample_latents([PROMPT], noise=noise, seed=7).x, ours, rtol=1e-4, atol=1e-4)


def test_a_hunyuan_student_exports_with_its_embedded_guidance_and_the_pipelines_own_sigmas(tmp_path, capsys):
    """HunyuanVideoPipeline hands the scheduler sigmas of its own (linspace(1, 0, N + 1)) and takes the
    embedded guidance as guidance_scale: export.json's call reproduces the student."""
    from diffusers import HunyuanVideoPipeline

    model = make_tiny_hunyuan_pipeline(tmp_path / "hunyuan")
    run = train("dollar", model, tmp_path / "run", "generator.times=uniform4", "roles.student.every=1")
    rc, _, err = cli(capsys, "export", run, "--out", tmp_path / "out")
    assert rc == 0, err
    record = json.loads((tmp_path / "out" / "export.json").read_text())
    call = record["call"]
    assert record["exact"] and call["guidance_scale"] == 6.0 and call["true_cfg_scale"] == 1.0
    student = load_model(run / "student")
    noise = torch.randn(student.latent_shape(1), generator=torch.Generator().manual_seed(3))
    ours = student.sample_latents([PROMPT], noise=noise, seed=7).x
    pipe = HunyuanVideoPipeline.from_pretrained(tmp_path / "out", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(7)
    theirs = pipe(PROMPT, latents=noise.clone(), output_type="latent", **call).frames
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_lora_only_export_loads_into_the_teacher_pipeline(runs, wan_dir, tmp_path, capsys):
    from diffusers import WanPipeline

    rc, _, err = cli(capsys, "export", runs["lora"], "--out", tmp_path / "full")
    assert rc == 0, err
    rc, stdout, err = cli(capsys, "export", runs["lora"], "--out", tmp_path / "lora", "--lora-only")
    assert rc == 0 and "load_lora_weights" in stdout, err
    pipe = WanPipeline.from_pretrained(wan_dir, local_files_only=True)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(tmp_path / "lora")
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused = pipe.transformer.state_dict()
    exported = WanPipeline.from_pretrained(tmp_path / "full", local_files_only=True).transformer.state_dict()
    changed = 0
    for key, want in exported.items():
        torch.testing.assert_close(fused[key], want, rtol=0, atol=1e-6)
        changed += not torch.equal(want, before[key])
    assert changed > 0


def test_a_grid_no_stock_scheduler_visits_is_exported_with_the_nearest_and_a_note(wan_dir, tmp_path, capsys):
    # dollar4 = [999, 749, 499, 249] starts at t = 0.999 on a flow teacher: σ_0 < 1, which no stock grid has
    run = train("dollar", wan_dir, tmp_path / "dollar4", "roles.student.every=1")
    rc, stdout, err = cli(capsys, "export", run, "--out", tmp_path / "out")
    assert rc == 0, err
    record = json.loads((tmp_path / "out" / "export.json").read_text())
    assert not record["exact"] and 1e-4 < record["max_sigma_gap"] < 1e-3
    assert "note: no stock FlowMatchEulerDiscreteScheduler" in stdout


def test_fit_reproduces_uniform_grids_and_finds_the_nearest_otherwise():
    from fewstep.diffusion.schedules import FlowMatching

    schedule = FlowMatching(shift=3.0)
    for n in (1, 2, 3, 4, 8):
        t = torch.linspace(1, 0, n + 1, dtype=torch.float64)[:-1]
        sigmas = schedule.sigma(t).numpy()
        grid, gap = fit_flow_scheduler(sigmas)
        assert gap < 1e-6, (n, gap)
        np.testing.assert_allclose(stock_sigmas(n, grid["shift"], grid["shift_terminal"]), sigmas, atol=1e-6)
    keys = schedule.sigma(torch.tensor([1.0, 0.9651, 0.9130, 0.8235, 0.6363], dtype=torch.float64)).numpy()
    grid, gap = fit_flow_scheduler(keys)
    assert 1e-4 < gap < 0.05
    assert gap <= np.abs(stock_sigmas(5, 3.0, float(keys[-1])) - keys).max() + 1e-12  # no worse than the teacher's shift


def test_bad_exports_are_one_line(runs, wan_dir, teacher_dir, tmp_path, capsys):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    toy = train("finetune", teacher_dir, tmp_path / "toy_run")
    cases = [
        (["export", toy, "--out", tmp_path / "a", "--lora-only"], "not a diffusers pipeline"),
        (["export", toy, "--out", tmp_path / "a", "--step", "2"], "--step 2: run"),
        (["export", empty, "--out", tmp_path / "a"], "has no checkpoint to export"),
        (["export", tmp_path / "missing", "--out", tmp_path / "a"], "does not exist"),
        (["export", runs["euler"], "--out", tmp_path / "a", "--lora-only"], "is not a LoRA role"),
    ]
    for argv, message in cases:
        rc, _, err = cli(capsys, *argv)
        assert rc == 2 and err.count("\n") == 1 and message in err, err
        assert not (tmp_path / "a").exists()
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "mine.txt").write_text("x")
    rc, _, err = cli(capsys, "export", runs["euler"], "--out", keep)
    assert rc == 2 and "exists and is not empty" in err and (keep / "mine.txt").read_text() == "x"


def test_a_toy_run_exports_any_of_its_checkpoints(teacher_dir, tmp_path, capsys):
    """``export --step N`` on a toy run writes the student as RUN/student held it after step N: the latest
    equals RUN/student, an earlier one is the EMA of that checkpoint (and differs from the latest)."""
    from safetensors.torch import load_file

    from fewstep.models.pipeline import VideoPipeline

    run = train("finetune", teacher_dir, tmp_path / "toy_run", "train.steps=4", "train.checkpoint_every=2")
    rc, out, _ = cli(capsys, "export", run, "--out", tmp_path / "last")
    assert rc == 0 and "step_000004" in out
    rc, _, _ = cli(capsys, "export", run, "--step", "2", "--out", tmp_path / "early")
    assert rc == 0
    student, last, early = (load_file(d / "backbone.safetensors") for d in
                            (run / "student", tmp_path / "last", tmp_path / "early"))
    assert all(torch.equal(student[k], last[k]) for k in student)
    ema = load_file(run / "checkpoints" / "step_000002" / "ema" / "student.safetensors")
    assert all(torch.equal(early[k], ema[f"backbone.module.{k}"]) for k in early)
    assert any(not torch.equal(early[k], last[k]) for k in early)
    assert VideoPipeline.load(tmp_path / "early").config == VideoPipeline.load(run / "student").config
