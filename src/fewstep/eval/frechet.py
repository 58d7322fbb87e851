"""Fréchet distance between Gaussians fitted to two feature sets (FID / FVD style).

For N(μ₁, Σ₁) and N(μ₂, Σ₂) (Dowson & Landau, 1982; Heusel et al., 2017 for FID)::

    d² = ‖μ₁ − μ₂‖² + tr(Σ₁) + tr(Σ₂) − 2 tr((Σ₁ Σ₂)^{1/2})

The matrix square root is ``scipy.linalg.sqrtm``, as in the reference FID code
(pytorch-fid / TTUR): if it is not finite (Σ₁Σ₂ near singular) it is recomputed on
``(Σ₁ + εI)(Σ₂ + εI)``, and the real part is kept (tiny imaginary parts are round-off).
Reference statistics of real clips can be cached with :class:`FrechetStats`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import linalg

from fewstep.errors import UserError

EPS = 1e-6  # diagonal offset for a singular Σ₁Σ₂
IMAG_TOLERANCE = 1e-3  # largest |imaginary part| of the square root's diagonal accepted as round-off


@dataclass(frozen=True)
class FrechetStats:
    """Mean ``(d,)`` and covariance ``(d, d)`` of a feature set."""

    mean: np.ndarray  # (d,)
    cov: np.ndarray  # (d, d)

    @classmethod
    def from_features(cls, features) -> FrechetStats:
        """Fit from ``(n, d)`` features (n ≥ 2): sample mean and unbiased covariance."""
        x = _as_features(features)
        if x.shape[0] < 2:
            raise UserError(f"features have {x.shape[0]} rows; expected at least 2 to fit a covariance")
        return cls(x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False)))

    def save(self, path: str | Path) -> None:
        """Write ``mean`` and ``cov`` to a ``.npz`` file."""
        np.savez(path, mean=self.mean, cov=self.cov)

    @classmethod
    def load(cls, path: str | Path) -> FrechetStats:
        """Read statistics written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"Fréchet statistics file {path} not found; expected a .npz from FrechetStats.save")
        with np.load(path) as data:
            if "mean" not in data or "cov" not in data:
                raise UserError(f"{path} lacks 'mean'/'cov' arrays; expected a .npz from FrechetStats.save")
            return cls(data["mean"].astype(np.float64), data["cov"].astype(np.float64))


def frechet_distance_from_stats(a: FrechetStats, b: FrechetStats, eps: float = EPS) -> float:
    """d² = ‖μ_a − μ_b‖² + tr Σ_a + tr Σ_b − 2 tr((Σ_a Σ_b)^{1/2}) (module docstring)."""
    if a.mean.shape != b.mean.shape or a.cov.shape != b.cov.shape:
        raise UserError(
            f"feature dimensions differ: {a.mean.shape[0]} vs {b.mean.shape[0]}; expected equal"
        )
    diff = a.mean - b.mean  # (d,)
    covmean = linalg.sqrtm(a.cov @ b.cov)  # (d, d), possibly complex
    if not np.isfinite(covmean).all():
        offset = np.eye(a.cov.shape[0]) * eps
        covmean = linalg.sqrtm((a.cov + offset) @ (b.cov + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAG_TOLERANCE):
            largest = np.max(np.abs(covmean.imag))
            raise ValueError(f"sqrtm(Σ_a Σ_b) has an imaginary component {largest:.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2.0 * np.trace(covmean))


def frechet_distance(feats_a, feats_b) -> float:
    """Fréchet distance between Gaussians fitted to ``feats_a`` (n, d) and ``feats_b`` (m, d);
    either may also be a :class:`FrechetStats` (e.g. cached reference statistics)."""
    a = feats_a if isinstance(feats_a, FrechetStats) else FrechetStats.from_features(feats_a)
    b = feats_b if isinstance(feats_b, FrechetStats) else FrechetStats.from_features(feats_b)
    return frechet_distance_from_stats(a, b)


def _as_features(features) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise UserError(f"features have shape {x.shape}; expected (n, d)")
    return x
