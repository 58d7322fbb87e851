"""Metrics without toy semantics (eval/generic.py): sharpness against an independent stencil and blur,
flicker on a hand-computed clip, Vendi, and Fréchet distances on tiny random DINOv2 / CLIP vision
models saved here (nothing downloaded); a directory that is not a supported vision model is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from fewstep.errors import UserError
from fewstep.eval.diversity import video_vendi
from fewstep.eval.frechet import FrechetStats
from fewstep.eval.generic import (IMAGENET_MEAN, VisionFeatures, feature_frechet, flicker, read_captions, sharpness,
                                  vendi, vision_model_class)
from helpers import make_tiny_dinov2

pytestmark = pytest.mark.usefixtures("one_thread")


def smooth_clips(n=6, T=3, size=24, seed=0) -> np.ndarray:
    """``(n, T, size, size, 3)`` uint8: random blobs with some detail, different per clip."""
    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.random((n, T, size, size, 3)), sigma=(0, 0, 1, 1, 0))
    x = (x - x.min()) / (x.max() - x.min())
    return (x * 255).round().astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Pixel metrics
# ---------------------------------------------------------------------------------------------

def test_sharpness_is_the_variance_of_the_laplacian():
    rng = np.random.default_rng(0)
    clips = rng.integers(0, 256, (2, 3, 10, 12, 3), dtype=np.uint8)
    # independent computation: BT.601 luma, 4-neighbour stencil with reflect-101 borders (numpy's "reflect")
    y = (0.299 * clips[..., 0] + 0.587 * clips[..., 1] + 0.114 * clips[..., 2]) / 255.0  # (n, T, H, W)
    p = np.pad(y, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    lap = p[..., :-2, 1:-1] + p[..., 2:, 1:-1] + p[..., 1:-1, :-2] + p[..., 1:-1, 2:] - 4 * p[..., 1:-1, 1:-1]
    assert sharpness(clips) == pytest.approx(lap.var(axis=(2, 3)).mean(), rel=1e-12)

    sharp = smooth_clips(2, 2, 32)
    blurred = ndimage.gaussian_filter(sharp.astype(np.float64), sigma=(0, 0, 1.5, 1.5, 0)).round().astype(np.uint8)
    assert sharpness(blurred) < 0.5 * sharpness(sharp)
    assert sharpness(np.full((2, 3, 8, 8, 3), 137, np.uint8)) == 0.0
    with pytest.raises(UserError, match=r"expected \(n, T, H, W, 3\) uint8"):
        sharpness(np.zeros((3, 8, 8, 3), np.uint8))


def test_flicker_on_a_hand_computed_clip():
    clip = np.zeros((3, 2, 2, 3), np.uint8)  # frame 0 black
    clip[1] = 255  # frame 1 white: |Δ| = 1 everywhere
    clip[2] = 255
    clip[2, 0, 0] = 0  # frame 2: one pixel of four back to black: mean |Δ| = 1/4
    still = np.full((3, 2, 2, 3), 40, np.uint8)
    assert flicker(clip[None]) == pytest.approx((1 + 0.25) / 2)
    assert flicker(np.stack([clip, still])) == pytest.approx((1 + 0.25) / 2 / 2)  # mean over clips
    half = np.zeros((2, 1, 1, 3), np.uint8)
    half[1, ..., 0] = 51  # one channel of three moves by 0.2
    assert flicker(half[None]) == pytest.approx(0.2 / 3)
    assert flicker(clip[None, :1]) == 0.0  # one frame: nothing to compare


def test_vendi_counts_distinct_samples():
    clips = smooth_clips(4, 5, 8)
    assert vendi(clips) == pytest.approx(video_vendi(clips, keyframes=4))
    assert vendi(np.repeat(clips[:1], 4, axis=0)) == pytest.approx(1.0)
    assert vendi(clips[:, :2]) == pytest.approx(video_vendi(clips[:, :2], keyframes=2))  # K ≤ T
    assert 1.0 < vendi(clips) <= 4.0


# ---------------------------------------------------------------------------------------------
# Fréchet distance on vision-model features
# ---------------------------------------------------------------------------------------------

def save_clip_vision(path, projection=False):
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cls = CLIPVisionModelWithProjection if projection else CLIPVisionModel
    cls(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         image_size=32, patch_size=8, projection_dim=8)).save_pretrained(path)
    return path


def save_clip(path):
    """A whole tiny CLIP (text and vision towers); its image features are the projected ones."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    text = dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["dinov2", "clip_vision", "clip_vision_projection", "clip"])
