"""CogVideoX (1.0 and 1.5) and HunyuanVideo behind the pipeline seam: tiny random pipelines built here
(nothing downloaded) load from their directories, encode captions as their pipelines do, sample exactly
as diffusers' own pipelines do from the same initial latents (CogVideoX: DDIM with its VP v-prediction
schedule, CFG; HunyuanVideo: embedded guidance, optional true CFG), decode as they do, and save and
reload; settings a pipeline class does not take are one-line errors."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

from fewstep.diffusion.schedules import VPDiscrete
from fewstep.errors import UserError
from fewstep.models.diffusers_family import COGVIDEOX, HUNYUAN, DiffusersSettings, DiffusersVideoModel
from fewstep.models.family import load_model, model_family
from helpers import (TINY_PROMPT_TEMPLATE, cli, make_tiny_cogvideox_pipeline, make_tiny_hunyuan_pipeline,
                     perturb)

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a cat runs in the park"
CLIP = {"height": 16, "width": 16, "num_frames": 9, "max_sequence_length": 16}  # the tiny pipelines' clip


def _diffusers(cls_name, directory):
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(directory, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """CogVideoX 1.0 (rotary embeddings), CogVideoX 1.5 (``patch_size_t`` 2) and HunyuanVideo directories."""
    root = tmp_path_factory.mktemp("pipelines")
    return {"cogvideox": make_tiny_cogvideox_pipeline(root / "cogvideox"),
            "cogvideox15": make_tiny_cogvideox_pipeline(root / "cogvideox15", patch_size_t=2),
            "hunyuan": make_tiny_hunyuan_pipeline(root / "hunyuan")}


@pytest.fixture(scope="module")
def theirs(dirs):
    """diffusers' own pipelines loaded from the same directories."""
    return {"cogvideox": _diffusers("CogVideoXPipeline", dirs["cogvideox"]),
            "cogvideox15": _diffusers("CogVideoXPipeline", dirs["cogvideox15"]),
            "hunyuan": _diffusers("HunyuanVideoPipeline", dirs["hunyuan"])}


def _noise(model, seed=1):
    return torch.randn(model.latent_shape(1), generator=torch.Generator().manual_seed(seed))


def _with_guidance(model, scale):
    """The model with another ``embedded_guidance_scale`` in its settings."""
    settings = model.settings.model_copy(update={"embedded_guidance_scale": scale})
    return model.with_settings(settings)


def _frames_first(latents):
    return latents.permute(0, 2, 1, 3, 4).clone()  # (B, C, F, H, W) <-> (B, F, C, H, W)


# ---------------------------------------------------------------------------------------------
# CogVideoX
# ---------------------------------------------------------------------------------------------

def test_a_cogvideox_directory_is_a_model(dirs, theirs):
    model, pipe = load_model(dirs["cogvideox"]), theirs["cogvideox"]
    assert model_family(dirs["cogvideox"]).name == "diffusers" and isinstance(model, DiffusersVideoModel)
    assert tuple(model.geometry) == (9, 16, 16) and model.latent_shape(2) == (2, 4, 3, 4, 4)
    assert model.text_dim == 16 and model.hidden_dim == 32  # T5 d_model; heads × head dim
    assert model.sampling.sampler == "ddim" and model.sampling.cfg_scale == 6.0
    # the VP schedule of CogVideoXDDIMScheduler: SNR shift 3, zero terminal SNR, v-prediction
    schedule = model.denoiser.schedule
    assert isinstance(schedule, VPDiscrete) and model.denoiser.prediction_type == "v"
    assert schedule.snr_shift_scale == 3.0 and schedule.zero_terminal_snr
    torch.testing.assert_close(schedule.alphas_cumprod, pipe.scheduler.alphas_cumprod.double(), rtol=0, atol=1e-12)
    # DDIM's trailing grid, as the scheduler sets it
    pipe.scheduler.set_timesteps(4)
    times = model.sampling_times(4)
    assert schedule.model_timestep(times[:-1]).tolist() == pipe.scheduler.timesteps.tolist() == [999, 749, 499, 249]
    # captions as CogVideoXPipeline encodes them: padded to max_sequence_length, every position attended to
    cond = model.encode_prompts([PROMPT, ""])
    assert cond.context.shape == (2, 16, 16) and cond.mask is None
    torch.testing.assert_close(cond.context, pipe._get_t5_prompt_embeds([PROMPT, ""], max_sequence_length=16))
    # the adapter's rotary embeddings are the pipeline's
    x = torch.zeros(model.latent_shape(1))
    reference = pipe._prepare_rotary_positional_embeddings(16, 16, 3, "cpu")
    for ours, ref in zip(model.denoiser.backbone._rotary(x), reference):
        torch.testing.assert_close(ours, ref)
    with pytest.raises(UserError, match="--frames 5: this model's VAE takes 8k \\+ 1 frames \\(e.g. 1 or 9\\)"):
        model.set_geometry(frames=5)  # 2 latent frames would decode to 8
    with pytest.raises(UserError, match="--width 20: must be a multiple of 8"):
        model.set_geometry(width=20)


