"""The plain diffusion / flow-matching loss in the denoiser's own parameterisation.

With ``x0`` the clean latents, ``eps ~ N(0, I)`` and ``t`` from a training distribution
(logit-normal by default, Esser et al. 2024)::

    x_t    = alpha(t)·x0 + sigma(t)·eps                       (DESIGN §2; DOLLAR Eq. 1)
    target = from_x0_eps(prediction_type, x0, eps, alpha, sigma)
    loss   = mean over (C, T, H, W) of (network(x_t, t, c) − target)²      → (B,)

For a flow-matching denoiser the target is the velocity ``eps − x0`` (rectified flow; Wan),
for ``eps`` it is the noise (DDPM), for ``v`` it is ``alpha·eps − sigma·x0`` — the conversion
is :func:`fewstep.diffusion.parameterization.from_x0_eps`, never re-derived here. This is the
``finetune`` recipe's loss and the fake-score loss of distribution-matching recipes.

Caption dropout (for classifier-free guidance) replaces the caption of a sample by the null
caption with probability ``caption_dropout``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from ..diffusion.parameterization import from_x0_eps
from ..models.backbones import Conditioning
from .base import (Batch, LogitNormalTimes, Objective, ObjectiveConfig, ObjectiveOutput, Roles, StepContext,
                   TimestepsConfig, register_objective)


class FlowMatchingLossConfig(ObjectiveConfig):
    kind: Literal["flow_matching"] = "flow_matching"
    timesteps: TimestepsConfig = Field(default_factory=LogitNormalTimes, description="training-time distribution of t")
    caption_dropout: float = Field(0.0, ge=0, le=1, description="probability of training a sample unconditionally")


def drop_captions(cond: Conditioning, uncond: Conditioning, drop: torch.Tensor) -> Conditioning:
    """Per sample, ``uncond`` where ``drop`` (B,) is True, else ``cond``; a dropped sample keeps its
    image (``uncond.with_visual_of(cond)``, the unconditional branch of an I2V model's CFG)."""
    both = Conditioning.cat([cond, uncond.with_visual_of(cond)])  # (2B, L, D): pads both to one token length
    c, u = both.index(slice(0, len(cond))), both.index(slice(len(cond), None))
    pick = drop.to(c.context.device)
    context = torch.where(pick[:, None, None], u.context, c.context)  # (B, L, D)
    mask = None if c.mask is None else torch.where(pick[:, None], u.mask, c.mask)  # (B, L)
    extra = {k: torch.where(pick.view(-1, *([1] * (v.ndim - 1))), u.extra[k], v) for k, v in c.extra.items()}
    return Conditioning(context, mask, extra)


def denoising_loss(denoiser, x0: Tensor, t: Tensor, eps: Tensor, cond: Conditioning) -> Tensor:
    """Per-sample ``mean ‖out(x_t, t) − target(x0, ε)‖²`` in the denoiser's own prediction type,
    ``x_t = α(t)·x0 + σ(t)·ε`` (no CFG); computed in at least float32. Shared by every objective
    and pretraining stage that trains a denoiser on (x0, ε) pairs."""
    alpha, sigma = denoiser.schedule.coefficients(t, x0)  # (B, 1, 1, 1, 1) each
    x_t = alpha * x0 + sigma * eps
    target = from_x0_eps(denoiser.prediction_type, x0, eps, alpha, sigma)
    out = denoiser(x_t, t, cond)  # raw network output, (B, C, T, H, W)
    dtype = torch.promote_types(out.dtype, torch.float32)
    return (out.to(dtype) - target.to(dtype)).pow(2).flatten(1).mean(1)  # (B,)


@register_objective
class FlowMatchingLoss(Objective):
    """Denoising loss of ``config.role``'s denoiser in its own prediction type (see module doc)."""

    kind = "flow_matching"
    Config = FlowMatchingLossConfig

    def __call__(self, batch: Batch, roles: Roles, ctx: StepContext) -> ObjectiveOutput:
        denoiser = roles[self.role].module
        x0 = batch.latents  # (B, C, T, H, W)
        t = ctx.times(self.distribution, "t").to(x0.dtype)  # (B,)
        eps = ctx.randn(tuple(x0.shape[1:]), "eps", dtype=x0.dtype)  # (B, C, T, H, W)
        cond = batch.cond
        if self.config.caption_dropout > 0:
            cond = drop_captions(batch.cond, batch.uncond, ctx.rand("caption_dropout") < self.config.caption_dropout)

        mse = denoising_loss(denoiser, x0, t, eps, cond)  # (B,)
        return self.output({"mse": mse}, {"t_mean": float(t.mean())})