def test_frechet_distance_of_a_set_to_itself_and_to_a_shifted_set(tmp_path, kind):
    path = tmp_path / kind
    if kind == "dinov2":
        make_tiny_dinov2(path)
    elif kind == "clip":
        save_clip(path)
    else:
        save_clip_vision(path, projection=kind.endswith("projection"))
    net = VisionFeatures.load(path)
    dim = 8 if kind in ("clip_vision_projection", "clip") else 16
    assert net.size == 32 and tuple(net.mean.flatten().tolist()) == pytest.approx(IMAGENET_MEAN)
    clips = smooth_clips(6, 3, 24)  # not the model's size: resized and cropped
    feats = net.features(clips)
    assert feats.shape == (6, dim) and np.isfinite(feats).all()

    # a clip's feature is the mean of its frames' pooled embeddings
    frames = torch.from_numpy(clips[0])  # (T, H, W, 3)
    np.testing.assert_allclose(feats[0], net.embed(net.preprocess(frames)).mean(0).double().numpy(), rtol=1e-5,
                               atol=1e-6)

    to_itself = feature_frechet(net, clips, clips)
    shifted = np.clip(clips.astype(int) + 60, 0, 255).astype(np.uint8)
    to_shifted = feature_frechet(net, clips, shifted)
    assert abs(to_itself) < 1e-6 * max(to_shifted, 1.0)
    assert to_shifted > 1e-3
    stats = FrechetStats.from_features(net.features(shifted))
    assert feature_frechet(net, clips, stats) == pytest.approx(to_shifted, rel=1e-9)


def test_the_preprocessor_config_sets_normalisation_and_crop(tmp_path):
    path = make_tiny_dinov2(tmp_path / "dino")
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "crop_size": {"height": 16, "width": 16}}))
    net = VisionFeatures.load(path)
    assert net.size == 16
    frames = torch.full((2, 20, 40, 3), 191, dtype=torch.uint8)  # 0.749 everywhere; wide frames
    pixels = net.preprocess(frames)
    assert pixels.shape == (2, 3, 16, 16)  # shorter side resized to 16, centre crop
    torch.testing.assert_close(pixels, torch.full_like(pixels, (191 / 255 - 0.5) / 0.25), rtol=0, atol=1e-5)
    assert net.features(np.zeros((2, 2, 20, 40, 3), np.uint8)).shape == (2, 16)


def test_a_directory_that_is_not_a_vision_model_is_one_line(tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "empty").mkdir()
    cases = {"bert": "model_type 'bert' is not a supported vision model", "empty": "no config.json",
             "missing": "no such directory"}
    for name, message in cases.items():
        with pytest.raises(UserError, match=message) as err:
            VisionFeatures.load(tmp_path / name)
        assert "\n" not in str(err.value) and "CLIP" in str(err.value)
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    assert vision_model_class(tmp_path / "noweights") == "Dinov2Model"
    with pytest.raises(UserError, match="the Dinov2Model could not be loaded") as err:
        VisionFeatures.load(tmp_path / "noweights")
    assert "\n" not in str(err.value)


def test_read_captions(tmp_path):
    (tmp_path / "p.txt").write_text("\ufeffa cat runs\n\n  a dog runs  \n")
    assert read_captions(tmp_path / "p.txt") == ["a cat runs", "a dog runs"]
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(UserError, match="holds no caption"):
        read_captions(tmp_path / "blank.txt")
    with pytest.raises(UserError, match="no such file"):
        read_captions(tmp_path / "nope.txt")
