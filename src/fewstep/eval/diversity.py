"""Sample diversity: the Vendi score and DOLLAR's keyframe video Vendi (DOLLAR Eq. 17).

Distilled students tend to collapse onto few modes (VSD in DOLLAR Tab. 3); these scores measure
how many *effectively different* samples a set of generations contains.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from fewstep.errors import UserError


def vendi_score(features: np.ndarray, center: bool = False) -> float:
    """Vendi score (Friedman & Dieng, 2022, "The Vendi Score", arXiv:2210.02410) with the cosine
    kernel, as DOLLAR uses it for Eq. 17.

    With rows ``x_i`` of ``features`` (n, d) L2-normalised, ``K = X Xᵀ / n`` (so tr K = 1) and
    eigenvalues ``λ_i`` of K (negatives from round-off clipped to 0)::

        Vendi = exp(− Σ_i λ_i log λ_i),    0 log 0 = 0.

    It is 1 when all items are identical and n when they are mutually orthogonal: the effective
    number of distinct items.

    ``center=True`` subtracts the mean over the n items before normalising. Raw pixel vectors all
    share a large positive mean (the background), which makes every cosine similarity close to 1
    and squeezes the score towards 1; centring measures the spread around the set's mean
    instead. The default (False) is the pure formula on raw features, as in DOLLAR. An item that
    becomes the zero vector (it equals the mean) contributes nothing; the eigenvalues are then
    renormalised to sum to 1, and a set whose items all vanish scores 1.
    """
    x = _as_2d(features).astype(np.float64)  # (n, d)
    if center:
        x = x - x.mean(axis=0, keepdims=True)
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # (n, 1)
    x = np.divide(x, norms, out=np.zeros_like(x), where=norms > 1e-12)
    n = x.shape[0]
    # The n × n kernel and the d × d Gram matrix XᵀX/n share their non-zero eigenvalues; use the
    # smaller one.
    k = x @ x.T / n if n <= x.shape[1] else x.T @ x / n
    lam = np.clip(np.linalg.eigvalsh(k), 0.0, None)
    if lam.sum() <= 0:
        return 1.0
    lam = lam / lam.sum()
    lam = lam[lam > 0]
    return float(np.exp(-(lam * np.log(lam)).sum()))


def video_vendi(
    videos,
    keyframes: int = 4,
    features: Callable[[np.ndarray], np.ndarray] | None = None,
    center: bool = False,
) -> float:
    """DOLLAR Eq. 17: ``Diversity = (1/K) Σ_k Vendi([f_1^k, …, f_n^k])``.

    ``videos`` is ``(n, T, H, W, 3)`` — n samples of *one* prompt — uint8, or float in [−1, 1]
    (numpy or torch). ``K = keyframes`` equally spaced frame indices ``round(linspace(0, T−1, K))``
    are chosen; for each, ``f_i^k`` are features of frame k of video i: by default the raw pixel
    vector in [0, 1] (uint8 / 255, or (x + 1) / 2 for floats), or ``features(frames)`` mapping
    ``(n, H, W, 3)`` frames (same dtype as given) to ``(n, d)``. See :func:`vendi_score` for
    ``center``.
    """
    if isinstance(videos, torch.Tensor):
        videos = videos.detach().cpu().numpy()
    videos = np.asarray(videos)
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise UserError(f"videos have shape {videos.shape}; expected (n, T, H, W, 3)")
    T = videos.shape[1]
    if not 1 <= keyframes <= T:
        raise UserError(f"keyframes={keyframes} is invalid; expected 1..{T} (the clip length)")
    indices = np.round(np.linspace(0, T - 1, keyframes)).astype(int)  # (K,)

    scores = []
    for k in indices:
        frames = videos[:, k]  # (n, H, W, 3)
        if features is None:
            f = _unit_pixels(frames).reshape(len(frames), -1)  # (n, H·W·3)
        else:
            f = np.asarray(features(frames))  # (n, d)
        scores.append(vendi_score(f, center=center))
    return float(np.mean(scores))


def _unit_pixels(frames: np.ndarray) -> np.ndarray:
    """uint8 levels or float in [−1, 1] → float64 in [0, 1]."""
    if frames.dtype == np.uint8:
        return frames.astype(np.float64) / 255.0
    return (np.clip(frames.astype(np.float64), -1.0, 1.0) + 1.0) / 2.0


def _as_2d(features) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] < 1:
        raise UserError(f"features have shape {features.shape}; expected (n, d) with n >= 1")
    return features