@pytest.mark.parametrize("shift,zero_snr", [(1.0, False), (3.0, False), (1.0, True), (3.0, True)])
def test_vp_schedule_of_cogvideox_schedulers(shift, zero_snr):
    """ᾱ of CogVideoXDDIMScheduler/CogVideoXDPMScheduler: betas, SNR shift, then the zero-terminal-SNR rescale."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

    from fewstep.models.diffusers_family import _vp_schedule

    for cls in (CogVideoXDDIMScheduler, CogVideoXDPMScheduler):
        scheduler = cls(snr_shift_scale=shift, rescale_betas_zero_snr=zero_snr, prediction_type="v_prediction")
        schedule, prediction = _vp_schedule(scheduler)
        assert prediction == "v" and schedule.snr_shift_scale == shift
        torch.testing.assert_close(schedule.alphas_cumprod, scheduler.alphas_cumprod.double(), rtol=0, atol=1e-12)
        snr = schedule.alphas_cumprod / (1 - schedule.alphas_cumprod)
        plain = VPDiscrete(zero_terminal_snr=False).alphas_cumprod
        if not zero_snr:  # the shift divides every SNR by s
            torch.testing.assert_close(snr, plain / (1 - plain) / shift)


@pytest.mark.parametrize("name,cfg", [("cogvideox", 1.0), ("cogvideox", 6.0), ("cogvideox15", 6.0)])
def test_cogvideox_sampling_matches_the_diffusers_pipeline(dirs, theirs, name, cfg):
    """DDIM on the trailing grid with CFG uncond + w·(cond − uncond) reproduces CogVideoXPipeline's latents
    (frames-first there); CogVideoX 1.5's latents carry the pipeline's padding frame."""
    model = load_model(dirs[name])
    noise = _noise(model)
    assert noise.shape[2] == (4 if name == "cogvideox15" else 3)  # 9 frames: 3 latent frames (+ 1 padding)
    ours = model.sample_latents([PROMPT], steps=4, cfg_scale=cfg, noise=noise).x
    ref = theirs[name](PROMPT, num_inference_steps=4, guidance_scale=cfg, latents=_frames_first(noise),
                       output_type="latent", **CLIP).frames
    torch.testing.assert_close(ours, _frames_first(ref), rtol=1e-4, atol=1e-4)
    assert float((ours - noise).abs().mean()) > 0.05  # the sampler moved


@pytest.mark.parametrize("name", ["cogvideox", "cogvideox15"])
def test_cogvideox_decode_matches_and_encode_scales(dirs, theirs, name):
    model = load_model(dirs[name])
    noise = _noise(model, seed=2)
    latents = model.sample_latents([PROMPT], steps=2, noise=noise).x
    video = theirs[name](PROMPT, num_inference_steps=2, latents=_frames_first(noise), output_type="np",
                         **CLIP).frames  # (1, T, H, W, 3) in [0, 1]
    with torch.no_grad():
        frames = model.decode(latents)  # (1, T, H, W, 3) in [−1, 1]
        z = model.encode(frames)
        raw = model.vae.encode(frames.permute(0, 4, 1, 2, 3)).latent_dist.mode()  # (1, C, 3, H', W')
    assert frames.shape == (1, 9, 16, 16, 3)
    np.testing.assert_allclose((frames.numpy() + 1) / 2, video, atol=2e-3)
    # z = mode(E(x)) · scaling_factor; CogVideoX 1.5 repeats the first latent frame in front as padding
    assert z.shape == model.latent_shape(1)
    pad = z.shape[2] - raw.shape[2]
    torch.testing.assert_close(z[:, :, pad:] / model.vae.config.scaling_factor, raw)
    torch.testing.assert_close(z[:, :, :pad], z[:, :, pad:2 * pad])
    with pytest.raises(UserError, match="latents with 5 frames"):
        model.decode(torch.zeros(1, 4, 5, 4, 4))


def test_a_dpm_teacher_loads_and_samples_with_ddim(dirs, tmp_path):
    """CogVideoXDPMScheduler: same VP schedule, sampled with DDIM on the same grid (module doc)."""
    dpm = load_model(make_tiny_cogvideox_pipeline(tmp_path / "dpm", scheduler="dpm"))  # same weights as "cogvideox"
    ddim = load_model(dirs["cogvideox"])
    assert type(dpm.pipe.scheduler).__name__ == "CogVideoXDPMScheduler"
    torch.testing.assert_close(dpm.denoiser.schedule.alphas_cumprod, ddim.denoiser.schedule.alphas_cumprod)
    noise = _noise(ddim)
    torch.testing.assert_close(dpm.sample_latents([PROMPT], noise=noise).x,
                               ddim.sample_latents([PROMPT], noise=noise).x)


def test_fixed_position_embeddings_take_their_caption_length(dirs):
    """Without rotary embeddings CogVideoX adds sin-cos embeddings over max_text_seq_length caption tokens."""
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

    transformer = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                              out_channels=4, time_embed_dim=8, text_embed_dim=16, num_layers=1,
                                              sample_width=4, sample_height=4, sample_frames=9, patch_size=2,
                                              max_text_seq_length=16)
    pipe = CogVideoXPipeline.from_pretrained(dirs["cogvideox"], transformer=transformer, local_files_only=True)
    settings = DiffusersSettings(frames=9, height=16, width=16, max_sequence_length=16, sampling={"steps": 2})
    DiffusersVideoModel(pipe, COGVIDEOX, settings)
    with pytest.raises(UserError, match="max_sequence_length 12 does not fit .* take 16 caption tokens"):
        DiffusersVideoModel(pipe, COGVIDEOX, settings.model_copy(update={"max_sequence_length": 12}))


# ---------------------------------------------------------------------------------------------
# HunyuanVideo
# ---------------------------------------------------------------------------------------------

def test_a_hunyuan_directory_is_a_model(dirs, theirs):
    model, pipe = load_model(dirs["hunyuan"]), theirs["hunyuan"]
    assert isinstance(model, DiffusersVideoModel) and model.latent_shape(2) == (2, 4, 3, 4, 4)
    assert model.text_dim == 16 and model.hidden_dim == 20  # Llama hidden_size; heads × head dim
    assert model.denoiser.schedule.shift == 7.0 and model.denoiser.prediction_type == "flow"
    assert model.sampling.cfg_scale == 1.0 and model.settings.embedded_guidance_scale == 6.0
    assert model.denoiser.backbone.embedded_guidance_scale == 6.0
    # captions exactly as HunyuanVideoPipeline.encode_prompt: Llama in the template, cropped, masked; CLIP pooled
    cond = model.encode_prompts([PROMPT, ""])
    context, pooled, mask = pipe.encode_prompt([PROMPT, ""], prompt_template=TINY_PROMPT_TEMPLATE,
                                               max_sequence_length=16)
    assert cond.context.shape == (2, 16, 16) and cond.extra["pooled_projections"].shape == (2, 8)
    torch.testing.assert_close(cond.context, context)
    torch.testing.assert_close(cond.extra["pooled_projections"], pooled)
    assert torch.equal(cond.mask, mask.bool()) and cond.mask.sum(1).tolist()[0] == 6  # the template token cropped
    # the Euler grid of the pipeline: sigmas 1 − i/N, shifted by the scheduler
    pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, 4)[:-1])
    sigmas = model.denoiser.schedule.sigma(model.sampling_times(3))
    torch.testing.assert_close(sigmas.float(), pipe.scheduler.sigmas)


@pytest.mark.parametrize("cfg,guidance", [(1.0, 6.0), (4.0, 6.0), (1.0, 3.5)])
def test_hunyuan_sampling_matches_the_diffusers_pipeline(dirs, theirs, cfg, guidance):
    """Euler on the shifted uniform grid with the embedded guidance as a transformer input and, when cfg ≠ 1,
    true CFG with the negative prompt reproduces HunyuanVideoPipeline's latents."""
    model = _with_guidance(load_model(dirs["hunyuan"]), guidance)
    assert model.denoiser.backbone.embedded_guidance_scale == guidance
    noise = _noise(model)
    ours = model.sample_latents([PROMPT], steps=3, cfg_scale=cfg, noise=noise).x
    ref = theirs["hunyuan"](PROMPT, negative_prompt="" if cfg != 1 else None, true_cfg_scale=cfg,
                            guidance_scale=guidance, num_inference_steps=3, latents=noise.clone(),
                            prompt_template=TINY_PROMPT_TEMPLATE, output_type="latent", **CLIP).frames
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert float((ours - noise).abs().mean()) > 0.05


