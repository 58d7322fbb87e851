"""The diffusers family behind the pipeline seam: a tiny random ``WanPipeline`` built here (nothing
downloaded) loads from its directory, samples exactly as diffusers' own pipeline does from the same
initial latents, decodes as it does, saves and reloads, and runs through the CLI; bad input is one
line with exit 2."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from fewstep.errors import UserError
from fewstep.models.diffusers_family import DiffusersVideoModel
from fewstep.models.family import load_model, model_family
from fewstep.models.pipeline import VideoPipeline
from helpers import cli

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a cat runs in the park"


@pytest.fixture(scope="module")
def diffusers_wan(wan_dir):
    from diffusers import WanPipeline

    return WanPipeline.from_pretrained(wan_dir, local_files_only=True)


def test_a_pipeline_directory_is_a_model(wan_dir):
    model = load_model(wan_dir)
    assert model_family(wan_dir).name == "diffusers" and isinstance(model, DiffusersVideoModel)
    assert tuple(model.geometry) == (9, 32, 32) and model.latent_shape(2) == (2, 4, 3, 4, 4)
    assert model.text_dim == 16 and model.hidden_dim == 16 and list(model.denoisers()) == ["transformer"]
    assert model.denoiser.schedule.shift == 3.0 and model.denoiser.prediction_type == "flow"
    cond = model.encode_prompts([PROMPT, ""])
    assert cond.context.shape == (2, 16, 16)  # padded to max_sequence_length, as WanPipeline pads
    assert cond.mask.sum(1).tolist() == [7, 1] and bool((cond.context[1, 1:] == 0).all())  # zeros after the tokens


@pytest.mark.parametrize("cfg", [1.0, 5.0])
def test_sampling_matches_the_diffusers_pipeline(wan_dir, diffusers_wan, cfg):
    """Euler on the diffusers grid with CFG uncond + w·(cond − uncond) reproduces WanPipeline's latents."""
    model = load_model(wan_dir)
    noise = torch.randn(model.latent_shape(1), generator=torch.Generator().manual_seed(1))
    ours = model.sample_latents([PROMPT], steps=3, cfg_scale=cfg, noise=noise).x
    theirs = diffusers_wan(PROMPT, height=32, width=32, num_frames=9, num_inference_steps=3, guidance_scale=cfg,
                           latents=noise.clone(), max_sequence_length=16, output_type="latent").frames
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert float((ours - noise).abs().mean()) > 0.05  # the sampler moved


