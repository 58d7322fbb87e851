"""GAN with the frozen teacher as feature extractor and one head per feature level (RGTD (000) §3.3,
Eq. 11–12; LADD, Sauer et al. 2024).

``D_ξ(F_φ(x_τ))``: the frozen teacher ``F_φ`` denoises the noisy latent ``x_τ`` at ``τ`` with the
caption, and its hidden tokens after each of several transformer blocks
(:func:`~fewstep.models.features.extract_features`, any backbone) are laid out on the token grid
``(B, D, T', H', W')``; the discriminator role :class:`FeatureHeads` holds one light head per level
(a :class:`~fewstep.objectives.gan.FrameHead` per frame, averaged) and the blocks it reads, so the
levels are named once, in its ``build``. The losses (:mod:`fewstep.objectives.gan`, ``loss: hinge``
by default) apply to every head's logit and are averaged over heads::

    L_gen  = −mean_h D_h(F(x_τ))                                        Eq. 11   (kind feature_gan_generator)
    L_disc = mean_h [max(0, 1 − D_h(F(x_τ^gt))) + max(0, 1 + D_h(F(x_τ)))]   Eq. 12   (kind feature_gan_discriminator)

``x_τ = α_τ·x̂0 + σ_τ·ε'`` is the student's sample ``x̂0 = G_θ(ε)`` (the run's generator, the same
``ε`` as its other objectives), ``x_τ^gt`` a real clip ``x0`` of the batch (toy-world clips, or a
latent cache of real videos for a real teacher — not a text-only cache, whose latents are zeros)
noised to the same ``τ`` with its own noise; ``τ ~ timesteps`` per sample. The generator's term
reaches the student only (:func:`~fewstep.objectives.direct_reward.through_input`): neither the
teacher nor the heads accumulate gradients; the discriminator's term sees a detached sample.
Unlike LADD's heads, ours take no τ or caption of their own: the teacher's features depend on both.
"""

from __future__ import annotations

from typing import ClassVar, Literal, Sequence

import torch
from einops import rearrange
from pydantic import Field
from torch import Tensor

from ..models.backbones import Conditioning
from ..models.features import extract_features, token_grid
from .base import (Batch, LogitNormalTimes, Objective, ObjectiveConfig, ObjectiveOutput, RoleName, Roles,
                   StepContext, TimestepsConfig, register_objective)
from .direct_reward import through_input
from .gan import GANLoss, MultiHeads, discriminator_loss, generator_loss
from .student import Backprop, student_sample


class FeatureHeads(MultiHeads):
    """The discriminator ``D_ξ``: one :class:`~fewstep.objectives.gan.FrameHead` per teacher block in ``blocks``
    (negative indices count from the last), on features of width ``channels``: ``[(B, D, T', H', W')] → (B, n)``."""

    def __init__(self, channels: int, blocks: Sequence[int], width: int = 64):
        super().__init__([channels] * len(blocks), width)
        self.blocks = list(blocks)


def feature_maps(denoiser, x_t: Tensor, t: Tensor, cond: Conditioning, blocks: Sequence[int]) -> list[Tensor]:
    """``F_φ(x_t)``: the tokens after each of ``blocks`` on the token grid, ``len(blocks) × (B, D, T', H', W')``."""
    tokens = extract_features(denoiser, x_t, t, cond, blocks)  # (B, N, D) each
    gt, gh, gw = token_grid(denoiser, x_t.shape, tokens[0].shape[1])
    return [rearrange(f, "b (t h w) d -> b d t h w", t=gt, h=gh, w=gw) for f in tokens]


class FeatureGANConfig(ObjectiveConfig):
    """Keys both objectives have."""

    SAMPLES_STUDENT: ClassVar[bool] = True
    loss: GANLoss = Field("hinge", description="GAN loss form (RGTD: hinge, Eq. 11–12)")
    features: RoleName = Field("teacher", description="the frozen denoiser F_φ whose block features D reads")
    timesteps: TimestepsConfig = Field(default_factory=LogitNormalTimes, description="distribution of τ")