def test_hunyuan_embedded_guidance_changes_the_sample(dirs):
    model = load_model(dirs["hunyuan"])
    noise = _noise(model)
    a = model.sample_latents([PROMPT], steps=2, noise=noise).x
    b = _with_guidance(model, 1.0).sample_latents([PROMPT], steps=2, noise=noise).x
    assert float((a - b).abs().max()) > 1e-3


def test_hunyuan_decode_matches_and_encode_scales(dirs, theirs):
    model = load_model(dirs["hunyuan"])
    noise = _noise(model, seed=2)
    latents = model.sample_latents([PROMPT], steps=2, noise=noise).x
    video = theirs["hunyuan"](PROMPT, num_inference_steps=2, latents=noise.clone(),
                              prompt_template=TINY_PROMPT_TEMPLATE, output_type="np", **CLIP).frames
    with torch.no_grad():
        frames = model.decode(latents)
        z = model.encode(frames)
        raw = model.vae.encode(frames.permute(0, 4, 1, 2, 3)).latent_dist.mode()
    np.testing.assert_allclose((frames.numpy() + 1) / 2, video, atol=2e-3)
    assert z.shape == model.latent_shape(1)
    torch.testing.assert_close(z / model.vae.config.scaling_factor, raw)


# ---------------------------------------------------------------------------------------------
# Both: persistence, the CLI, settings
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,cls_name", [("cogvideox15", "CogVideoXPipeline"), ("hunyuan", "HunyuanVideoPipeline")])
def test_save_reload_keeps_weights_settings_and_sampler(dirs, tmp_path, name, cls_name):
    model = load_model(dirs[name])
    model.denoiser  # loaded, as a recipe's model is before it is copied
    student = copy.deepcopy(model)  # recipes copy the model for the exported student
    assert student.pipe.transformer is student.transformer is student.denoiser.backbone.model
    perturb(student.transformer, scale=0.05, seed=3)
    student.sampling = student.sampling.model_copy(update={"times": [1.0, 0.5, 0.0], "steps": 2, "cfg_scale": None})
    student.save(tmp_path / "student")
    again = load_model(tmp_path / "student")
    assert again.sampling.times == [1.0, 0.5, 0.0] and again.default_steps() == 2
    assert again.settings == student.settings  # the prompt template and embedded guidance too
    for (key, a), b in zip(student.transformer.state_dict().items(), again.transformer.state_dict().values()):
        assert torch.equal(a, b), key
    noise = _noise(model, seed=3)
    torch.testing.assert_close(again.sample_latents([PROMPT], noise=noise).x,
                               student.sample_latents([PROMPT], noise=noise).x)
    assert not torch.allclose(again.sample_latents([PROMPT], noise=noise).x,
                              model.sample_latents([PROMPT], steps=2, noise=noise, cfg_scale=1.0).x)
    _diffusers(cls_name, tmp_path / "student")  # still a diffusers pipeline


