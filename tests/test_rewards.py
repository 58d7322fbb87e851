"""Rewards: sharpness, JPEG compressibility, the toy CLIP (short real training), the registry."""

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from fewstep.data.toyworld import VOCAB, render_clip, to_unit
from fewstep.errors import UserError
from fewstep.models.text_encoder import ToyTextEncoderConfig
from fewstep.rewards import REWARDS, JpegCompressibility, SharpnessReward, ToyClip, ToyClipConfig, ToyClipReward, \
    build_reward, train_toy_clip
from fewstep.rewards import base as reward_base
from fewstep.rewards.jpeg import frame_grid, jpeg_kilobytes
from fewstep.rewards.training_data import LabelledClips, caption_matches


# small pixel models run far faster on one thread when the cores are shared (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_clip_config(**kw) -> ToyClipConfig:
    return ToyClipConfig(frames=8, size=16, channels=[16, 32], blocks=[0, 0], keypoints=8, frame_dim=32, temporal_dim=32,
                         embed_dim=32, text=ToyTextEncoderConfig(vocab=VOCAB, dim=32, depth=1, heads=2), **kw)


def real_clips(prompts, frames=8, size=32) -> torch.Tensor:
    return torch.from_numpy(np.stack([to_unit(render_clip(p, seed, frames, size)[0]) for seed, p in enumerate(prompts)]))


PROMPTS = ["a red circle moves left", "a blue square stays still on a light background",
           "a yellow triangle moves up quickly on a dark background", "a white cross moves down slowly"]


def test_sharpness_lower_on_blurred_clips():
    clips = real_clips(PROMPTS)  # (4, 8, 32, 32, 3)
    blurred = torch.from_numpy(gaussian_filter(clips.numpy(), sigma=(0, 0, 1.0, 1.0, 0)))
    reward = SharpnessReward()
    sharp, soft = reward(clips, PROMPTS), reward(blurred, PROMPTS)
    assert sharp.shape == (4,) and reward.differentiable
    assert bool((soft < 0.7 * sharp).all()), (sharp, soft)
    assert bool(((sharp >= 0) & (sharp <= 1)).all())
    flat = torch.zeros(1, 4, 16, 16, 3)
    assert float(reward(flat, ["a red circle moves left"])) == 0.0  # no edges: zero, not NaN


def test_jpeg_flat_more_compressible_than_noise():
    g = torch.Generator().manual_seed(0)
    flat = torch.zeros(1, 4, 32, 32, 3)
    noisy = torch.rand(1, 4, 32, 32, 3, generator=g) * 2 - 1
    reward = JpegCompressibility()
    assert reward.differentiable is False
    scores = reward(torch.cat([flat, noisy]), ["a red circle moves left"] * 2)
    assert scores.shape == (2,) and bool((scores < 0).all())
    assert float(scores[0]) > float(scores[1])
    with pytest.raises(UserError, match="quality"):
        JpegCompressibility(quality=0)


def test_jpeg_grid_tiles_frames_and_pays_the_container_once():
    video = np.arange(5 * 2 * 3 * 3, dtype=np.uint8).reshape(5, 2, 3, 3)
    grid = frame_grid(video)  # 5 frames -> 3 columns x 2 rows, the sixth cell zero
    assert grid.shape == (4, 9, 3)
    np.testing.assert_array_equal(grid[2:, 3:6], video[4])
    np.testing.assert_array_equal(grid[:2, 6:9], video[2])
    assert not grid[2:, 6:].any()
    # a clip's reward is its coded content: a uniform clip costs far less per frame than one file
    # per frame would (one container for the whole clip), and adding a moving square costs more
    flat = np.full((16, 32, 32, 3), 40, np.uint8)
    shape = flat.copy()
    for t in range(16):
        shape[t, 8:20, t:t + 12] = (200, 30, 30)
    reward = JpegCompressibility()
    uniform_file = jpeg_kilobytes(flat[0], 95)
    scores = reward(torch.from_numpy(np.stack([flat, shape])).float() / 127.5 - 1)
    assert -float(scores[0]) < 0.15 * uniform_file
    assert float(scores[1]) < float(scores[0])


@pytest.mark.parametrize("make", [SharpnessReward, lambda: ToyClipReward(ToyClip(tiny_clip_config()))],
                         ids=["sharpness", "toy-clip"])
