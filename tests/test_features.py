"""The Fréchet feature net: short real training, features, reference statistics and their cache."""

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from fewstep.data.toyworld import to_unit
from fewstep.errors import UserError
from fewstep.eval.features import (
    FeatureNetConfig, VideoFeatureNet, attribute_accuracy, reference_stats, reference_suite, train_feature_net,
)
from fewstep.eval.frechet import FrechetStats, frechet_distance
from fewstep.rewards import base as reward_base
from fewstep.rewards.training_data import ATTRIBUTES, LabelledClips


# small pixel models run far faster on one thread when the cores are shared (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_net(seed: int = 0) -> VideoFeatureNet:
    torch.manual_seed(seed)
    return VideoFeatureNet(FeatureNetConfig(frames=8, size=16, channels=[8, 16], spatial_strides=[2, 2],
                                           temporal_kernels=[1, 3], temporal_strides=[1, 2], feature_dim=16))


def test_short_training_beats_chance():
    data = LabelledClips.render("train", 192, 8, 16)
    net, metrics = train_feature_net(steps=150, batch_size=32, seed=0, model=tiny_net(), data=data, eval_clips=96,
                                     lr=5e-3, warmup_steps=10)
    chance = {name: 1 / len(classes) for name, classes in ATTRIBUTES.items()}  # mean 0.29
    assert metrics["eval_acc_mean"] > np.mean(list(chance.values())) + 0.2, metrics  # seeds 0-2 reach 0.59
    assert metrics["eval_acc_background"] > 0.9, metrics
    assert metrics["eval_acc_colour"] > 0.8, metrics
    again = attribute_accuracy(net, LabelledClips.render("eval", 96, 8, 16))  # what training evaluated on
    assert again["mean"] == pytest.approx(metrics["eval_acc_mean"])


def test_features_accept_uint8_and_float_and_other_geometry():
    net = tiny_net()
    clips = LabelledClips.render("eval", 5, 8, 16).videos  # (5, 8, 16, 16, 3) uint8
    a = net.features(clips, batch_size=2)
    b = net.features(torch.from_numpy(to_unit(clips)))
    assert a.shape == (5, 16) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert net.features(LabelledClips.render("eval", 2, 12, 32).videos).shape == (2, 16)  # resampled
    with pytest.raises(UserError, match="expected \\(N, T, H, W, 3\\)"):
        net.features(clips[0])


def test_frechet_real_vs_itself_and_vs_corrupted(tmp_path):
    net = tiny_net()
    suite = reference_suite(96)
    assert len({p for p, _ in suite}) == 24  # round-robin over the prompts
    clips = LabelledClips.from_suite(suite, 8, 16).videos
    stats = reference_stats(96, net, cache_dir=tmp_path)
    assert (tmp_path / "reference_96_8x16.npz").is_file()
    assert frechet_distance(net.features(clips), stats) == pytest.approx(0.0, abs=1e-9)
    held_out = LabelledClips.from_suite(reference_suite(192)[96:], 8, 16).videos  # other seeds, same prompts
    real = frechet_distance(net.features(held_out), stats)
    blurred = gaussian_filter(clips.astype(np.float32), sigma=(0, 0, 1.5, 1.5, 0)).round().astype(np.uint8)
    noisy = np.clip(clips + np.random.default_rng(0).normal(0, 40, clips.shape), 0, 255).astype(np.uint8)
    other = reference_stats(96, tiny_net(seed=1), cache_dir=tmp_path / "other")  # a different net: its own cache
    assert not np.allclose(other.mean, stats.mean)
    assert frechet_distance(net.features(blurred), stats) > 4 * real  # even an untrained net sees it
    assert frechet_distance(net.features(noisy), stats) > 4 * real
    # the cache is read back as is
    cached = FrechetStats.load(tmp_path / "reference_96_8x16.npz")
    np.testing.assert_allclose(reference_stats(96, net, cache_dir=tmp_path).cov, cached.cov)


def test_save_load_roundtrip_caches_next_to_weights(tmp_path, monkeypatch):
    net = tiny_net()
    net.save(tmp_path / "feat", metrics={"eval_acc_mean": 0.5})
    again = VideoFeatureNet.load(tmp_path / "feat")
    assert again.metrics == {"eval_acc_mean": 0.5} and again.directory == tmp_path / "feat"
    clips = LabelledClips.render("eval", 3, 8, 16).videos
    np.testing.assert_allclose(net.features(clips), again.features(clips), atol=1e-6)
    reference_stats(24, again)
    assert (tmp_path / "feat" / "reference_24_8x16.npz").is_file()
    monkeypatch.setattr(reward_base, "ASSETS", tmp_path / "no-assets")
    with pytest.raises(UserError, match="run `fewstep pretrain`"):
        VideoFeatureNet.load("toy-features")
