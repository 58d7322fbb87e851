"""Image-to-video pipelines behind the pipeline seam (models/diffusers_i2v.py): tiny random
``WanImageToVideoPipeline`` (Wan 2.1 I2V with a CLIP image encoder, and the encoder-less Wan 2.2 A14B /
FUN-inp form, alone or as Wan 2.2's two experts) and ``CogVideoXImageToVideoPipeline`` (1.0, and 1.5 with
``ofs`` and a padding frame) built here sample exactly as diffusers' pipelines do from the same noise and
image; CFG keeps the image in the unconditional branch; ``fewstep cache`` stores the first-frame condition;
a tiny Wan I2V distils by config, resumes exactly and exports to the diffusers I2V pipeline, which
reproduces ``fewstep generate`` (a CogVideoX 1.5 I2V student too); bad input is one line with exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fewstep.errors import UserError
from fewstep.models.backbones import Conditioning
from fewstep.models.family import load_model
from helpers import TEXT_DIM, assert_same_checkpoint, cli, losses, perturb, tiny_t5_tokenizer


@pytest.fixture(scope="module", autouse=True)
def _one_thread_module():
    """One torch thread for the whole module, module fixtures included (the cache and the reference run are
    compared bit for bit with computations in the tests; a thread count changes float sums)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PROMPT = "a cat runs in the park"
FRAMES, SIZE = 9, 32  # Wan: latents (4, 3, 4, 4)
COG_SIZE = 16  # CogVideoX: latents (4, 3, 4, 4), CogVideoX 1.5: (4, 4, 4, 4)


# ---------------------------------------------------------------------------------------------
# Tiny random I2V pipelines
# ---------------------------------------------------------------------------------------------

def _settings(directory: Path, size: int, sampler: str, cfg_scale: float, length: int = 16) -> None:
    settings = {"frames": FRAMES, "height": size, "width": size, "max_sequence_length": length,
                "sampling": {"sampler": sampler, "steps": 4, "cfg_scale": cfg_scale, "spacing": "diffusers"}}
    (directory / "fewstep_model.json").write_text(json.dumps(settings))


def make_tiny_wan_i2v(directory, *, image_encoder=True, two_experts=False, seed=0) -> Path:
    """A tiny random ``WanImageToVideoPipeline``: UMT5, AutoencoderKLWan (z_dim 4, non-trivial latent
    statistics), a 2-block transformer taking ``cat([x_t, mask (4), image latent])`` = 12 channels, and with
    ``image_encoder`` a 2-layer ``CLIPVisionModel`` + ``CLIPImageProcessor`` (32² crops) feeding its image
    embedder (Wan 2.1 I2V); without, the Wan 2.2 A14B / FUN-inp form, which ``two_experts`` makes Wan 2.2 A14B I2V
    (a second transformer for the low-noise steps, ``boundary_ratio`` 0.9 as the real pipeline's)."""
    from diffusers import (AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline,
                           WanTransformer3DModel)
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config,
                              UMT5EncoderModel)

    torch.manual_seed(seed)
    tokenizer = tiny_t5_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=4, d_ff=32,
                                               num_layers=1, num_heads=4, relative_attention_num_buckets=8))
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.05, 0.0],
                           latents_std=[1.5, 0.8, 1.2, 2.0])
    vision = dict(image_dim=16, added_kv_proj_dim=16) if image_encoder else {}

    def transformer(k):
        model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                      in_channels=12, out_channels=4, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=32,
                                      num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                      rope_max_seq_len=32, **vision)
        return perturb(model, seed=seed + k)

    parts = {"transformer_2": transformer(1), "boundary_ratio": 0.9} if two_experts else {}
    if image_encoder:
        parts["image_encoder"] = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32,
                                                                  num_attention_heads=2, num_hidden_layers=2,
                                                                  image_size=32, patch_size=8))
        parts["image_processor"] = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pipe = WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer(0),
                                   scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), **parts)
    pipe.save_pretrained(directory)
    # a transformer with CLIP image tokens takes 512 caption tokens (diffusers' attention splits the context there)
    _settings(Path(directory), SIZE, "euler", 5.0, 512 if image_encoder else 16)
    return Path(directory)


