"""Vendi diversity (DOLLAR Eq. 17) and the Fréchet distance, checked against closed forms."""

import numpy as np
import pytest
import torch

from fewstep.data.toyworld import render_clip, to_unit
from fewstep.errors import UserError
from fewstep.eval.diversity import vendi_score, video_vendi
from fewstep.eval.frechet import (
    FrechetStats,
    frechet_distance,
    frechet_distance_from_stats,
)

# --- Vendi --------------------------------------------------------------------------------------


def reference_vendi(x: np.ndarray) -> float:
    """Independent computation: explicit n × n cosine kernel, entropy of its spectrum."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    lam = np.linalg.eigvalsh(x @ x.T / len(x))
    lam = lam[lam > 1e-15]
    return float(np.exp(-np.sum(lam * np.log(lam))))


@pytest.mark.parametrize("n", [1, 2, 5, 17])
def test_vendi_identical_items_is_one(n):
    row = np.random.default_rng(n).normal(size=(1, 12))
    assert vendi_score(np.repeat(row, n, axis=0)) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("n", [1, 2, 5, 17])
def test_vendi_orthogonal_items_is_n(n):
    q, _ = np.linalg.qr(np.random.default_rng(n).normal(size=(32, n)))  # (32, n) orthonormal
    scales = np.arange(1, n + 1)[:, None]  # the norm of an item does not matter
    assert vendi_score(q.T * scales) == pytest.approx(n, abs=1e-6)


def test_vendi_is_monotone_between_identical_and_orthogonal():
    n = 6
    e = np.eye(n + 1)
    values = []
    for theta in np.linspace(0, np.pi / 2, 12):
        x = np.cos(theta) * e[0] + np.sin(theta) * e[1:]  # (n, n + 1): shared + private part
        values.append(vendi_score(x))
    assert values[0] == pytest.approx(1.0) and values[-1] == pytest.approx(n)
    assert all(b > a for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("shape", [(7, 3), (5, 40)])  # n > d uses XᵀX, n ≤ d uses XXᵀ
def test_vendi_matches_an_independent_computation(shape):
    x = np.random.default_rng(0).normal(size=shape)
    assert vendi_score(x) == pytest.approx(reference_vendi(x), rel=1e-9)
    assert vendi_score(x[::-1]) == pytest.approx(vendi_score(x), rel=1e-9)  # order-free
    assert vendi_score(torch.from_numpy(x)) == pytest.approx(vendi_score(x), rel=1e-9)


def test_vendi_centring():
    rng = np.random.default_rng(0)
    spread = rng.normal(size=(8, 50))
    shared = spread * 0.05 + 10.0  # same spread on top of a large common offset (a background)
    assert vendi_score(shared) < 1.05  # raw cosine similarity sees nearly identical items
    assert vendi_score(shared, center=True) == pytest.approx(vendi_score(spread, center=True))
    assert vendi_score(shared, center=True) > 4
    assert vendi_score(np.ones((4, 3)), center=True) == 1.0  # nothing left after centring


def test_vendi_rejects_bad_shapes():
    with pytest.raises(UserError, match="expected \\(n, d\\)"):
        vendi_score(np.zeros(5))


def test_video_vendi_identical_and_diverse_videos():
    videos = np.stack([render_clip("a red circle moves right", s)[0] for s in range(6)])
    collapsed = np.repeat(videos[:1], 6, axis=0)
    assert video_vendi(collapsed) == pytest.approx(1.0, abs=1e-6)
    assert video_vendi(videos) > video_vendi(collapsed)
    assert video_vendi(videos, center=True) > video_vendi(videos)  # the shared mean is removed
    # uint8 and [-1, 1] float inputs see the same pixel features.
    assert video_vendi(to_unit(videos)) == pytest.approx(video_vendi(videos), rel=1e-5)


def test_video_vendi_averages_vendi_over_keyframes():
    rng = np.random.default_rng(0)
    videos = rng.integers(0, 256, size=(5, 9, 4, 4, 3), dtype=np.uint8)
    expected = np.mean(
        [vendi_score(videos[:, k].reshape(5, -1) / 255.0) for k in (0, 4, 8)]  # linspace(0, 8, 3)
    )
    assert video_vendi(videos, keyframes=3) == pytest.approx(expected, rel=1e-9)
    seen = []

    def features(frames):  # (n, H, W, 3) -> (n, d)
        seen.append(frames.shape)
        return frames.reshape(len(frames), -1).astype(float).mean(axis=1, keepdims=True)

    assert video_vendi(videos, keyframes=2, features=features) == pytest.approx(1.0)
    assert seen == [(5, 4, 4, 3)] * 2
    with pytest.raises(UserError, match="keyframes=10"):
        video_vendi(videos, keyframes=10)
    with pytest.raises(UserError, match="expected \\(n, T, H, W, 3\\)"):
        video_vendi(videos[0])


# --- Fréchet ----------------------------------------------------------------------------------


def test_frechet_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(400, 16)) @ np.random.default_rng(1).normal(
        size=(16, 16)
    )
    stats = FrechetStats.from_features(x)
    scale = np.trace(stats.cov)
    assert abs(frechet_distance(x, x)) < 1e-6 * scale


def test_frechet_matches_the_closed_form_for_diagonal_gaussians():
    mu_a, mu_b = np.array([0.0, 1.0, -2.0]), np.array([1.0, 3.0, 0.5])
    var_a, var_b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    a, b = FrechetStats(mu_a, np.diag(var_a)), FrechetStats(mu_b, np.diag(var_b))
    # ‖μa − μb‖² + Σ (σa − σb)² with σ the standard deviations.
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    assert expected == pytest.approx(1 + 4 + 6.25 + 4 + 1 + 0)
    assert frechet_distance_from_stats(a, b) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)


def test_frechet_matches_an_independent_computation_for_full_covariances():
    rng = np.random.default_rng(3)
    xa = rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5))
    xb = rng.normal(size=(200, 5)) @ rng.normal(size=(5, 5)) + 0.5
    a, b = FrechetStats.from_features(xa), FrechetStats.from_features(xb)
    # tr((Σa Σb)^{1/2}) = tr((Σa^{1/2} Σb Σa^{1/2})^{1/2}), computed with symmetric eigh.
    w, v = np.linalg.eigh(a.cov)
    root_a = v @ np.diag(np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(root_a @ b.cov @ root_a)
    expected = np.sum((a.mean - b.mean) ** 2) + np.trace(a.cov) + np.trace(b.cov)
    expected -= 2 * np.sum(np.sqrt(np.clip(inner, 0, None)))
    assert frechet_distance(xa, xb) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(xa, xb) == pytest.approx(frechet_distance(xb, xa), rel=1e-8)


def test_shifting_the_mean_adds_its_squared_norm():
    rng = np.random.default_rng(4)
    xa = rng.normal(size=(500, 6))
    xb = rng.normal(size=(500, 6)) * 1.3
    xb += xa.mean(axis=0) - xb.mean(axis=0)  # equal means, so the shift adds no cross term
    delta = np.array([0.5, -1.0, 2.0, 0.0, 0.25, -0.75])
    base = frechet_distance(xa, xb)
    assert frechet_distance(xa, xb + delta) == pytest.approx(base + delta @ delta, rel=1e-8)
    assert frechet_distance(xa, xa + delta) == pytest.approx(delta @ delta, rel=1e-8)


def test_frechet_survives_singular_covariances():
    rng = np.random.default_rng(5)
    xa, xb = rng.normal(size=(4, 10)), rng.normal(size=(4, 10))  # rank 3 covariances in 10-D
    d = frechet_distance(xa, xb)
    assert np.isfinite(d) and d > 0
    assert abs(frechet_distance(xa, xa)) < 1e-4


def test_frechet_stats_save_load_round_trip(tmp_path):
    x = np.random.default_rng(6).normal(size=(50, 4))
    stats = FrechetStats.from_features(x)
    path = tmp_path / "ref.npz"
    stats.save(path)
    loaded = FrechetStats.load(path)
    assert np.array_equal(loaded.mean, stats.mean) and np.array_equal(loaded.cov, stats.cov)
    assert frechet_distance(loaded, x) == pytest.approx(0.0, abs=1e-8)


def test_frechet_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        FrechetStats.load(tmp_path / "missing.npz")
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3))
    with pytest.raises(UserError, match="lacks 'mean'/'cov'"):
        FrechetStats.load(tmp_path / "bad.npz")
    with pytest.raises(UserError, match="feature dimensions differ"):
        frechet_distance(np.zeros((5, 3)) + np.eye(5, 3), np.eye(5, 4))
    with pytest.raises(UserError, match="at least 2"):
        FrechetStats.from_features(np.zeros((1, 3)))