@pytest.mark.parametrize("name,frames,width", [("cogvideox15", 17, 8), ("hunyuan", 5, 32)])
def test_generate_cli(dirs, tmp_path, capsys, name, frames, width):
    rc, _, err = cli(capsys, "generate", "--model", dirs[name], "--prompt", PROMPT, "--steps", "2", "--frames",
                     frames, "--width", width, "--out", tmp_path / "gen")
    assert rc == 0, err
    samples = np.load(tmp_path / "gen" / "samples.npz")
    assert samples["frames"].shape == (1, frames, 16, width, 3) and samples["frames"].dtype == np.uint8


def test_cogvideox15_sizes_beyond_its_rotary_grid_are_one_line(dirs, tmp_path, capsys):
    rc, _, err = cli(capsys, "generate", "--model", dirs["cogvideox15"], "--prompt", PROMPT, "--width", "24",
                     "--out", tmp_path / "gen")
    assert rc == 2 and "--width 24: this CogVideoX 1.5 transformer's rotary embeddings cover at most 16" in err, err
    assert err.count("\n") == 1


@pytest.mark.parametrize("name,update,message", [
    ("cogvideox", {"prompt_template": {"template": "{}"}}, "prompt_template does not apply to a CogVideoXPipeline"),
    ("hunyuan", {"embedded_guidance_scale": None}, "embedded_guidance_scale must be set"),
    ("hunyuan", {"prompt_template": {"template": "no slot"}}, "must contain '{}'"),
])
def test_settings_a_pipeline_cannot_take_are_one_line(dirs, tmp_path, capsys, name, update, message):
    directory = shutil.copytree(dirs[name], tmp_path / name)
    settings = json.loads((directory / "fewstep_model.json").read_text())
    (directory / "fewstep_model.json").write_text(json.dumps({**settings, **update}))
    rc, _, err = cli(capsys, "generate", "--model", directory, "--prompt", PROMPT, "--out", tmp_path / "gen")
    assert rc == 2 and message in err and err.count("\n") == 1, err