def test_differentiable_reward_gradients_are_finite_and_nonzero(make):
    reward = make()
    assert reward.differentiable
    frames = real_clips(PROMPTS[:2], frames=8, size=16).requires_grad_(True)
    reward(frames, PROMPTS[:2]).sum().backward()
    assert torch.isfinite(frames.grad).all()
    assert frames.grad.abs().sum() > 0


def test_toy_clip_resamples_other_clip_geometry():
    model = ToyClip(tiny_clip_config()).eval()  # built for 8 × 16²
    scores = ToyClipReward(model, head="both")(real_clips(PROMPTS[:2], frames=12, size=32), PROMPTS[:2])
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    with pytest.raises(UserError, match="one prompt per video"):
        model.similarity(real_clips(PROMPTS[:2], 8, 16), PROMPTS[:1])


def test_caption_matches_respects_optional_words():
    clips = LabelledClips.from_suite([("a red circle moves left quickly on a dark background", 0)], 8, 16)
    labels = {k: torch.from_numpy(v) for k, v in clips.labels.items()}
    captions = ["a red circle moves left", "a red circle moves right", "a red circle moves left slowly",
                "a red circle stays still on a dark background", "a red square moves left"]
    assert caption_matches(captions, labels).tolist() == [[True, False, False, False, False]]
    assert caption_matches(captions, labels, appearance_only=True).tolist() == [[True, True, True, True, False]]


def test_symmetries_relabel_motion():
    clips = LabelledClips.from_suite([("a green square moves left quickly", 3)], 8, 16)
    rng = np.random.default_rng(0)
    batch = clips.sample(8, rng)  # 4 pairs of one clip under different symmetries
    for frames, prompt in zip(batch["frames"], batch["prompts"]):
        # the x-centroid of the subject moves the way the caption says
        mask = (frames - frames[:, :1, :1]).abs().sum(-1) > 0.5  # (T, H, W)
        xs = torch.arange(16.0)
        cx = (mask.float() * xs).sum((1, 2)) / mask.float().sum((1, 2))
        assert ("right" in prompt) == bool(cx[-1] > cx[0]), prompt


def test_short_training_separates_matched_from_mismatched_pairs():
    model = ToyClip(tiny_clip_config())
    data = LabelledClips.render("train", 96, 8, 16)
    model, metrics = train_toy_clip(steps=40, batch_size=32, seed=0, model=model, data=data, eval_clips=32, lr=3e-3,
                                    warmup_steps=5)
    assert {"eval_c2v_both", "suite_c2v_both", "eval_motion", "seconds"} <= set(metrics)
    clips = LabelledClips.render("eval", 24, 8, 16)
    frames = torch.from_numpy(to_unit(clips.videos))
    labels = {k: torch.from_numpy(v) for k, v in clips.labels.items()}
    with torch.no_grad():
        s_frame, s_clip = model.similarity_matrices(frames, clips.prompts)  # (N, T, N), (N, N)
    s = (s_frame.mean(1) + s_clip) / 2
    match = caption_matches(clips.prompts, labels)
    assert float(s[match].mean()) > float(s[~match].mean()) + 0.1


def test_save_load_and_missing_shipped(tmp_path, monkeypatch):
    model = ToyClip(tiny_clip_config()).eval()
    model.save(tmp_path / "clip", metrics={"eval_c2v_both": 0.5})
    again = ToyClip.load(tmp_path / "clip")
    assert again.metrics == {"eval_c2v_both": 0.5}
    frames = real_clips(PROMPTS[:2], 8, 16)
    with torch.no_grad():
        assert torch.allclose(model.similarity(frames, PROMPTS[:2]), again.similarity(frames, PROMPTS[:2]))
    reward = build_reward("toy-clip-video", path=str(tmp_path / "clip"))
    assert reward.differentiable and reward.head == "clip"
    monkeypatch.setattr(reward_base, "ASSETS", tmp_path / "no-assets")
    with pytest.raises(UserError, match="run `fewstep pretrain`"):
        ToyClip.load("toy-clip")
    with pytest.raises(UserError, match="not the shipped"):
        ToyClip.load(tmp_path / "nowhere")


def test_registry():
    assert {"toy-clip", "toy-clip-frame", "toy-clip-video", "sharpness", "jpeg"} <= set(REWARDS)
    assert build_reward("jpeg", quality=50).quality == 50
    with pytest.raises(UserError, match="unknown reward 'nope'"):
        build_reward("nope")