class FeatureGANGeneratorConfig(FeatureGANConfig):
    kind: Literal["feature_gan_generator"] = "feature_gan_generator"
    backprop: Backprop = Field("all", description="'all': through every generator step; 'last': last call only")
    discriminator: RoleName = Field("discriminator", description="the role holding the heads (FeatureHeads)")

    def reads(self) -> set[str]:
        return {self.features, self.discriminator}


class FeatureGANDiscriminatorConfig(FeatureGANConfig):
    kind: Literal["feature_gan_discriminator"] = "feature_gan_discriminator"
    role: RoleName = Field("discriminator", description="the role holding the heads (FeatureHeads)")
    generator: RoleName = Field("student", description="the role whose samples are the fakes")

    def reads(self) -> set[str]:
        return {self.features, self.generator}


def noised(schedule, x0: Tensor, tau: Tensor, ctx: StepContext, name: str) -> Tensor:
    """``α_τ·x0 + σ_τ·ε`` with ``ε`` drawn per sample as ``name``."""
    return schedule.add_noise(x0, ctx.randn(tuple(x0.shape[1:]), name, dtype=x0.dtype), tau)


@register_objective
class FeatureGANGenerator(Objective):
    """RGTD Eq. 11: ``−mean_h D_h(F(x_τ))`` on the student's noised sample; gradient to the student only."""

    kind = "feature_gan_generator"
    Config = FeatureGANGeneratorConfig

    def __call__(self, batch: Batch, roles: Roles, ctx: StepContext) -> ObjectiveOutput:
        cfg = self.config
        teacher, heads = roles[cfg.features].module, roles[cfg.discriminator].module
        x_hat = student_sample(roles[self.role].module, batch, ctx, role=self.role, backprop=cfg.backprop).x0
        tau = ctx.times(self.distribution, "gan/tau").to(x_hat.dtype)  # (B,)
        eps = ctx.randn(tuple(x_hat.shape[1:]), "gan/fake", dtype=x_hat.dtype)  # (B, C, T, H, W)
        seen: dict[str, Tensor] = {}

        def loss_of(x: Tensor) -> Tensor:
            x_tau = teacher.schedule.add_noise(x, eps, tau)
            seen["d_fake"] = heads(feature_maps(teacher, x_tau, tau, batch.cond, heads.blocks))  # (B, n_heads)
            return generator_loss(cfg.loss, seen["d_fake"]).mean(1)  # (B,)

        loss = through_input(loss_of, x_hat)
        return self.output({"gen": loss}, {"d_fake": float(seen["d_fake"].detach().mean()),
                                           "tau_mean": float(tau.mean())})


@register_objective
class FeatureGANDiscriminator(Objective):
    """RGTD Eq. 12: hinge on real clips and detached student samples noised to the same τ, per head."""

    kind = "feature_gan_discriminator"
    Config = FeatureGANDiscriminatorConfig

    def __call__(self, batch: Batch, roles: Roles, ctx: StepContext) -> ObjectiveOutput:
        cfg = self.config
        teacher, heads = roles[cfg.features].module, roles[self.role].module
        with torch.no_grad():
            x_hat = student_sample(roles[cfg.generator].module, batch, ctx, role=cfg.generator).x0  # sg(G_θ(ε))
            x0 = batch.latents.to(x_hat.dtype)  # real clips
            tau = ctx.times(self.distribution, "gan/tau").to(x0.dtype)  # (B,) one τ for both
            real = feature_maps(teacher, noised(teacher.schedule, x0, tau, ctx, "gan/real"), tau, batch.cond,
                                heads.blocks)
            fake = feature_maps(teacher, noised(teacher.schedule, x_hat, tau, ctx, "gan/fake"), tau, batch.cond,
                                heads.blocks)
        d_real, d_fake = heads(real), heads(fake)  # (B, n_heads) each
        loss = discriminator_loss(cfg.loss, d_real, d_fake).mean(1)  # (B,)
        return self.output({"disc": loss}, {"d_real": float(d_real.detach().mean()),
                                            "d_fake": float(d_fake.detach().mean()), "tau_mean": float(tau.mean())})
