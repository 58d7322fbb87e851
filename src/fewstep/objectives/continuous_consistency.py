"""Continuous-time consistency distillation for flow teachers (SwiftVideo (003) Alg. 1, Eq. 5–9, 14).

With the rectified-flow path ``x_t = (1 − t)·x0 + t·ε`` (the paper's ``t`` is our schedule's σ) and
``c_skip = 1, c_out = −t`` (Eq. 5), the consistency function is ``f_θ(x_t, t) = x_t − t·F_θ(x_t, t)``
with ``F_θ`` the student's flow-velocity prediction. One draw of Alg. 1::

    t ~ logit-normal(P_mean, P_std)  (σ directly; model time = schedule.unshift(σ))       l. 4
    x_t = (1 − t)·x0 + t·ε,   dx_t/dt = F_teacher(x_t, t) (with CFG when configured)       l. 5
    r = min(1, iters / H)                                                                   l. 6
    F⁻, dF⁻/dt = JVP of F_θ⁻ along (dx_t/dt, 1)                                             Eq. 8, 14
    g = dx_t/dt − F⁻ − r·t·sg(dF⁻/dt)                                                       l. 7, Eq. 9
    g ← g / (‖g‖ + c)                                                                       l. 8
    L = ‖F_θ(x_t, t) − F⁻ − g‖²                                                             l. 9

* θ⁻ is the student role's EMA copy (``roles[student].ema_module``; SwiftVideo: decay 0.95);
  everything but ``F_θ`` is computed without gradients.
* ``jvp``: ``blockwise`` (Alg. 2, toy DiT and Wan), ``autograd`` (``torch.func.jvp`` over the whole
  model) or ``finite_difference`` (:meth:`fewstep.models.denoiser.Denoiser.jvp`). The model-time
  tangent is ``dt_model/dσ = 1 / (dσ/dt_model)``, so the derivative is taken in the paper's t = σ.
  With ``r = 0`` no JVP runs: the target is Eq. 9's flow-matching form ``F⁻ + (dx/dt − F⁻)``.
* ``iters`` is the global engine step (``ctx.step``), so the warm-up continues across stages.
* Normalisation (``normalization``), Alg. 1 l. 8 ``g/(‖g‖ + c)``, c = 0.1. The paper and sCM (Lu & Song
  2025, §4.2) leave the scale of ‖·‖ open; ``rms`` (the default) reads it as sCM implementations do, the
  L2 norm of each sample's tangent over (C, T, H, W) divided by √(C·T·H·W), i.e. its root mean square.
  Only then is c = 0.1 independent of the latent's size and the normalised tangent of order 1 per
  element, like the velocities it is added to; ``norm`` takes the plain L2 norm, which shrinks g by
  √(C·T·H·W) (64 on the toy latent, ~10³ on Wan's): in the toy world, CCD alone for 300 steps then reaches
  total 0.791 / FVD 91 at 4 steps and 0.722 / 186 at 2, against 0.807 / 63 and 0.777 / 88 with ``rms``
  (benchmarks/results/swiftvideo). ``clip`` clamps every element to
  [−1, 1] (the alternative §3 reports as worse); ``none`` keeps g.
* The loss drops Eq. 7's factor t/2, as Alg. 1 does, and averages over (C, T, H, W) per sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from ..diffusion.schedules import FlowMatching, expand_like
from ..errors import UserError
from ..models.denoiser import JVPMethod
from .base import (Batch, LogitNormalTimes, Objective, ObjectiveConfig, ObjectiveOutput, RoleName, Roles,
                   StepContext, TimestepsConfig, register_objective)

Normalization = Literal["rms", "norm", "clip", "none"]


class ContinuousConsistencyConfig(ObjectiveConfig):
    kind: Literal["ccd"] = "ccd"
    teacher: RoleName = Field("teacher", description="the frozen flow teacher F_pretrain giving dx_t/dt")
    cfg_scale: float | None = Field(None, description="teacher CFG w in uncond + w·(cond − uncond) for dx_t/dt; "
                                                      "null = none")
    timesteps: TimestepsConfig = Field(default_factory=lambda: LogitNormalTimes(mean=-0.6, std=1.4), description=(
        "distribution of the paper's t = σ (Table 2d: logit-normal (−0.6, 1.4) best; (−0.8, 1.0); uniform)"))
    warmup_steps: int = Field(1000, ge=0, description="H: tangent warm-up r = min(1, step / H); 0 = r = 1 throughout")
    normalization: Normalization = Field("rms", description=(
        "rms: g/(RMS(g) + c) (sCM practice); norm: g/(‖g‖₂ + c); clip: g clamped to [−1, 1]; none"))
    norm_c: float = Field(0.1, gt=0, description="c of g/(‖g‖ + c)")
    jvp: JVPMethod = Field("blockwise", description="how dF⁻/dt is computed: blockwise (Alg. 2; toy DiT, Wan), "
                                                    "autograd (torch.func.jvp over the whole model), finite_difference")
    fd_step: float = Field(1e-3, gt=0, description=(
        "h of the central difference (jvp: finite_difference); a fallback: in float32 a Wan-like sinusoidal time "
        "embedding leaves ~10% error in the time direction (benchmarks/jvp_memory.py)"))

    def reads(self) -> set[str]:
        return {self.teacher}


def tangent_warmup(step: int, warmup_steps: int) -> float:
    """Alg. 1 l. 6: ``r = min(1, iters / H)`` (1 when H = 0)."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


