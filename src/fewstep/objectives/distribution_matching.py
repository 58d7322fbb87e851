"""Variational score distillation / distribution matching (DOLLAR (001) Eq. 10–13; DMD2), and the
fake-score diffusion loss on student samples (DOLLAR Eq. 4 on ``x̂``; Alg. 1 lines 13–14).

**VSD (kind ``vsd``, role student).** The student's sample ``x̂ = G_θ(ε)`` (DOLLAR Eq. 11; the
few-step generator of :mod:`fewstep.objectives.student`) is diffused to ``t ~ U[0.02, 0.98]``
(DOLLAR §3.3), ``x_t = α·x̂ + σ·ε'``, and both score models denoise it::

    x0_real = teacher.predict(x_t, t, c, cfg_scale=w_real, uncond=∅).x0     (real score, CFG)
    x0_fake = fake_score.predict(x_t, t, c).x0                             (fake score, no CFG)

With ``s(x_t) = −(x_t − α·x0)/σ²`` (DOLLAR Eq. 13), ``s_real − s_fake = α/σ²·(x0_real − x0_fake)``,
so the KL gradient of DOLLAR Eq. 12, ``−(s_real − s_fake)``, points along ``x0_fake − x0_real``.
DMD2 (Yin et al. 2024, Eq. 2 and its code) replaces the weight ``α/σ²`` by a per-sample
normalisation, computed in (at least) fp32 and detached::

    grad = (x0_fake − x0_real) / mean_{C,T,H,W} |x̂ − x0_real|                  (B, C, T, H, W)
    loss = 0.5 · mean_{C,T,H,W} (x̂ − sg(x̂ − grad))²                           (B,)

The stop-gradient MSE surrogate has ``∂loss/∂x̂ = grad / D`` with ``D = C·T·H·W`` (the mean over
dimensions; DMD2 also averages), so ``∇_θ loss = (grad/D)·∇_θ G_θ(ε)`` — DOLLAR Eq. 12 with the
DMD2 weight. Its value is ``0.5·mean(grad²)``, a diagnostic, not the KL. Our CFG convention is
``uncond + w·(cond − uncond)``: DOLLAR's real-score weight 3.5 (its Eq. 9 form) is our 4.5.

**Fake score (kind ``fake_score``, role fake_score).** The fake score model is trained with the
plain diffusion loss on *detached* student samples, in its own prediction type (DOLLAR Eq. 4
exactly for a conjugate-parameterised model)::

    x̂ = sg(G_θ(ε)),   x_t = α·x̂ + σ·ε',   loss = mean (fake(x_t, t, c) − from_x0_eps(kind, x̂, ε', α, σ))²

The student sample is regenerated under ``torch.no_grad`` with the generator noise drawn as the
student (:func:`fewstep.objectives.student.generator_noise`), so for a sample it is the same
``ε`` — and, with unchanged weights, the same ``x̂`` — as the VSD term of the step. Times default
to ``U[0.02, 0.98]``, the range the VSD term queries the fake score on (DMD2 trains its fake
score on the same range).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from .flow_matching import denoising_loss
from .base import (Batch, Objective, ObjectiveConfig, ObjectiveOutput, RoleName, Roles, StepContext,
                   TimestepsConfig, UniformTimes, register_objective)
from .student import Backprop, student_sample


def _vsd_times() -> UniformTimes:
    return UniformTimes(a=0.02, b=0.98)


def dmd_gradient(x_hat: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """DMD2's per-sample normalised VSD gradient ``(x0_fake − x0_real) / mean|x̂ − x0_real|``.

    All ``(B, C, T, H, W)``; computed in at least fp32. A sample with ``x̂ == x0_real`` (weight 0,
    where DMD2's ``nan_to_num`` would give ±3e38) gets a zero gradient.
    """
    dtype = torch.promote_types(x_hat.dtype, torch.float32)
    x_hat, x0_real, x0_fake = x_hat.to(dtype), x0_real.to(dtype), x0_fake.to(dtype)
    p_real, p_fake = x_hat - x0_real, x_hat - x0_fake  # (B, C, T, H, W) each
    weight = p_real.abs().flatten(1).mean(1).reshape(-1, *([1] * (x_hat.ndim - 1)))  # (B, 1, 1, 1, 1)
    grad = (p_real - p_fake) / torch.where(weight > 0, weight, 1.0)
    return torch.nan_to_num(torch.where(weight > 0, grad, 0.0))


def stop_gradient_mse(x_hat: Tensor, grad: Tensor) -> Tensor:
    """``0.5 · mean_dims (x̂ − sg(x̂ − grad))²`` per sample (B,): its gradient w.r.t. x̂ is ``grad / D``."""
    x_hat = x_hat.to(grad.dtype)
    target = (x_hat - grad).detach()
    return 0.5 * (x_hat - target).pow(2).flatten(1).mean(1)


class VSDConfig(ObjectiveConfig):
    kind: Literal["vsd"] = "vsd"
    SAMPLES_STUDENT: ClassVar[bool] = True
    backprop: Backprop = Field("all", description="'all': through every generator step; 'last': last call only")
    timesteps: TimestepsConfig = Field(default_factory=_vsd_times,
                                       description="distribution of the diffusion time t (DOLLAR: U[0.02, 0.98])")
    real_cfg_scale: float | None = Field(
        4.5, description="teacher CFG w in uncond + w·(cond − uncond) (DOLLAR's 3.5 is our 4.5); null = none")

    teacher: RoleName = Field("teacher", description="the role giving the real score (frozen)")
    fake_score: RoleName = Field("fake_score", description="the role giving the fake score")

    def reads(self) -> set[str]:
        return {self.teacher, self.fake_score}


@register_objective
class VSD(Objective):
    """DOLLAR Eq. 10–13 with DMD2's normalised gradient and stop-gradient surrogate (module doc)."""

    kind = "vsd"
    Config = VSDConfig

    def gradient(self, x_hat: Tensor, batch: Batch, roles: Roles, ctx: StepContext) -> tuple[Tensor, Tensor]:
        """``(grad, t)``: the detached VSD gradient at ``x̂`` (B, C, T, H, W) and the times used (B,)."""
        teacher, fake = roles[self.config.teacher].module, roles[self.config.fake_score].module
        with torch.no_grad():
            x_hat = x_hat.detach()
            t = ctx.times(self.distribution, "vsd/t").to(x_hat.dtype)  # (B,)
            eps = ctx.randn(tuple(x_hat.shape[1:]), "vsd/eps", dtype=x_hat.dtype)  # ε' (B, C, T, H, W)
            x_t = teacher.schedule.add_noise(x_hat, eps, t)
            real = teacher.predict(x_t, t, batch.cond, cfg_scale=self.config.real_cfg_scale, uncond=batch.uncond)
            fake_pred = fake.predict(x_t, t, batch.cond)
            return dmd_gradient(x_hat, real.x0, fake_pred.x0), t

    def __call__(self, batch: Batch, roles: Roles, ctx: StepContext) -> ObjectiveOutput:
        student = roles[self.role].module
        x_hat = student_sample(student, batch, ctx, role=self.role, backprop=self.config.backprop).x0  # G_θ(ε)
        grad, t = self.gradient(x_hat, batch, roles, ctx)
        loss = stop_gradient_mse(x_hat, grad)  # (B,)
        return self.output({"vsd": loss}, {"t_mean": float(t.mean()), "grad_abs": float(grad.abs().mean())})


class FakeScoreLossConfig(ObjectiveConfig):
    kind: Literal["fake_score"] = "fake_score"
    SAMPLES_STUDENT: ClassVar[bool] = True
    role: RoleName = Field("fake_score", description="the fake score model being trained")
    generator: RoleName = Field("student", description="the role whose samples G(ε) the fake score models")
    timesteps: TimestepsConfig = Field(default_factory=_vsd_times, description="training-time distribution of t")

    def reads(self) -> set[str]:
        return {self.generator}


@register_objective
class FakeScoreLoss(Objective):
    """DOLLAR Eq. 4 (Alg. 1 l. 13–14): the fake score's diffusion loss on detached student samples."""

    kind = "fake_score"
    Config = FakeScoreLossConfig

    def __call__(self, batch: Batch, roles: Roles, ctx: StepContext) -> ObjectiveOutput:
        fake, student = roles[self.role].module, roles[self.config.generator].module
        with torch.no_grad():  # x̂ = sg(G_θ(ε)), the same ε as the student's objectives
            x_hat = student_sample(student, batch, ctx, role=self.config.generator).x0  # (B, C, T, H, W)
        t = ctx.times(self.distribution, "fake/t").to(x_hat.dtype)  # (B,)
        eps = ctx.randn(tuple(x_hat.shape[1:]), "fake/eps", dtype=x_hat.dtype)  # (B, C, T, H, W)
        mse = denoising_loss(fake, x_hat, t, eps, batch.cond)  # (B,), the fake model's own parameterisation
        return self.output({"mse": mse}, {"t_mean": float(t.mean())})
