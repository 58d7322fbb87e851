"""The image-conditioning seam on the toy family: Conditioning's visual extras, CFG keeping the image,
the image-to-video toy DiT (zero-initialised from a T2V one), encode_images, condition images from files,
and ``fewstep generate --image`` with its one-line errors. Tiny random models only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewstep.errors import UserError
from fewstep.models.backbones import Conditioning
from fewstep.models.pipeline import VideoPipeline, image_to_video
from helpers import cli, make_tiny_pipeline, perturb


def tiny_i2v(seed: int = 0) -> VideoPipeline:
    """A tiny toy I2V model whose condition channels matter (random, not zero, patch-embedding columns)."""
    pipe = image_to_video(make_tiny_pipeline(seed))
    perturb(pipe.denoiser.backbone.module.patch_embed, scale=0.2, seed=seed + 1)
    return pipe.eval()


def images(batch: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, size, size, 3, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # (B, H, W, 3)


# ---------------------------------------------------------------------------------------------
# Conditioning
# ---------------------------------------------------------------------------------------------

def test_with_extra_and_with_visual_of():
    cond = Conditioning(torch.randn(2, 3, 4), None, {"pooled": torch.randn(2, 5)})
    image = {"image_latent": torch.randn(2, 4, 2, 2, 2), "image_mask": torch.ones(2, 1, 2, 2, 2)}
    both = cond.with_extra(image)
    assert set(both.extra) == {"pooled", "image_latent", "image_mask"} and set(cond.extra) == {"pooled"}
    assert set(both.visual()) == {"image_latent", "image_mask"}
    null = Conditioning(torch.zeros(2, 1, 4), None, {"pooled": torch.zeros(2, 5)})
    kept = null.with_visual_of(both)
    assert torch.equal(kept.extra["image_latent"], image["image_latent"])
    assert torch.equal(kept.extra["pooled"], null.extra["pooled"])  # its own non-visual extras stay
    own = null.with_extra({"image_latent": torch.zeros(2, 4, 2, 2, 2)}).with_visual_of(both)
    assert torch.equal(own.extra["image_latent"], torch.zeros(2, 4, 2, 2, 2))  # present: not replaced
    with pytest.raises(ValueError, match="image_mask"):
        cond.with_extra({"image_mask": torch.ones(3, 1)})


# ---------------------------------------------------------------------------------------------
# CFG: the unconditional branch keeps the image
# ---------------------------------------------------------------------------------------------

def test_cfg_unconditional_branch_keeps_the_image():
    pipe = tiny_i2v()
    den = pipe.denoiser
    B, w = 2, 3.0
    x = torch.randn(pipe.latent_shape(B), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.3, 0.8])
    visual = pipe.encode_images(images(B))
    cond = pipe.encode_prompts(["a red circle moves left", "a blue square stays still"]).with_extra(visual)
    null = pipe.null_condition(B)  # no image: what objectives and samplers pass
    with torch.no_grad():
        guided = den.predict(x, t, cond, cfg_scale=w, uncond=null).flow
        # independent: both branches by hand, the unconditional one with the image, DESIGN §2's formula
        u_c = den(x, t, cond)
        u_u = den(x, t, null.with_extra(visual))
        assert torch.allclose(guided, u_u + w * (u_c - u_u), atol=1e-5)
        # dropping the image from the unconditional branch would be another prediction
        zero = {k: torch.zeros_like(v) for k, v in visual.items()}
        u_zero = den(x, t, null.with_extra(zero))
        assert (u_zero - u_u).abs().max() > 1e-3
    with pytest.raises(UserError, match="image_mask"):
        den(x, t, null)  # an I2V backbone without its image: one line


def test_blockwise_split_equals_forward_with_image():
    pipe = tiny_i2v()
    dit = pipe.denoiser.backbone
    x = torch.randn(pipe.latent_shape(2))
    timestep = torch.tensor([100.0, 700.0])
    cond = pipe.encode_prompts(["a red circle moves left", ""]).with_extra(pipe.encode_images(images(2)))
    with torch.no_grad():
        assert torch.allclose(dit.blockwise(x, timestep, cond)(x, timestep), dit(x, timestep, cond), atol=1e-5)


def test_blockwise_jvp_with_image_is_the_jvp_in_the_noisy_latent_only():
    """CCD's dF/dt on the toy I2V DiT (SwiftVideo Alg. 2): the condition channels join the noisy latent
    before the patch embedding but carry no tangent, so the block-wise JVP equals torch.func.jvp over the
    backbone in (x, t) with the image held fixed (float64)."""
    import copy

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fewstep.models.denoiser import blockwise_jvp

    pipe = tiny_i2v()
    cond = pipe.encode_prompts(["a red circle moves left"]).with_extra(pipe.encode_images(images(1)))
    cond = Conditioning(cond.context.double(), cond.mask, {k: v.double() for k, v in cond.extra.items()})
    dit = copy.deepcopy(pipe.denoiser.backbone).double()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(pipe.latent_shape(1), generator=generator, dtype=torch.float64)
    dx = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    timestep, dt = torch.tensor([600.0], dtype=torch.float64), torch.tensor([-30.0], dtype=torch.float64)
    with torch.no_grad():
        value, tangent = blockwise_jvp(dit.blockwise(x, timestep, cond), x, timestep, dx, dt)
        with sdpa_kernel(SDPBackend.MATH):
            want, want_tangent = torch.func.jvp(lambda x_, t_: dit(x_, t_, cond), (x, timestep), (dx, dt))
            # the image matters to the tangent: another image, another JVP
            other = pipe.encode_prompts(["a red circle moves left"]).with_extra(pipe.encode_images(images(1, seed=5)))
            other = Conditioning(other.context.double(), other.mask, {k: v.double() for k, v in other.extra.items()})
            _, other_tangent = torch.func.jvp(lambda x_, t_: dit(x_, t_, other), (x, timestep), (dx, dt))
    torch.testing.assert_close(value, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(tangent, want_tangent, rtol=1e-8, atol=1e-8)
    assert (tangent - other_tangent).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------
# The toy I2V model
# ---------------------------------------------------------------------------------------------

def test_image_to_video_starts_as_the_text_to_video_model():
    t2v = make_tiny_pipeline(3)
    i2v = image_to_video(t2v).eval()
    assert i2v.image_conditioned and not t2v.image_conditioned
    assert i2v.config.backbone.condition_channels == 1 + t2v.config.codec.latent_channels
    x = torch.randn(t2v.latent_shape(3), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.1, 0.5, 0.95])
    prompts = ["a red circle moves left", "", "a green cross moves up on a dark background"]
    with torch.no_grad():
        want = t2v.denoiser.predict(x, t, t2v.encode_prompts(prompts), cfg_scale=2.0, uncond=t2v.null_condition(3))
        cond = i2v.encode_prompts(prompts).with_extra(i2v.encode_images(images(3, seed=5)))
        got = i2v.denoiser.predict(x, t, cond, cfg_scale=2.0, uncond=i2v.null_condition(3))
    assert torch.equal(got.flow, want.flow)  # exactly: the new channels' weights are zero
    with torch.no_grad():  # and every sample with its image reproduces the T2V sample from the same noise
        a = t2v.sample_latents(prompts[:1], steps=3, seed=1).x
        b = i2v.sample_latents(prompts[:1], steps=3, seed=1, images=images(1)).x
    assert torch.equal(a, b)


def test_encode_images_layout():
    pipe = tiny_i2v()
    image = images(2)
    visual = pipe.encode_images(image)
    C, T, H, W = pipe.latent_shape(2)[1:]
    assert visual["image_latent"].shape == (2, C, T, H, W) and visual["image_mask"].shape == (2, 1, T, H, W)
    mask = visual["image_mask"]
    assert torch.equal(mask[:, :, 0], torch.ones_like(mask[:, :, 0])) and not mask[:, :, 1:].any()
    # the normalised first latent frame of the still clip [image, …, image], as the family's codec encodes clips;
    # zero after it
    clip = image[:, None].repeat(1, pipe.config.frames, 1, 1, 1)
    with torch.no_grad():
        want = pipe.encode(clip)[:, :, 0]
        assert torch.allclose(visual["image_latent"][:, :, 0], want, atol=1e-6)
        assert not visual["image_latent"][:, :, 1:].any()
        other = pipe.encode_images(images(2, seed=9))
    assert (other["image_latent"][:, :, 0] - visual["image_latent"][:, :, 0]).abs().max() > 1e-3


def test_the_condition_latent_decodes_back_to_the_image():
    """With the shipped codec, the condition latent's first frame decodes to the condition image (it is the image's
    latent as a frame of a clip), where the first latent frame of the clip [image, grey, …] does not (the codec's
    GroupNorms pool over frames): why encode_images encodes the still clip."""
    from fewstep.data.toyworld import ToyWorld

    pipe = image_to_video(VideoPipeline.load("toy-teacher"))
    frames, size, _ = pipe.geometry
    first = torch.as_tensor(ToyWorld("eval", frames=frames, size=size, length=8).batch(range(4))["frames"][:, 0]).float()
    with torch.no_grad():
        latent = pipe.encode_images(first)["image_latent"]  # (B, C, T', H', W')
        ours = pipe.decode(latent[:, :, :1].expand_as(latent))[:, 0]  # a still clip of the first latent frame
        clip = torch.zeros(4, frames, size, size, 3)
        clip[:, 0] = first
        grey = pipe.encode(clip)
        theirs = pipe.decode(grey[:, :, :1].expand_as(grey))[:, 0]
    error, grey_error = (ours - first).abs().mean(), (theirs - first).abs().mean()
    assert error < 0.05 and grey_error > 2 * error, (error, grey_error)


def test_sampling_needs_the_image_and_depends_on_it(tiny_pipeline):
    pipe = tiny_i2v()
    prompts = ["a red circle moves left", "a blue square stays still"]
    with pytest.raises(UserError, match="--image"):
        pipe.sample_latents(prompts, steps=2)
    with pytest.raises(UserError, match=r"--image.*\(2, 16, 16, 3\)"):
        pipe.sample_latents(prompts, steps=2, images=images(2, size=8))
    with torch.no_grad():
        a = pipe.sample_latents(prompts, steps=2, seed=0, images=images(2)).x
        b = pipe.sample_latents(prompts, steps=2, seed=0, images=images(2)).x
        c = pipe.sample_latents(prompts, steps=2, seed=0, images=images(2, seed=4)).x
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-3
    with pytest.raises(UserError, match="text-to-video"):
        tiny_pipeline.encode_images(images(1))
    with pytest.raises(UserError, match="text-to-video"):
        tiny_pipeline.sample_latents(prompts[:1], steps=1, images=images(1))


def test_save_load_keeps_the_image_conditioning(tmp_path):
    pipe = tiny_i2v()
    loaded = VideoPipeline.load(pipe.save(tmp_path / "m"))
    assert loaded.image_conditioned and loaded.config == pipe.config
    prompts, image = ["a red circle moves left"], images(1)
    with torch.no_grad():
        assert torch.equal(loaded.sample_latents(prompts, steps=2, images=image).x,
                           pipe.sample_latents(prompts, steps=2, images=image).x)


def test_inconsistent_conditioning_config_is_refused():
    from fewstep.config import parse_config
    from fewstep.models.pipeline import ToyPipelineConfig

    raw = make_tiny_pipeline().config.model_dump(mode="json")
    with pytest.raises(UserError, match="condition_channels"):
        parse_config(ToyPipelineConfig, {**raw, "conditioning": "image"})


def test_diffusers_text_to_video_model_refuses_images(wan_dir):
    from fewstep.models.family import load_model

    model = load_model(wan_dir)
    assert not model.image_conditioned
    with pytest.raises(UserError, match="--image: .*text-to-video"):
        model.encode_images(torch.zeros(1, 32, 32, 3))


# ---------------------------------------------------------------------------------------------
# Condition images from files; fewstep generate --image
# ---------------------------------------------------------------------------------------------

def write_png(path, array):
    import imageio.v3 as iio

    iio.imwrite(path, array)
    return path


def test_load_condition_image(tmp_path):
    from fewstep.utils.images import load_condition_image

    rgb = np.random.default_rng(0).integers(0, 256, (16, 12, 3), dtype=np.uint8)
    image = load_condition_image(write_png(tmp_path / "a.png", rgb), 16, 12)
    assert image.shape == (16, 12, 3) and image.dtype == torch.float32
    assert torch.allclose((image + 1) * 127.5, torch.from_numpy(rgb).float(), atol=1e-3)
    cases = [
        (write_png(tmp_path / "small.png", rgb[:8]), r"takes 16×12 .* got 8×12"),
        (write_png(tmp_path / "grey.png", rgb[..., 0]), "greyscale"),
        (write_png(tmp_path / "rgba.png", np.concatenate([rgb, rgb[..., :1]], -1)), "4 channels"),
        (tmp_path / "missing.png", "no such file"),
        (tmp_path / "a.txt", "not a readable"),
    ]
    (tmp_path / "a.txt").write_text("not an image")
    for path, message in cases:
        with pytest.raises(UserError, match=message):
            load_condition_image(path, 16, 12)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("i2v")
    return {"i2v": tiny_i2v().save(root / "i2v"), "t2v": make_tiny_pipeline().save(root / "t2v")}


def test_generate_with_an_image(model_dirs, tmp_path, capsys):
    rgb = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    png = write_png(tmp_path / "first.png", rgb)
    prompts = ["a red circle moves left", "a blue square stays still"]
    rc, _, err = cli(capsys, "generate", "--model", model_dirs["i2v"], "--prompt", prompts[0], "--prompt",
                     prompts[1], "--image", png, "--image", f"toy:{prompts[1]}", "--steps", "2", "--out",
                     tmp_path / "out", "--device", "cpu")
    assert rc == 0, err
    stored = np.load(tmp_path / "out" / "samples.npz")
    assert stored["frames"].shape == (2, 8, 16, 16, 3)
    assert np.array_equal(stored["images"][0], rgb)
    from fewstep.data.toyworld import condition_frame

    assert np.array_equal(stored["images"][1], condition_frame(prompts[1], frames=8, size=16))
    # the same call from Python: the videos are those of sample_latents with these images
    pipe = VideoPipeline.load(model_dirs["i2v"])
    from fewstep.utils.frames import to_unit

    with torch.no_grad():
        frames, _ = pipe.generate(prompts, steps=2, noise=torch.randn(pipe.latent_shape(2),
                                                                       generator=torch.Generator().manual_seed(0)),
                                  images=torch.from_numpy(to_unit(stored["images"])))
    assert np.array_equal(frames, stored["frames"])


@pytest.mark.parametrize("which, extra, message", [
    ("i2v", [], "image-to-video: give the condition image with --image"),
    ("t2v", ["--image", "toy:a red circle moves left"], "--image: VideoPipeline is a text-to-video model"),
    ("i2v", ["--image", "SMALL"], "--image .*small.png: the model takes 16×16"),
    ("i2v", ["--image", "toy:a purple circle"], "purple"),
    ("i2v", ["--image", "toy:a red circle moves left"] * 3, "--image given 3 times"),
])
def test_generate_image_errors_are_one_line(model_dirs, tmp_path, capsys, which, extra, message):
    small = write_png(tmp_path / "small.png", np.zeros((8, 8, 3), np.uint8))
    extra = [str(small) if a == "SMALL" else a for a in extra]
    out = tmp_path / "out"
    rc, _, err = cli(capsys, "generate", "--model", model_dirs[which], "--prompt", "a red circle moves left",
                     "--steps", "1", "--out", out, "--device", "cpu", *extra)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    import re

    assert re.search(message, err), err
    assert not out.exists() or not any(out.iterdir())  # nothing half-written