def normalize_tangent(g: Tensor, kind: Normalization = "rms", c: float = 0.1) -> Tensor:
    """Alg. 1 l. 8 per sample over (C, T, H, W): ``g / (‖g‖₂/√d + c)`` (``rms``, d = C·T·H·W),
    ``g / (‖g‖₂ + c)`` (``norm``), ``clamp(g, −1, 1)`` (``clip``) or ``g`` (``none``). g: (B, C, T, H, W)."""
    if kind in ("rms", "norm"):
        norm = torch.linalg.vector_norm(g.flatten(1), dim=1)  # (B,)
        if kind == "rms":
            norm = norm / g[0].numel() ** 0.5
        return g / expand_like(norm + c, g)
    if kind == "clip":
        return g.clamp(-1.0, 1.0)
    return g


@dataclass
class CCDDraw:
    """One draw of Alg. 1 (all detached, batched along dim 0)."""

    x_t: Tensor  # (B, C, T, H, W)
    t: Tensor  # (B,) model time (schedule.unshift(σ))
    sigma: Tensor  # (B,) the paper's t
    velocity: Tensor  # (B, C, T, H, W) dx_t/dt = F_teacher(x_t, t)
    f_minus: Tensor  # (B, C, T, H, W) F_θ⁻(x_t, t)
    df_minus: Tensor | None  # (B, C, T, H, W) dF_θ⁻/dt along (dx_t/dt, 1); None when r = 0 (not needed)
    r: float  # tangent warm-up coefficient
    tangent_raw: Tensor  # (B, C, T, H, W) g before normalisation (Eq. 9)
    tangent: Tensor  # (B, C, T, H, W) g after normalisation
    target: Tensor  # (B, C, T, H, W) F_θ⁻ + g


@register_objective
class ContinuousConsistency(Objective):
    """SwiftVideo Alg. 1 (module doc)."""

    kind = "ccd"
    Config = ContinuousConsistencyConfig

    def schedule(self, student, teacher) -> FlowMatching:
        """The flow schedule both networks share; other schedules are a one-line error (c_out = −t needs a flow)."""
        schedule = student.schedule
        if not isinstance(schedule, FlowMatching) or not isinstance(teacher.schedule, FlowMatching):
            raise UserError(f"objective {self.name!r} (ccd): continuous-time consistency with c_out = −t needs a "
                            f"flow-matching teacher and student; got {schedule.name} / {teacher.schedule.name}")
        return schedule

    def draw(self, batch: Batch, roles: Roles, ctx: StepContext) -> CCDDraw:
        """Alg. 1 l. 4–8 for a batch: times, noise, teacher velocity, EMA value and tangent, g."""
        cfg = self.config
        student, teacher = roles[self.role].module, roles[cfg.teacher].module
        ema = roles[self.role].ema_module
        schedule = self.schedule(student, teacher)
        x0 = batch.latents  # (B, C, T, H, W)
        sigma = ctx.times(self.distribution, "ccd/t").to(x0.dtype)  # (B,) the paper's t
        t = schedule.unshift(sigma)  # (B,) model time with σ(t) = the paper's t
        eps = ctx.randn(tuple(x0.shape[1:]), "ccd/eps", dtype=x0.dtype)  # (B, C, T, H, W)
        r = tangent_warmup(ctx.step, cfg.warmup_steps)
        with torch.no_grad():
            x_t = schedule.add_noise(x0, eps, t)  # (1 − σ)·x0 + σ·ε
            velocity = teacher.predict(x_t, t, batch.cond, cfg_scale=cfg.cfg_scale, uncond=batch.uncond).flow
            if r == 0.0:  # Eq. 9 with r = 0: the flow-matching target, no JVP
                f_minus, df_minus = ema.predict(x_t, t, batch.cond).flow, None
                raw = velocity - f_minus
            else:
                _, dsigma_dt = torch.func.jvp(schedule.sigma, (t,), (torch.ones_like(t),))  # (B,)
                f_minus, df_minus = ema.jvp(x_t, t, batch.cond, velocity, 1.0 / dsigma_dt, output="flow",
                                            method=cfg.jvp, fd_step=cfg.fd_step)  # along (dx/dt, 1) in σ
                raw = velocity - f_minus - r * expand_like(sigma, x_t) * df_minus  # Eq. 9
            tangent = normalize_tangent(raw, cfg.normalization, cfg.norm_c)
        return CCDDraw(x_t, t, sigma, velocity, f_minus, df_minus, r, raw, tangent, f_minus + tangent)

    def __call__(self, batch: Batch, roles: Roles, ctx: StepContext) -> ObjectiveOutput:
        draw = self.draw(batch, roles, ctx)
        student = roles[self.role].module
        f_theta = student.predict(draw.x_t, draw.t, batch.cond).flow  # (B, C, T, H, W)
        dtype = torch.promote_types(f_theta.dtype, torch.float32)
        loss = (f_theta.to(dtype) - draw.target.to(dtype)).pow(2).flatten(1).mean(1)  # (B,) Alg. 1 l. 9
        g_norm = torch.linalg.vector_norm(draw.tangent_raw.flatten(1), dim=1)
        return self.output({"ccd": loss}, {"r": draw.r, "t_mean": float(draw.sigma.mean()),
                                           "tangent_norm": float(g_norm.mean())})