def make_tiny_cogvideox_i2v(directory, *, v15=False, seed=0) -> Path:
    """A tiny random ``CogVideoXImageToVideoPipeline`` (as tests/helpers.py's CogVideoX, the transformer taking
    ``cat([x_t, image latent])`` = 8 channels); ``v15``: CogVideoX 1.5 I2V (``patch_size_t`` 2, an ``ofs``
    embedding, a VAE with ``invert_scale_latents``)."""
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXImageToVideoPipeline,
                           CogVideoXTransformer3DModel)
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = tiny_t5_tokenizer()
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=4, d_ff=32, num_layers=1,
                                           num_heads=4, relative_attention_num_buckets=8))
    vae = AutoencoderKLCogVideoX(down_block_types=("CogVideoXDownBlock3D",) * 3,
                                 up_block_types=("CogVideoXUpBlock3D",) * 3, block_out_channels=(8, 8, 8),
                                 latent_channels=4, layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
                                 scaling_factor=0.7, invert_scale_latents=v15)
    transformer = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=8,
                                              out_channels=4, time_embed_dim=8, text_embed_dim=TEXT_DIM, num_layers=2,
                                              sample_width=4, sample_height=4, sample_frames=9, patch_size=2,
                                              patch_size_t=2 if v15 else None, temporal_compression_ratio=4,
                                              max_text_seq_length=16, use_rotary_positional_embeddings=True,
                                              ofs_embed_dim=8 if v15 else None)
    perturb(transformer, seed=seed)
    pipe = CogVideoXImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                                         transformer=transformer,
                                         scheduler=CogVideoXDDIMScheduler(prediction_type="v_prediction",
                                                                          timestep_spacing="trailing",
                                                                          rescale_betas_zero_snr=True,
                                                                          snr_shift_scale=3.0))
    pipe.save_pretrained(directory)
    _settings(Path(directory), COG_SIZE, "ddim", 6.0)
    return Path(directory)


