"""A differentiable sharpness proxy: the Laplacian-to-gradient energy ratio of each frame.

For a frame ``x`` (per colour channel) with forward differences ``∇x`` and the 5-point
Laplacian ``Δx``::

    r(x) = Σ (Δx)² / (Σ ‖∇x‖² + ε),        reward = mean_t r(x_t) / 8   ∈ [0, 1]

Both sums are quadratic in the contrast, so ``r`` does not depend on it: it measures how
*abruptly* intensity changes, not how much. A step edge has ``r ≈ 2``; blurring an edge with a
Gaussian of width σ scales ``Δx`` by about 1/σ relative to ``∇x``, so ``r`` falls like 1/σ².
Since ``Δ = −∇ᵀ∇`` and ``‖∇ᵀ∇‖ ≤ 8`` on a grid, ``r ≤ 8``, hence the normalisation. A flat
frame scores 0 (``ε`` keeps the ratio and its gradient finite). Like every sharpness proxy it
also rewards noise (white noise has ``r ≈ 5``): an aesthetic stand-in to be optimised jointly
with the semantic toy-CLIP reward (RGTD Eq. 13), not alone.
"""

from __future__ import annotations

from torch import Tensor

from .base import Reward, check_frames

R_MAX = 8.0  # upper bound of the Laplacian-to-gradient energy ratio on a grid
EPS_PER_PIXEL = 1e-4  # ε = EPS_PER_PIXEL · H · W · 3 (frames in [−1, 1])


def energy_ratio(frames: Tensor) -> Tensor:
    """``(B, T, H, W, 3)`` → Laplacian-to-gradient energy ratio per frame ``(B, T)``."""
    x = frames.movedim(-1, 2)  # (B, T, 3, H, W)
    gx = x[..., :, 1:] - x[..., :, :-1]  # (B, T, 3, H, W − 1)
    gy = x[..., 1:, :] - x[..., :-1, :]  # (B, T, 3, H − 1, W)
    lap = (x[..., 1:-1, 2:] + x[..., 1:-1, :-2] + x[..., 2:, 1:-1] + x[..., :-2, 1:-1]
           - 4 * x[..., 1:-1, 1:-1])  # (B, T, 3, H − 2, W − 2)
    grad_energy = gx.square().sum(dim=(2, 3, 4)) + gy.square().sum(dim=(2, 3, 4))  # (B, T)
    eps = EPS_PER_PIXEL * x.shape[2] * x.shape[3] * x.shape[4]
    return lap.square().sum(dim=(2, 3, 4)) / (grad_energy + eps)


class SharpnessReward(Reward):
    """Mean over frames of the normalised energy ratio (module docstring); differentiable."""

    differentiable = True

    def reward(self, frames: Tensor, prompts: list[str] | None = None) -> Tensor:
        check_frames(frames, prompts)
        return energy_ratio(frames.float()).mean(dim=1) / R_MAX
