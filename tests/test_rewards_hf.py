"""Rewards from local transformers models (rewards/hf.py): tiny random CLIP and X-CLIP configs built and saved
here (nothing downloaded), loaded by directory through build_reward, checked against the models' own outputs,
differentiable with respect to the frames; and as frozen reward roles of a recipe (build: {kind: reward})."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewstep.errors import UserError
from fewstep.recipes.builders import parse_build
from fewstep.rewards import build_reward
from fewstep.utils.frames import to_unit
from helpers import make_tiny_clip, make_tiny_pipeline, make_tiny_xclip

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red circle moves left", "a blue square moves up"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="module")
def xclip_dir(tmp_path_factory):
    return make_tiny_xclip(tmp_path_factory.mktemp("xclip") / "xclip")


def uint8_frames(b, t, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (b, t, size, size, 3), dtype=np.uint8)


def test_clip_reward_is_the_models_cosine_on_its_processors_pixels(clip_dir):
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    reward = build_reward("clip", path=str(clip_dir))
    videos = uint8_frames(2, 3)
    frames = to_unit(torch.from_numpy(videos))  # (B, T, H, W, 3) in [−1, 1]
    got = reward(frames, PROMPTS)
    assert got.shape == (2,)
    # by hand: the image processor's pixels, the model's unit embeddings, frame by frame
    model, tokenizer = CLIPModel.from_pretrained(clip_dir).eval(), CLIPTokenizer.from_pretrained(clip_dir)
    pixels = CLIPImageProcessor.from_pretrained(clip_dir)(list(videos.reshape(6, 32, 32, 3)),
                                                          return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(reward.pixels(frames.reshape(6, 32, 32, 3)), pixels, rtol=0, atol=1e-5)
    tokens = tokenizer([p for p in PROMPTS for _ in range(3)], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=pixels, **tokens)
    want = (out.image_embeds * out.text_embeds).sum(-1).reshape(2, 3).mean(1)
    torch.testing.assert_close(got.detach(), want, rtol=1e-4, atol=1e-5)


def test_clip_rewards_are_differentiable_and_frozen(clip_dir):
    frames = to_unit(torch.from_numpy(uint8_frames(2, 1, size=40))).requires_grad_(True)  # resized + cropped
    for name, kwargs in (("clip", {}), ("clip-iqa", {"prompts": ["red", "blurry"]})):
        reward = build_reward(name, path=str(clip_dir), **kwargs)
        r = reward(frames, PROMPTS)
        assert r.shape == (2,) and bool(torch.isfinite(r).all())
        (g,) = torch.autograd.grad(r.sum(), frames)
        assert float(g.abs().sum()) > 0
        assert all(not p.requires_grad for p in reward.parameters())
    quality = build_reward("clip-iqa", path=str(clip_dir), prompts=["red", "blurry"])(frames, None)
    assert bool(((quality > 0) & (quality < 1)).all())  # a probability: the positive prompt of the pair


def test_xclip_reward_is_the_models_diagonal_cosine(xclip_dir):
    from transformers import XCLIPModel

    reward = build_reward("xclip", path=str(xclip_dir))
    frames = to_unit(torch.from_numpy(uint8_frames(2, 7))).requires_grad_(True)
    got = reward(frames, PROMPTS)
    model = XCLIPModel.from_pretrained(xclip_dir).eval()
    index = [0, 2, 4, 6]  # 4 frames picked evenly from 7
    pixels = reward.pixels(frames.detach()[:, index].reshape(8, 32, 32, 3)).reshape(2, 4, 3, 32, 32)
    with torch.no_grad():
        out = model(pixel_values=pixels, **reward.tokens(PROMPTS))
    want = torch.einsum("bd,bd->b", out.video_embeds, out.text_embeds.diagonal(dim1=0, dim2=1).T)
    torch.testing.assert_close(got.detach(), want, rtol=1e-4, atol=1e-5)
    (g,) = torch.autograd.grad(got.sum(), frames)
    assert float(g[:, index].abs().sum()) > 0 and float(g[:, [1, 3, 5]].abs().sum()) == 0


def test_rewards_as_roles_and_bad_input(clip_dir, tmp_path):
    model = make_tiny_pipeline()
    role = parse_build({"kind": "reward", "name": "clip", "kwargs": {"path": str(clip_dir)}}, "reward_image_text")
    assert role.build(model).differentiable
    toy = parse_build({"kind": "reward", "name": "toy-clip-video"}, "reward_video_text").build(model)
    assert toy(to_unit(torch.from_numpy(uint8_frames(2, 8))), PROMPTS).shape == (2,)
    with pytest.raises(UserError, match="roles.r.build.name"):
        parse_build({"kind": "reward", "name": "hps"}, "r")
    with pytest.raises(UserError, match="no config.json"):
        build_reward("clip", path=str(tmp_path))
    with pytest.raises(UserError, match="path"):
        build_reward("xclip")