def condition_image(size: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB image (size, size, 3) uint8: a colour gradient and a square."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = np.stack([yy, xx, 1 - yy], axis=-1) * g.uniform(0.4, 1.0, 3)
    top, left = g.integers(0, size // 2, 2)
    image[top:top + size // 3, left:left + size // 3] = g.uniform(0, 1, 3)
    return (image * 255).round().astype(np.uint8)


def as_condition(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) → (1, H, W, 3) float in [−1, 1] (utils/frames.to_unit, as --image reads it)."""
    from fewstep.utils.frames import to_unit

    return torch.from_numpy(to_unit(image))[None]


@pytest.fixture(scope="module")
def i2v_dirs(tmp_path_factory):
    where = tmp_path_factory.mktemp("i2v")
    return {"wan": make_tiny_wan_i2v(where / "wan"), "wan22": make_tiny_wan_i2v(where / "wan22", image_encoder=False),
            "wan22x2": make_tiny_wan_i2v(where / "wan22x2", image_encoder=False, two_experts=True),
            "cog": make_tiny_cogvideox_i2v(where / "cog"), "cog15": make_tiny_cogvideox_i2v(where / "cog15", v15=True)}


@pytest.fixture(scope="module")
def models(i2v_dirs):
    return {name: load_model(path) for name, path in i2v_dirs.items()}


def diffusers_pipeline(directory, monkeypatch=None):
    """diffusers' own pipeline of ``directory`` (the class its model_index.json names)."""
    import diffusers
    import diffusers.pipelines.wan.pipeline_wan as wan_t2v
    import diffusers.pipelines.wan.pipeline_wan_i2v as wan_i2v

    if monkeypatch is not None:  # WanImageToVideoPipeline's caption cleaning needs ftfy; WanPipeline's skips it
        monkeypatch.setattr(wan_i2v, "basic_clean", wan_t2v.basic_clean)
    name = json.loads((Path(directory) / "model_index.json").read_text())["_class_name"]
    pipe = getattr(diffusers, name).from_pretrained(directory, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_latents(directory, image, noise, steps, cfg, monkeypatch, seed=None):
    """What diffusers' pipeline samples (latents in fewstep's (B, C, T', H', W') layout) from ``noise`` and the
    uint8 ``image``. CogVideoX I2V draws its image latent from the VAE posterior: here its mode, as fewstep's
    (module doc's deviation)."""
    import PIL.Image
    import diffusers.pipelines.cogvideo.pipeline_cogvideox_image2video as cog_i2v

    pipe = diffusers_pipeline(directory, monkeypatch)
    cog = "CogVideoX" in type(pipe).__name__
    if cog:
        mode = cog_i2v.retrieve_latents
        monkeypatch.setattr(cog_i2v, "retrieve_latents", lambda out, generator=None, sample_mode="sample":
                            mode(out, generator, "argmax"))
    if seed is not None:
        torch.manual_seed(seed)  # the consistency step's noise comes from torch's global generator
    size = image.shape[0]
    length = json.loads((Path(directory) / "fewstep_model.json").read_text())["max_sequence_length"]
    latents = noise.permute(0, 2, 1, 3, 4) if cog else noise.clone()  # CogVideoX: frames-first
    out = pipe(PIL.Image.fromarray(image), PROMPT, height=size, width=size, num_frames=FRAMES,
               num_inference_steps=steps, guidance_scale=cfg, latents=latents, max_sequence_length=length,
               output_type="latent").frames
    return out.permute(0, 2, 1, 3, 4) if cog else out


# ---------------------------------------------------------------------------------------------
# The seam
# ---------------------------------------------------------------------------------------------

def test_i2v_pipelines_are_image_conditioned_models(models, wan_dir):
    wan, wan22, cog, cog15 = (models[k] for k in ("wan", "wan22", "cog", "cog15"))
    assert not load_model(wan_dir).image_conditioned
    for model in models.values():
        assert model.image_conditioned and model.latent_shape(1)[1] == 4
    image = as_condition(condition_image(SIZE))
    visual = wan.encode_images(image)
    assert set(visual) == {"image_latent", "image_mask", "image_embeds"}
    assert visual["image_latent"].shape == visual["image_mask"].shape[:1] + (4, 3, 4, 4)
    # the temporal mask: 4 channels (the VAE's frame group), 1 on the first latent frame only
    assert visual["image_mask"].shape == (1, 4, 3, 4, 4)
    assert visual["image_mask"][:, :, 0].eq(1).all() and visual["image_mask"][:, :, 1:].eq(0).all()
    assert visual["image_embeds"].shape == (1, 17, 16)  # CLIP's penultimate states: class token + 4×4 patches
    assert set(wan22.encode_images(image)) == {"image_latent", "image_mask"}  # no image encoder
    # the image latent is the normalised latent of [image, 0, …, 0], as encode gives it for that clip
    clip = torch.cat([image[:, None], torch.zeros(1, FRAMES - 1, SIZE, SIZE, 3)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(visual["image_latent"], wan.encode(clip))
    small = as_condition(condition_image(COG_SIZE))
    latent = cog.encode_images(small)["image_latent"]
    assert latent.shape == (1, 4, 3, 4, 4) and latent[:, :, 1:].eq(0).all() and latent[:, :, 0].abs().sum() > 0
    latent15 = cog15.encode_images(small)["image_latent"]  # CogVideoX 1.5: padded to 4 frames, image at index 0
    assert latent15.shape == (1, 4, 4, 4, 4) and latent15[:, :, 1:].eq(0).all()
    raw = cog15.vae.encode(small.permute(0, 3, 1, 2)[:, :, None]).latent_dist.mode()
    torch.testing.assert_close(latent15[:, :, :1], raw / 0.7)  # invert_scale_latents: divided by the scale
    with pytest.raises(UserError, match=r"--image: condition images of shape \(1, 16, 16, 3\)"):
        wan.encode_images(small)
    with pytest.raises(UserError, match="text-to-video"):
        load_model(wan_dir).encode_images(image)


@pytest.mark.parametrize("name", ["wan", "wan22", "wan22x2", "cog", "cog15"])
@pytest.mark.parametrize("cfg", [1.0, 5.0])
def test_sampling_matches_the_diffusers_pipeline(name, cfg, i2v_dirs, models, monkeypatch):
    """fewstep's sampler (Euler / DDIM on the diffusers grid, CFG with the image kept) reproduces diffusers'
    I2V pipelines from the same noise and image."""
    model = models[name]
    if name == "wan22x2":  # Wan 2.2 A14B I2V: both experts take the same concatenated input, each on its own steps
        assert list(model.denoisers()) == ["transformer", "transformer_2"]
        timesteps = model.denoiser.schedule.model_timestep(model.sampling_times(4)[:-1])
        assert (timesteps >= 900).any() and (timesteps < 900).any()  # boundary_ratio 0.9 × 1000
    image = condition_image(model.geometry.height)
    noise = torch.randn(model.latent_shape(1), generator=torch.Generator().manual_seed(1))
    ours = model.sample_latents([PROMPT], steps=4, cfg_scale=cfg, noise=noise, images=as_condition(image)).x
    theirs = diffusers_latents(i2v_dirs[name], image, noise, 4, cfg, monkeypatch)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert float((ours - noise).abs().mean()) > 0.05
    other = model.sample_latents([PROMPT], steps=4, cfg_scale=cfg, noise=noise,
                                 images=as_condition(condition_image(model.geometry.height, seed=1))).x
    assert float((other - ours).abs().max()) > 1e-3  # the image conditions the sample


@pytest.mark.parametrize("name", ["wan", "cog15"])
def test_cfg_keeps_the_image_in_the_unconditional_branch(name, models):
    """Denoiser.predict with uncond = null_condition(B) (no image) guides with uncond + image, as the pipelines'
    negative pass does: uncond_out + w·(cond_out − uncond_out), both with the image."""
    model = models[name]
    images = torch.cat([as_condition(condition_image(model.geometry.height, seed=s)) for s in (0, 1)])
    cond = model.encode_prompts([PROMPT, "a dog"]).with_extra(model.encode_images(images))
    null = model.null_condition(2)
    assert not null.visual()
    x = torch.randn(model.latent_shape(2), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.8, 0.4], dtype=torch.float64)
    denoiser = model.denoiser
    with torch.no_grad():
        guided = denoiser.predict(x, t, cond, cfg_scale=4.0, uncond=null)
        out_c = denoiser(x, t, cond)
        out_u = denoiser(x, t, null.with_extra(cond.visual()))
        for k, v in null.with_extra(cond.visual()).extra.items():
            assert torch.equal(v, cond.extra[k])
    torch.testing.assert_close(guided.to(denoiser.prediction_type), out_u + 4.0 * (out_c - out_u), rtol=1e-4,
                               atol=1e-5)
    with pytest.raises(UserError, match="needs the condition image"):
        denoiser(x, t, null)  # without any image: a one-line error, not a shape error


@pytest.mark.parametrize("name", ["wan22", "wan"])
def test_the_wan_i2v_blockwise_split_and_jvp(name, models):
    """The block-wise JVP's split (SwiftVideo Alg. 2) of Wan I2V: the condition channels join before the patch
    embedding and, for Wan 2.1 I2V, the CLIP image tokens the cross-attention context; pieces in sequence equal
    the forward, and the block-wise JVP equals torch.func.jvp over the whole backbone (float64)."""
    import copy

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fewstep.models.denoiser import blockwise_jvp

    model = models[name]
    image = as_condition(condition_image(SIZE))
    with torch.no_grad():
        cond = model.encode_prompts([PROMPT]).with_extra(model.encode_images(image))
    assert ("image_embeds" in cond.extra) == (name == "wan")
    backbone = copy.deepcopy(model.denoiser.backbone).double()
    cond = Conditioning(cond.context.double(), cond.mask, {k: v.double() for k, v in cond.extra.items()})
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(model.latent_shape(1), generator=generator, dtype=torch.float64)
    dx = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    timestep, dt = torch.tensor([700.0], dtype=torch.float64), torch.tensor([-40.0], dtype=torch.float64)
    parts = backbone.blockwise(x, timestep, cond)
    with torch.no_grad():
        torch.testing.assert_close(parts(x, timestep), backbone(x, timestep, cond), rtol=1e-10, atol=1e-10)
        value, tangent = blockwise_jvp(parts, x, timestep, dx, dt)
        with sdpa_kernel(SDPBackend.MATH):
            want, want_tangent = torch.func.jvp(lambda x_, t_: backbone(x_, t_, cond), (x, timestep), (dx, dt))
    torch.testing.assert_close(value, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(tangent, want_tangent, rtol=1e-8, atol=1e-8)
    assert tangent.abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# fewstep cache, distill, export, generate
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Four 12-frame 32² GIFs (10 fps) of a square moving over a gradient, with sidecar captions."""
    import imageio

    root = tmp_path_factory.mktemp("clips") / "videos"
    root.mkdir()
    for k, caption in enumerate(["a cat runs in the park", "a dog runs", "a red circle moves left", "a cat"]):
        base = condition_image(SIZE, seed=10 + k).astype(np.int16)
        frames = [np.clip(np.roll(base, 2 * j, axis=1 - k % 2), 0, 255).astype(np.uint8) for j in range(12)]
        imageio.mimsave(root / f"clip{k}.gif", frames, duration=100, loop=0)
        (root / f"clip{k}.txt").write_text(caption + "\n")
    return root


@pytest.fixture(scope="module")
def wan_cache(i2v_dirs, clips, tmp_path_factory):
    from fewstep.cli import main

    out = tmp_path_factory.mktemp("cache") / "wan"
    assert main(["cache", "--model", str(i2v_dirs["wan"]), "--videos", str(clips), "--out", str(out), "--fps", "10",
                 "--batch-size", "2", "--shard-size", "2"]) == 0
    return out


def test_cache_stores_each_clips_first_frame_condition(wan_cache, models):
    from fewstep.data.cache import LatentCache, fit_frames, read_clip
    from fewstep.recipes.sources import LatentCacheData

    model = models["wan"]
    cache = LatentCache(wan_cache)
    assert cache.settings.visual == {"image_embeds": [17, 16], "image_latent": [4, 3, 4, 4], "image_mask": [4, 3, 4, 4]}
    assert "image" in cache.settings.fingerprint  # the CLIP image encoder is part of what the cache depends on
    items = cache.samples([0, 1, 2, 3])
    frames = torch.stack([fit_frames(read_clip(Path(cache.manifest.inputs) / p, FRAMES, 10.0), SIZE, SIZE)
                          for p in items["paths"]])  # (4, T, H, W, 3)
    with torch.no_grad():  # in the cache's batches of 2 (a batch's size changes float sums)
        parts = [model.encode_images(frames[:2, 0]), model.encode_images(frames[2:, 0])]  # the first frames' condition
        want = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
        latents = torch.cat([model.encode(frames[:2]), model.encode(frames[2:])])
    for name, value in want.items():
        assert items[f"extra.{name}"].dtype == torch.bfloat16
        torch.testing.assert_close(items[f"extra.{name}"].float(), value.to(torch.bfloat16).float(), rtol=0, atol=0)
    torch.testing.assert_close(items["latents"].float(), latents.to(torch.bfloat16).float(), rtol=0, atol=0)
    # the latent_cache source hands them to objectives in cond.extra; uncond (the stored null caption) keeps them
    batch = LatentCacheData(path=str(wan_cache)).build(model, seed=0).batch([2, 3], torch.device("cpu"))
    assert set(batch.cond.visual()) == set(want)
    assert all(torch.equal(batch.uncond.extra[k], v) for k, v in batch.cond.visual().items())
    torch.testing.assert_close(batch.cond.extra["image_latent"], want["image_latent"][2:].to(torch.bfloat16).float())


def test_synth_from_a_cache_solves_on_each_clips_real_first_frame(wan_cache, i2v_dirs, wan_dir, tmp_path, capsys):
    """fewstep synth --prompts CACHE: sample i takes clip (i mod N)'s caption and stored first-frame condition
    (AccVideo / SwiftVideo I2V from real first frames); its trajectory is the teacher's Euler path on them. A cache
    of another model is one line, nothing written."""
    from fewstep.data.cache import LatentCache
    from fewstep.data.trajectories import TrajectoryStore, solver_grid
    from fewstep.diffusion.samplers import sample_euler
    from fewstep.synth import sample_noise

    out = tmp_path / "store"
    rc, _, err = cli(capsys, "synth", "--teacher", i2v_dirs["wan"], "--prompts", wan_cache, "--num", "5", "--steps",
                     "5", "--out", out, "--batch-size", "5", "--cfg", "1", "--dtype", "fp32")
    assert rc == 0, err
    store, cache = TrajectoryStore(out), LatentCache(wan_cache)
    clips = cache.samples([0, 1, 2, 3, 0])  # sample 4 wraps to clip 0
    assert store.settings.visual_shapes == cache.settings.visual
    got = store.samples(list(range(5)))
    assert got["prompts"] == clips["captions"]
    visual = {name: clips[f"extra.{name}"].float() for name in cache.settings.visual}
    assert all(torch.equal(got["extra"][name], value) for name, value in visual.items())
    model = load_model(i2v_dirs["wan"])
    with torch.no_grad():
        cond = model.encode_prompts(clips["captions"]).with_extra(visual)
        want = sample_euler(model.denoiser, sample_noise(model.latent_shape(1)[1:], 0, range(5)), solver_grid(5), cond,
                            return_trajectory=True).trajectory[-1]
    torch.testing.assert_close(got["latents"][:, -1], want)
    rc, _, err = cli(capsys, "synth", "--teacher", wan_dir, "--prompts", wan_cache, "--num", "2", "--out",
                     tmp_path / "other")
    assert rc == 2 and err.count("\n") == 1 and "built with another model" in err, err
    assert not (tmp_path / "other").exists()
    rc, _, err = cli(capsys, "pairs", "--model", i2v_dirs["wan"], "--prompts", wan_cache, "--num", "2", "--out",
                     tmp_path / "pairs")  # preference pairs sample from images, which a cache does not hold
    assert rc == 2 and err.count("\n") == 1 and "preference pairs of an image-to-video model" in err, err
    assert not (tmp_path / "pairs").exists()


def test_an_i2v_cache_needs_clips(i2v_dirs, wan_dir, clips, tmp_path, capsys):
    (tmp_path / "p.txt").write_text(PROMPT + "\n")
    rc, _, err = cli(capsys, "cache", "--model", i2v_dirs["wan"], "--prompts", tmp_path / "p.txt", "--out",
                     tmp_path / "c")
    assert rc == 2 and err.count("\n") == 1 and "image-to-video; a text-only cache has no first frames" in err, err
    assert not (tmp_path / "c").exists()
    # a cache of the text-to-video Wan (the same VAE and text encoder) has no first-frame condition
    rc, _, err = cli(capsys, "cache", "--model", wan_dir, "--videos", clips, "--out", tmp_path / "t2v", "--fps", "10")
    assert rc == 0, err
    from fewstep.recipes.sources import LatentCacheData

    with pytest.raises(UserError, match="holds no first-frame condition"):
        LatentCacheData(path=str(tmp_path / "t2v")).build(load_model(i2v_dirs["wan22"]), seed=0)


STEPS = 10


def distill_args(model, cache, out, *extra):
    """DOLLAR's VSD (student, teacher with CFG, fake score: the cheapest recipe with a fake score) on the uniform4
    grid (exported exactly), from the I2V teacher's latent cache."""
    sets = [f"model={model}", "data.kind=latent_cache", f"data.path={cache}", "preset=[vsd]",
            "generator.times=uniform4", "roles.student.every=2", f"train.steps={STEPS}", "train.batch_size=2",
            "train.eval_every=0", "train.checkpoint_every=5", "train.log_every=1", "train.tensorboard=false", *extra]
    return ["distill", "--recipe", "dollar", "--out", str(out), *[a for s in sets for a in ("--set", s)]]


@pytest.fixture(scope="module")
def reference_run(i2v_dirs, wan_cache, tmp_path_factory):
    """DOLLAR's VSD (student, teacher with CFG, fake score) on the Wan I2V teacher from its cache, 10 steps."""
    from fewstep.cli import main

    run = tmp_path_factory.mktemp("run") / "reference"
    assert main(distill_args(i2v_dirs["wan"], wan_cache, run)) == 0
    return run


def test_a_wan_i2v_distillation_resumes_exactly(reference_run, i2v_dirs, wan_cache, tmp_path, capsys):
    run = tmp_path / "run"
    rc, _, err = cli(capsys, *distill_args(i2v_dirs["wan"], wan_cache, run, "train.steps=5"))
    assert rc == 0, err
    rc, _, err = cli(capsys, "distill", "--resume", run, "--set", f"train.steps={STEPS}")
    assert rc == 0, err
    assert_same_checkpoint(run, reference_run, STEPS, must=("roles/student", "optim/student", "roles/fake_score"))
    seen = losses(run)
    assert sorted(seen) == list(range(1, STEPS + 1))
    assert all(np.isfinite(v) for rec in seen.values() for v in rec.values())
    student = load_model(reference_run / "student")
    assert student.image_conditioned and type(student.pipe).__name__ == "WanImageToVideoPipeline"


def test_export_writes_the_i2v_pipeline_that_samples_as_fewstep_generate(reference_run, tmp_path, capsys,
                                                                        monkeypatch):
    out = tmp_path / "export"
    rc, stdout, err = cli(capsys, "export", reference_run, "--out", out)
    assert rc == 0, err
    record = json.loads((out / "export.json").read_text())
    assert record["pipeline"] == "WanImageToVideoPipeline" and record["exact"] and record["image_to_video"]
    assert f"WanImageToVideoPipeline.from_pretrained('{out}')(image, prompt, num_inference_steps=4" in stdout
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "WanImageToVideoPipeline"
    assert index["image_encoder"][1] == "CLIPVisionModel"
    assert index["image_processor"][1].startswith("CLIPImageProcessor")  # (…Pil without torchvision)
    processor = json.loads((out / "image_processor" / "preprocessor_config.json").read_text())
    assert processor["crop_size"] == {"height": 32, "width": 32}  # the teacher's processor, copied
    student = load_model(reference_run / "student")
    image = condition_image(SIZE, seed=3)
    noise = torch.randn(student.latent_shape(1), generator=torch.Generator().manual_seed(3))
    ours = student.sample_latents([PROMPT], noise=noise, seed=7, images=as_condition(image)).x
    steps = record["call"]["num_inference_steps"]
    theirs = diffusers_latents(out, image, noise, steps, 1.0, monkeypatch, seed=7)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert float((ours - noise).abs().mean()) > 0.05
    exported = load_model(out)  # fewstep reads the export too
    torch.testing.assert_close(exported.sample_latents([PROMPT], noise=noise, seed=7, images=as_condition(image)).x,
                               ours, rtol=1e-4, atol=1e-4)


def test_a_wan22_i2v_distillation_resumes_exactly_and_exports(i2v_dirs, clips, tmp_path, capsys, monkeypatch):
    """Wan 2.2 A14B I2V (two experts, no image encoder): a 10-step DOLLAR run, one student per expert, from its own
    cache, resumes exactly; its export is a two-expert WanImageToVideoPipeline that samples as fewstep generate."""
    from fewstep.cli import main

    model, cache = i2v_dirs["wan22x2"], tmp_path / "cache"
    assert main(["cache", "--model", str(model), "--videos", str(clips), "--out", str(cache), "--fps", "10",
                 "--batch-size", "2", "--shard-size", "2"]) == 0
    reference = tmp_path / "reference"
    assert main(distill_args(model, cache, reference)) == 0
    run = tmp_path / "run"
    rc, _, err = cli(capsys, *distill_args(model, cache, run, "train.steps=5"))
    assert rc == 0, err
    rc, _, err = cli(capsys, "distill", "--resume", run, "--set", f"train.steps={STEPS}")
    assert rc == 0, err
    assert_same_checkpoint(run, reference, STEPS, must=("roles/student", "optim/student", "roles/fake_score"))
    out = tmp_path / "export"
    rc, _, err = cli(capsys, "export", reference, "--out", out)
    assert rc == 0, err
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "WanImageToVideoPipeline" and index["transformer_2"][1] == "WanTransformer3DModel"
    assert index.get("image_encoder") in (None, [None, None])
    record = json.loads((out / "export.json").read_text())
    student = load_model(reference / "student")
    image = condition_image(SIZE, seed=4)
    noise = torch.randn(student.latent_shape(1), generator=torch.Generator().manual_seed(4))
    ours = student.sample_latents([PROMPT], noise=noise, seed=7, images=as_condition(image)).x
    theirs = diffusers_latents(out, image, noise, record["call"]["num_inference_steps"], 1.0, monkeypatch, seed=7)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert float((ours - noise).abs().mean()) > 0.05


def _write_png(path, image):
    import imageio

    imageio.imwrite(path, image)
    return path


def test_generate_cli_with_an_image(i2v_dirs, tmp_path, capsys):
    png = _write_png(tmp_path / "first.png", condition_image(SIZE))
    rc, _, err = cli(capsys, "generate", "--model", i2v_dirs["wan"], "--prompt", PROMPT, "--image", png, "--steps", "2",
                     "--out", tmp_path / "gen", "--scale", "1")
    assert rc == 0, err
    samples = np.load(tmp_path / "gen" / "samples.npz")
    assert samples["frames"].shape == (1, FRAMES, SIZE, SIZE, 3)
    # the same as the model's own generate from the same image, seed and steps
    model = load_model(i2v_dirs["wan"])
    frames, _ = model.generate([PROMPT], steps=2, seed=0, images=as_condition(condition_image(SIZE)))
    assert np.array_equal(samples["frames"], frames)


@pytest.mark.parametrize("case,message", [
    ("missing", "this model is image-to-video"),
    ("size", "--image {png}: the model takes 32×32"),
    ("rgba", "--image {png}: expected an RGB image (3 channels); got 4 channels"),
    ("t2v", "is a text-to-video model; it takes no condition image"),
])
def test_bad_image_input_is_one_line(case, message, i2v_dirs, wan_dir, tmp_path, capsys):
    image = {"size": condition_image(16), "rgba": np.concatenate([condition_image(SIZE), np.full((SIZE, SIZE, 1), 255,
                                                                                               np.uint8)], -1)}
    png = _write_png(tmp_path / "image.png", image.get(case, condition_image(SIZE)))
    model = wan_dir if case == "t2v" else i2v_dirs["wan"]
    flags = [] if case == "missing" else ["--image", png]
    rc, _, err = cli(capsys, "generate", "--model", model, "--prompt", PROMPT, *flags, "--out", tmp_path / "gen")
    assert rc == 2 and err.count("\n") == 1 and message.format(png=png) in err, err
    assert not (tmp_path / "gen").exists()


def test_a_cogvideox_i2v_student_exports_to_its_i2v_pipeline(i2v_dirs, clips, tmp_path, capsys, monkeypatch):
    """CogVideoX 1.5 I2V (ofs, a padding frame, invert_scale_latents): cache, a 3-step DOLLAR (VSD) run, export to
    CogVideoXImageToVideoPipeline with an LCMScheduler, which samples as fewstep from the same image and noise
    (the consistency noise drawn from one generator in fewstep's layout, as tests/test_export.py does)."""
    import diffusers.schedulers.scheduling_lcm as lcm

    cache, run, out = tmp_path / "cache", tmp_path / "run", tmp_path / "export"
    rc, _, err = cli(capsys, "cache", "--model", i2v_dirs["cog15"], "--videos", clips, "--out", cache, "--fps", "10")
    assert rc == 0, err
    rc, _, err = cli(capsys, *distill_args(i2v_dirs["cog15"], cache, run, "train.steps=3", "roles.student.every=1"))
    assert rc == 0, err
    rc, stdout, err = cli(capsys, "export", run, "--out", out)
    assert rc == 0 and "note:" not in stdout, err
    record = json.loads((out / "export.json").read_text())
    assert record["pipeline"] == "CogVideoXImageToVideoPipeline" and record["scheduler"]["class"] == "LCMScheduler"
    student = load_model(run / "student")
    image = condition_image(COG_SIZE, seed=3)
    noise = torch.randn(student.latent_shape(1), generator=torch.Generator().manual_seed(3))  # (B, C, F, H, W)
    ours = student.sample_latents([PROMPT], noise=noise, seed=7, images=as_condition(image)).x
    generator = torch.Generator().manual_seed(7)

    def randn_tensor(shape, generator_=None, device=None, dtype=None, **_):
        b, f, c, *hw = shape
        return torch.randn((b, c, f, *hw), generator=generator, dtype=dtype).permute(0, 2, 1, 3, 4)

    monkeypatch.setattr(lcm, "randn_tensor", randn_tensor)
    theirs = diffusers_latents(out, image, noise, record["call"]["num_inference_steps"], 1.0, monkeypatch)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert float((ours - noise).abs().mean()) > 0.05


@pytest.mark.parametrize("case,message", [
    ("ti2v", "expand_timesteps (Wan 2.2 TI2V-5B"),
    ("caption", "fewstep_model.json: max_sequence_length 16 does not fit this Wan I2V transformer"),
])
def test_an_i2v_form_fewstep_does_not_model_is_one_line(case, message, i2v_dirs, tmp_path, capsys):
    """Wan 2.2 TI2V-5B's ``expand_timesteps`` (first latent frame replaced, per-token timesteps), and a Wan 2.1 I2V
    with another caption length than the 512 its attention splits the context at, are refused at load."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(i2v_dirs["wan22" if case == "ti2v" else "wan"], model)
    if case == "ti2v":
        index = json.loads((model / "model_index.json").read_text())
        (model / "model_index.json").write_text(json.dumps({**index, "expand_timesteps": True}))
    else:
        _settings(model, SIZE, "euler", 5.0, length=16)
    png = _write_png(tmp_path / "first.png", condition_image(SIZE))
    rc, _, err = cli(capsys, "generate", "--model", model, "--prompt", PROMPT, "--image", png, "--out", tmp_path / "g")
    assert rc == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "g").exists()


def test_eval_cli_with_an_image(i2v_dirs, tmp_path, capsys):
    """fewstep eval on a real image-to-video model takes --image (once for every prompt) and generates from it
    what fewstep generate does; without it, one line and nothing written."""
    png = _write_png(tmp_path / "first.png", condition_image(SIZE))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPT + "\n")
    rc, _, err = cli(capsys, "eval", "--model", i2v_dirs["wan"], "--prompts", prompts, "--image", png, "--steps", "2",
                     "--num", "2", "--out", tmp_path / "eval")
    assert rc == 0, err
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["nfe"] > 0 and np.isfinite(metrics["sharpness"])
    model = load_model(i2v_dirs["wan"])
    ours = model.generate([PROMPT, PROMPT], steps=2, seed=0,
                          images=as_condition(condition_image(SIZE)).repeat(2, 1, 1, 1))[0]
    rc, _, err = cli(capsys, "generate", "--model", i2v_dirs["wan"], "--prompt", PROMPT, "--image", png, "--steps",
                     "2", "--num", "2", "--out", tmp_path / "gen", "--scale", "1")
    assert rc == 0 and np.array_equal(np.load(tmp_path / "gen" / "samples.npz")["frames"], ours), err
    rc, _, err = cli(capsys, "eval", "--model", i2v_dirs["wan"], "--prompts", prompts, "--out", tmp_path / "none")
    assert rc == 2 and err.count("\n") == 1 and "this model is image-to-video" in err, err
    assert not (tmp_path / "none").exists()
