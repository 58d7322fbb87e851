"""Discrete consistency distillation with an m-step teacher solver (DOLLAR (001) Eq. 6–9; LCM).

On a grid of times ``t_0 = 0 < t_1 < … < t_N`` (DOLLAR §4.1: the teacher's 50-step DDIM grid
``[19, 39, …, 999]`` plus ``t = 0``; config ``grid``, named grid ``ddim50``), DOLLAR Eq. 6–7::

    n ~ U{0, …, N − m}                               (so that t_{n+m} is on the grid)
    x_{t_{n+m}} = α(t_{n+m})·x0 + σ(t_{n+m})·ε       (forward diffusion of the data latents)
    x̂_{t_n}     = Denoise^m(x_{t_{n+m}}, t_{n+m}, t_n; teacher with CFG)             (Eq. 7, 9)
    loss        = d(f_θ(x_{t_{n+m}}, t_{n+m}), sg(f_{θ⁻}(x̂_{t_n}, t_n)))            (Eq. 6, λ = 1)

* **Denoise^m** takes m deterministic teacher steps along the grid, each DOLLAR Eq. 5 with
  σ_t = 0 — DDIM η = 0, which in our formulation is the same update as the flow-matching Euler
  step: :func:`fewstep.diffusion.samplers.euler_step`, ``x_s = α_s·x̂0 + σ_s·ε̂``. The sampler
  functions (``sample_euler``) take one time list per batch, but n is drawn per sample (so that
  a sample's loss does not depend on how the batch is split), so the m steps are written here
  with per-sample ``(B,)`` times around the samplers' own ``euler_step``.
* **CFG** (Eq. 9) on the teacher: ``uncond + w·(cond − uncond)``; DOLLAR's w = 7.5 (written
  ``cond + w·(cond − uncond)``) is our ``cfg_scale = 8.5``. The student runs without CFG.
* **Consistency function** ``f = c_skip·x + c_out·x_θ`` with the boundary condition ``f(x, 0) = x``:
  ``boundary: exact`` (default) is ``c_skip = 0, c_out = 1`` for ``t > 0`` — f is the student's
  x0 prediction — and ``f(x, 0) = x`` exactly (the network is not called at ``t = 0``);
  ``boundary: lcm`` is LCM's ``c_skip = σ_d²/((s·k)² + σ_d²)``, ``c_out = s·k/√((s·k)² + σ_d²)``
  with ``k = 1000·t`` (LCM's integer timestep; for a VP schedule ``1000·t = k_DDPM + 1``) and
  ``s = timestep_scaling``, which is also exactly (1, 0) at ``t = 0``.
* **x_θ**: homogeneous (default, ``parameterization: native``) — the student's x0 prediction in
  its own parameterisation (DOLLAR Eq. 8 for a conjugate model) via ``Prediction.x0``;
  heterogeneous (``parameterization: x0``) — the student network's raw output read as x0.
* **Target network** θ⁻: the student role's EMA copy (``roles["student"].ema_module``, which is
  the live module when the role has no EMA), evaluated without gradients.
* **Distance** ``d``: LCM's pseudo-Huber ``mean(√((a − b)² + c²) − c)`` (elementwise, c =
  ``huber_c``) or the MSE, both averaged over ``(C, T, H, W)`` into one loss per sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from ..diffusion.samplers import euler_step
from ..diffusion.schedules import FlowMatching
from ..errors import UserError
from ..models.backbones import Conditioning
from .base import Batch, Objective, ObjectiveConfig, ObjectiveOutput, RoleName, Roles, StepContext, register_objective
from .student import StepSchedule, step_times


class ConsistencyDistillationConfig(ObjectiveConfig):
    kind: Literal["cd"] = "cd"
    grid: StepSchedule = Field("ddim50", description="teacher solver grid (t = 0 is appended): a named grid or "
                                                     "integer timesteps")
    m: int = Field(5, ge=1, description="teacher solver steps per consistency pair (DOLLAR: 5; ablation: 1)")
    cfg_scale: float | None = Field(
        8.5, description="teacher CFG w in uncond + w·(cond − uncond) (DOLLAR's 7.5 is our 8.5); null = none")
    distance: Literal["huber", "mse"] = Field("huber", description="d in DOLLAR Eq. 6")
    huber_c: float = Field(0.001, gt=0, description="pseudo-Huber c (LCM's default 0.001)")
    parameterization: Literal["native", "x0"] = Field(
        "native", description="native: x_θ from the student's prediction type (homogeneous); "
                              "x0: the raw network output is x_θ (heterogeneous)")
    boundary: Literal["exact", "lcm"] = Field("exact", description="c_skip/c_out (module doc)")
    sigma_data: float = Field(0.5, gt=0, description="σ_d of boundary: lcm")
    timestep_scaling: float = Field(10.0, gt=0, description="s of boundary: lcm")

    teacher: RoleName = Field("teacher", description="the role whose m-step solver Denoise^m gives the target")

    def reads(self) -> set[str]:
        return {self.teacher}

    @model_validator(mode="after")
    def _m_fits_grid(self) -> "ConsistencyDistillationConfig":
        if self.m > (n := len(step_times(self.grid, FlowMatching()))):  # a grid's length is schedule-free
            raise ValueError(f"m = {self.m} teacher steps exceed the {n} steps of grid {self.grid!r}")
        return self


@dataclass
class CDTarget:
    """One draw of DOLLAR Eq. 6–7 (all batched along dim 0)."""

    x_start: Tensor  # (B, C, T, H, W) x_{t_{n+m}}, the forward-diffused data
    t_start: Tensor  # (B,) t_{n+m}
    x_end: Tensor  # (B, C, T, H, W) x̂_{t_n} = Denoise^m(x_{t_{n+m}})
    t_end: Tensor  # (B,) t_n
    target: Tensor  # (B, C, T, H, W) f_{θ⁻}(x̂_{t_n}, t_n), detached
    start_index: Tensor  # (B,) int64 position of t_{n+m} in the (decreasing) grid


def denoise_m(teacher, x: Tensor, path: Tensor, cond: Conditioning, *, cfg_scale: float | None = None,
              uncond: Conditioning | None = None) -> Tensor:
    """DOLLAR Eq. 7: m deterministic teacher steps (Eq. 5 with σ_t = 0) along per-sample times.

    x: (B, C, T, H, W) at ``path[0]``; path: (m + 1, B) decreasing times per sample. Returns x at ``path[-1]``.
    """
    for j in range(len(path) - 1):
        pred = teacher.predict(x, path[j].to(x.dtype), cond, cfg_scale=cfg_scale, uncond=uncond)
        alpha_s, sigma_s = teacher.schedule.coefficients(path[j + 1].to(x.dtype), x)  # (B, 1, 1, 1, 1)
        x = euler_step(pred, alpha_s, sigma_s)
    return x


@register_objective
class ConsistencyDistillation(Objective):
    """DOLLAR Eq. 6–9 with the m-step teacher solver Denoise^m (module doc)."""

    kind = "cd"
    Config = ConsistencyDistillationConfig

    # -- pieces ------------------------------------------------------------------------------------
    def grid(self, schedule) -> Tensor:
        """The solver grid, decreasing and ending at 0: ``(N + 1,)`` float64."""
        times = step_times(self.config.grid, schedule)
        grid = torch.cat([times, torch.zeros(1, dtype=times.dtype)])
        if self.config.m > len(grid) - 1:
            raise UserError(f"objective {self.name!r}: m={self.config.m} exceeds the {len(grid) - 1} steps of grid "
                            f"{self.config.grid!r}")
        return grid

    def coefficients(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """``(c_skip, c_out)`` at ``t > 0`` (B,), broadcast against ``like`` (module doc)."""
        shape = (-1,) + (1,) * (like.ndim - 1)
        if self.config.boundary == "exact":
            return torch.zeros_like(t).reshape(shape), torch.ones_like(t).reshape(shape)
        sk = self.config.timestep_scaling * 1000.0 * t  # s·k, LCM's scaled integer timestep
        sd2 = self.config.sigma_data**2
        return (sd2 / (sk**2 + sd2)).reshape(shape), (sk / (sk**2 + sd2).sqrt()).reshape(shape)

    def consistency_function(self, denoiser, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """``f(x, t) = c_skip·x + c_out·x_θ(x, t)`` for t > 0 and ``f(x, 0) = x``. x: (B, C, T, H, W), t: (B,)."""
        positive = t > 0  # (B,)
        if not bool(positive.any()):
            return x
        if bool(positive.all()):
            xs, ts, cs = x, t.to(x.dtype), cond
        else:
            xs, ts, cs = x[positive], t[positive].to(x.dtype), cond.index(positive)
        if self.config.parameterization == "x0":
            x_theta = denoiser(xs, ts, cs)  # heterogeneous: the raw output is x0
        else:
            x_theta = denoiser.predict(xs, ts, cs).x0  # homogeneous: e.g. DOLLAR Eq. 8
        c_skip, c_out = self.coefficients(ts, xs)
        f = c_skip * xs + c_out * x_theta
        return f if bool(positive.all()) else x.index_put((positive,), f)

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        """d(a, b) per sample (B,), in at least fp32."""
        dtype = torch.promote_types(a.dtype, torch.float32)
        diff2 = (a.to(dtype) - b.to(dtype)).pow(2)
        if self.config.distance == "mse":
            return diff2.flatten(1).mean(1)
        c = self.config.huber_c
        return ((diff2 + c**2).sqrt() - c).flatten(1).mean(1)

    def target(self, batch: Batch, roles: Roles, ctx: StepContext) -> CDTarget:
        """Draw ``n`` and ``ε``, solve ``Denoise^m`` with the teacher and evaluate the EMA target."""
        teacher, ema = roles[self.config.teacher].module, roles[self.role].ema_module
        x0 = batch.latents  # (B, C, T, H, W)
        grid = self.grid(teacher.schedule).to(x0.device)  # (N + 1,)
        n_starts = len(grid) - self.config.m  # start positions 0 … N − m
        start = (ctx.rand("cd/n") * n_starts).long().clamp(max=n_starts - 1)  # (B,)
        path = grid[start[None, :] + torch.arange(self.config.m + 1, device=x0.device)[:, None]]  # (m + 1, B)
        eps = ctx.randn(tuple(x0.shape[1:]), "cd/eps", dtype=x0.dtype)  # (B, C, T, H, W)
        x_start = teacher.schedule.add_noise(x0, eps, path[0].to(x0.dtype))
        with torch.no_grad():
            x_end = denoise_m(teacher, x_start, path, batch.cond, cfg_scale=self.config.cfg_scale,
                              uncond=batch.uncond)
            target = self.consistency_function(ema, x_end, path[-1], batch.cond)
        return CDTarget(x_start, path[0], x_end, path[-1], target, start)

    # -- the loss ---------------------------------------------------------------------------------
    def __call__(self, batch: Batch, roles: Roles, ctx: StepContext) -> ObjectiveOutput:
        student = roles[self.role].module
        draw = self.target(batch, roles, ctx)
        online = self.consistency_function(student, draw.x_start, draw.t_start, batch.cond)  # (B, C, T, H, W)
        loss = self.distance(online, draw.target)  # (B,)
        return self.output({"cd": loss}, {"t_start_mean": float(draw.t_start.mean()),
                                          "t_end_mean": float(draw.t_end.mean())})