def test_decode_matches_the_diffusers_pipeline_and_encode_normalises(wan_dir, diffusers_wan):
    model = load_model(wan_dir)
    noise = torch.randn(model.latent_shape(1), generator=torch.Generator().manual_seed(2))
    latents = model.sample_latents([PROMPT], steps=2, noise=noise).x
    video = diffusers_wan(PROMPT, height=32, width=32, num_frames=9, num_inference_steps=2, latents=noise.clone(),
                          max_sequence_length=16, output_type="np").frames  # (1, T, H, W, 3) in [0, 1]
    with torch.no_grad():
        frames = model.decode(latents)  # (1, T, H, W, 3) in [−1, 1]
    np.testing.assert_allclose((frames.numpy() + 1) / 2, video, atol=2e-3)
    # encode gives latents in the transformer's normalised space: z = (mode(E(x)) − mean) / std
    with torch.no_grad():
        z = model.encode(frames)
        raw = model.vae.encode(frames.permute(0, 4, 1, 2, 3)).latent_dist.mode()
    assert z.shape == model.latent_shape(1)
    mean = torch.tensor(model.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(model.vae.config.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(z * std + mean, raw)


def test_save_reload_keeps_weights_and_sampler(wan_dir, tmp_path):
    from diffusers import WanPipeline

    model = load_model(wan_dir)
    assert "transformer" not in model._modules  # loaded on first use
    model.denoiser  # as a recipe's model, whose roles are built from it
    student = copy.deepcopy(model)  # recipes copy the model for the exported student
    assert student.pipe.transformer is student.transformer is student.denoiser.backbone.model
    assert student.transformer is not model.transformer
    with torch.no_grad():
        next(student.transformer.parameters()).add_(0.5)
    student.sampling = student.sampling.model_copy(update={"times": [1.0, 0.5, 0.0], "steps": 2, "cfg_scale": None})
    student.save(tmp_path / "student")
    again = load_model(tmp_path / "student")
    assert again.sampling.times == [1.0, 0.5, 0.0] and again.default_steps() == 2
    for (name, a), b in zip(student.transformer.state_dict().items(), again.transformer.state_dict().values()):
        assert torch.equal(a, b), name
    noise = torch.randn(model.latent_shape(1), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(again.sample_latents([PROMPT], noise=noise).x,
                               student.sample_latents([PROMPT], noise=noise).x)
    WanPipeline.from_pretrained(tmp_path / "student", local_files_only=True)  # still a diffusers pipeline


def test_generate_cli_on_a_pipeline_directory(wan_dir, tmp_path, capsys):
    rc, out, err = cli(capsys, "generate", "--model", wan_dir, "--prompt", PROMPT, "--prompt", "free text works",
                       "--steps", "2", "--frames", "5", "--height", "16", "--width", "48",
                       "--negative-prompt", "blurry", "--out", tmp_path / "gen", "--scale", "1")
    assert rc == 0, err
    samples = np.load(tmp_path / "gen" / "samples.npz")
    assert samples["frames"].shape == (2, 5, 16, 48, 3) and samples["frames"].dtype == np.uint8
    assert len(list((tmp_path / "gen").glob("*.mp4"))) == 2


def test_sampler_and_grid_apply_to_a_pipeline_directory(wan_dir, tmp_path, capsys):
    """--sampler/--grid replace a diffusers model's own sampling as a toy model's (eval/runner.set_sampling)."""
    from fewstep.eval.runner import set_sampling
    from fewstep.models.family import load_model

    model = load_model(wan_dir)
    set_sampling(model, "consistency", "uniform2_shift3")
    assert model.sampling.sampler == "consistency" and model.sampling.times == [1.0, 0.75, 0.0]
    torch.testing.assert_close(model.sampling_times(), torch.tensor([1.0, 0.75, 0.0], dtype=torch.float64))
    rc, _, err = cli(capsys, "generate", "--model", wan_dir, "--prompt", PROMPT, "--sampler", "consistency",
                     "--grid", "uniform2_shift3", "--frames", "5", "--height", "16", "--width", "16",
                     "--out", tmp_path / "gen", "--scale", "1")
    assert rc == 0, err
    assert np.load(tmp_path / "gen" / "samples.npz")["frames"].shape == (1, 5, 16, 16, 3)


@pytest.mark.parametrize("flags,message", [
    (["--frames", "8"], "--frames 8: this model's VAE takes 4k + 1 frames (e.g. 5 or 9)"),
    (["--height", "20"], "--height 20: must be a multiple of 16"),
    (["--width", "0"], "--width 0 is invalid"),
])
def test_a_size_the_vae_cannot_take_is_one_line(wan_dir, tmp_path, capsys, flags, message):
    rc, _, err = cli(capsys, "generate", "--model", wan_dir, "--prompt", PROMPT, "--out", tmp_path / "gen", *flags)
    assert rc == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "gen").exists()


def test_toy_models_keep_their_size_and_grammar(teacher_dir, tmp_path, capsys):
    rc, _, err = cli(capsys, "generate", "--model", teacher_dir, "--prompt", "a red circle moves left", "--height",
                     "64", "--out", tmp_path / "gen")
    assert rc == 2 and "this toy model makes" in err and err.count("\n") == 1, err
    rc, _, err = cli(capsys, "generate", "--model", teacher_dir, "--prompt", PROMPT, "--out", tmp_path / "gen")
    assert rc == 2 and err.count("\n") == 1 and not (tmp_path / "gen").exists(), err


def test_unsupported_or_broken_pipelines_are_one_line(wan_dir, tmp_path, capsys):
    other = tmp_path / "flux"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    rc, _, err = cli(capsys, "generate", "--model", other, "--prompt", PROMPT, "--out", tmp_path / "gen")
    assert rc == 2 and "diffusers pipeline class 'FluxPipeline' is not supported; supported: WanPipeline" in err, err
    assert err.count("\n") == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="model_index.json of a diffusers pipeline"):
        load_model(empty)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    rc, _, err = cli(capsys, "generate", "--model", broken, "--prompt", PROMPT, "--out", tmp_path / "gen")
    assert rc == 2 and "the WanPipeline could not be loaded" in err and err.count("\n") == 1, err


def test_toy_pipeline_is_still_the_toy_family(teacher_dir):
    assert isinstance(load_model(teacher_dir), VideoPipeline) and model_family(teacher_dir).name == "toy"


@pytest.mark.parametrize("model", ["wan", "toy-teacher"])
def test_generate_in_bf16_is_close_to_fp32(model, wan_dir, tmp_path, capsys):
    """--dtype bf16 runs the networks in bf16 (latents stay fp32): the same videos up to bf16 round-off."""
    name = str(wan_dir) if model == "wan" else model
    prompt = PROMPT if model == "wan" else "a red circle moves left"
    videos = {}
    for dtype in ("fp32", "bf16"):
        rc, _, err = cli(capsys, "generate", "--model", name, "--prompt", prompt, "--out", tmp_path / dtype,
                         "--steps", "4", "--dtype", dtype, "--device", "cpu")
        assert rc == 0, err
        videos[dtype] = np.load(tmp_path / dtype / "samples.npz")["frames"].astype(np.float64)
    gap = np.abs(videos["bf16"] - videos["fp32"]).mean()
    assert 0 < gap < 8, gap  # mean |Δ| in uint8 levels
    rc, _, err = cli(capsys, "generate", "--model", name, "--prompt", prompt, "--out", tmp_path / "x", "--dtype", "fp16")
    assert rc == 2 and "--dtype must be auto, bf16 or fp32" in err