def test_without_fewstep_settings_the_pipelines_defaults_apply(dirs, tmp_path):
    """CogVideoX: the transformer's sample size, 226 caption tokens, DDIM 50 steps CFG 6; HunyuanVideo: 129 × 720 ×
    1280, 256 tokens in the default template, embedded guidance 6, no CFG."""
    for name in ("cogvideox", "hunyuan"):
        directory = shutil.copytree(dirs[name], tmp_path / name)
        (directory / "fewstep_model.json").unlink()
        s = load_model(directory).settings
        if name == "cogvideox":
            assert (s.frames, s.height, s.width, s.max_sequence_length) == (9, 16, 16, 226)
            assert (s.sampling.sampler, s.sampling.steps, s.sampling.cfg_scale) == ("ddim", 50, 6.0)
        else:
            assert (s.frames, s.height, s.width, s.max_sequence_length) == (129, 720, 1280, 256)
            assert s.prompt_template is None and s.embedded_guidance_scale == 6.0
            assert s.sampling.cfg_scale == 1.0 and s.sampling.spacing == "uniform"


def test_unsupported_pipelines_name_all_supported_ones(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(UserError, match="supported: WanPipeline, CogVideoXPipeline, HunyuanVideoPipeline, "
                                        "WanImageToVideoPipeline, CogVideoXImageToVideoPipeline$"):
        load_model(tmp_path)
