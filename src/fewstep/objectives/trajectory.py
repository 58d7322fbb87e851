"""Trajectory-based few-step guidance (AccVideo, papers/002, §4.2, Eq. 6).

On a grid of ``m + 1`` key times ``t'_m = 1 > t'_{m−1} > … > t'_0 = 0`` (§4.2: ``{1, 0.9651,
0.9130, 0.8235, 0.6363, 0}``, named grid ``accvideo_keys``) a sample's key latents
``l_{t'_m}, …, l_{t'_0}`` are read off a stored teacher trajectory
(:mod:`fewstep.data.trajectories`), and the m-step student learns to follow the chords between
them, AccVideo Eq. 6::

    L_traj = E_{i,k} ‖ s_β(l_{t'_{k+1}}, t'_{k+1}) − (l_{t'_k} − l_{t'_{k+1}}) / (t'_k − t'_{k+1}) ‖²,   k ∈ [0, m−1]

**Conventions.** The paper's ``s_β`` is a flow velocity in its solver's time variable (its Eq. 5
steps ``l_{t_{j−1}} = l_{t_j} + (t_{j−1} − t_j)·v``), and for HunyuanVideo that variable is the noise
level σ: the key times are σ of its shift-7 schedule at t = 0.8, 0.6, 0.4, 0.2 (0.9655, 0.9130,
0.8235, 0.6364). Ours (DESIGN §2) is the prediction's ``u = ε̂ − x̂0 = dx/dσ`` with ``σ = σ(t)``;
``accvideo_keys`` is a grid in our ``t``, which is σ for an unshifted flow-matching teacher such as
the toy one. The student samples with the Euler step ``x_s = α_s·x̂0 + σ_s·ε̂``
(:func:`~fewstep.diffusion.samplers.euler_step`). We therefore write Eq. 6 as the defect of the
student's own Euler step from ``l_{t'_{k+1}}`` to ``t'_k``, measured in velocity units::

    l̂_k = euler_step(s_β(l_{t'_{k+1}}, t'_{k+1}), α(t'_k), σ(t'_k))
    loss = mean_{C,T,H,W} ((l̂_k − l_{t'_k}) / (σ(t'_k) − σ(t'_{k+1})))²                          (B,)

For flow matching ``l̂_k = l_{t'_{k+1}} + (σ(t'_k) − σ(t'_{k+1}))·û``, so this is exactly
``‖û − (l_{t'_k} − l_{t'_{k+1}})/(σ(t'_k) − σ(t'_{k+1}))‖²`` — Eq. 6 with the chord slope in σ,
as the paper's own solver variable has it. For a VP student it is the same statement about
its DDIM step. A student with zero loss reproduces the key latents exactly with m Euler steps.

**Segments.** k is drawn per sample, uniformly from ``{0, …, m−1}`` (the expectation of Eq. 6;
seeded by ``ctx`` so a sample's k does not depend on the batching). Alg. 1 instead cycles k from
``m−1`` down to 0 over consecutive updates; the adversarial term keeps that cycle because its
latent queues need it (:mod:`fewstep.objectives.adversarial`), this term does not.

**Key times** are the run's student generator's (``generator:``, an Euler sampler: AccVideo's
student *is* its m Euler steps), so this term trains exactly the steps the exported student
takes: ``times: accvideo_keys`` (§4.2) or ``accvideo_uniform`` — the §5.2 / Tab. 4 ablation
``{1, 0.8, 0.6, 0.4, 0.2, 0}``. From a store, ``generator.snap_to_data: true`` moves them to the
nearest *stored* times (the paper's uniform grid, ``{1000, 810.9, 605.7, 378.3, 225.8, 0}``, is
likewise "selected from our synthetic trajectories"), which for the uniform grid needs a store
synthesized with ``--keep all``.

**Source.**

* ``source: trajectory`` (the batch's ``extra["trajectory"]``, from a
  :class:`~fewstep.recipes.sources.TrajectorySource`) or ``forward``: real data latents
  forward-diffused to the key times, ``l_{t'_k} = α(t'_k)·x0 + σ(t'_k)·ε`` with one fresh ``ε``
  per sample — the "useless data points" setting of §3.2 (Fig. 2 a–b; Tab. 3 "Real data" rows). The
  chords are then all ``ε − x0`` and the loss is flow matching at the key times.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from ..diffusion.samplers import euler_step
from ..errors import UserError
from .base import Batch, Objective, ObjectiveConfig, ObjectiveOutput, Roles, StepContext, register_objective
from .student import GeneratorConfig, student_generator

KeySource = Literal["trajectory", "forward"]


def key_grid(ctx: StepContext, schedule, stored: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """``(grid, index)``: the key times ``(m + 1,)`` float64 in sampler order (decreasing, ending at 0).

    The key times are the run's generator's (``ctx.student``: its m step times, then 0), so the
    student is trained on exactly the steps it samples with. With ``stored`` times (a trajectory
    store) every key time must be one of them (``index``: where); a generator with
    ``snap_to_data: true`` moves its times there.
    """
    grid = torch.tensor(student_generator(ctx).sampling_times(schedule), dtype=torch.float64)
    if stored is None:
        return grid, None
    stored = stored.double()
    distance = (stored[None, :] - grid[:, None].to(stored.device)).abs()  # (m + 1, K)
    index = distance.argmin(dim=1)
    if bool((distance.gather(1, index[:, None]) > 1e-6).any()):
        held = ", ".join(f"{t:.4g}" for t in stored.tolist()[:8]) + (", …" if len(stored) > 8 else "")
        raise UserError(f"the generator's times {[round(t, 4) for t in grid.tolist()]} are not all in the trajectory "
                        f"store (t = {held}): set generator.snap_to_data: true to use the nearest stored ones")
    return stored[index], index


def stored_times(batch: Batch, source: KeySource) -> Tensor | None:
    """The times ``(K,)`` of the batch's stored trajectories (``source: trajectory``), else None."""
    if source == "forward":
        return None
    if "trajectory" not in batch.extra or "key_times" not in batch.extra:
        raise UserError("source 'trajectory' needs batches from a trajectory store (a recipe's data: key, made by "
                        "`fewstep synth`); use source: forward to train on data latents")
    return batch.extra["key_times"][0]  # the same for every sample


@dataclass
class KeyLatents:
    """``l_{t'_0}, …, l_{t'_m}`` of a batch, indexed like the paper: ``latents[:, k]`` is at ``times[k]``."""

    latents: Tensor  # (B, m + 1, C, T, H, W)
    times: Tensor  # (m + 1,) float64, increasing: times[0] = t'_0 = 0, times[m] = t'_m = 1

    @property
    def m(self) -> int:
        return len(self.times) - 1


def key_latents(batch: Batch, source: KeySource, ctx: StepContext, schedule, name: str) -> KeyLatents:
    """The batch's key latents on the generator's grid from ``source`` (module doc); ``name`` keys the fresh ε."""
    grid, index = key_grid(ctx, schedule, stored_times(batch, source))  # (m + 1,) decreasing
    grid = grid.to(batch.latents.device)
    if index is not None:
        latents = batch.extra["trajectory"][:, index]  # (B, m + 1, C, T, H, W), decreasing times
    else:
        x0 = batch.latents  # (B, C, T, H, W)
        eps = ctx.randn(tuple(x0.shape[1:]), f"{name}/eps", dtype=x0.dtype)  # one ε per sample, all key times
        latents = torch.stack([schedule.add_noise(x0, eps, t.to(x0.dtype)) for t in grid], dim=1)
    return KeyLatents(latents.flip(1), grid.flip(0))


class KeyTimesConfig(ObjectiveConfig):
    """Keys of the objectives that train the generator's Euler steps between key latents."""

    SAMPLES_STUDENT: ClassVar[bool] = True

    source: KeySource = Field("trajectory", description="trajectory: stored teacher paths; forward: data latents "
                                                        "forward-diffused with fresh noise (§3.2 ablation)")

    def needs(self) -> set[str]:
        return {"trajectory"} if self.source == "trajectory" else set()

    def check_generator(self, generator: GeneratorConfig, key: str) -> None:
        if generator.sampler != "euler":
            raise UserError(f"config key '{key}': objective {self.kind!r} trains the student's Euler steps between "
                            f"key times, but generator.sampler is {generator.sampler!r}; set generator.sampler: euler")


class TrajectoryGuidanceConfig(KeyTimesConfig):
    kind: Literal["trajectory_guidance"] = "trajectory_guidance"


@register_objective
class TrajectoryGuidance(Objective):
    """AccVideo Eq. 6: the student's Euler step between consecutive key latents (module doc)."""

    kind = "trajectory_guidance"
    Config = TrajectoryGuidanceConfig

    def __call__(self, batch: Batch, roles: Roles, ctx: StepContext) -> ObjectiveOutput:
        student = roles[self.role].module
        keys = key_latents(batch, self.config.source, ctx, student.schedule, "traj")
        B = len(batch)
        # 1. a segment k ∈ [0, m − 1] per sample: from t'_{k+1} down to t'_k
        k = (ctx.rand("traj/k") * keys.m).long().clamp(max=keys.m - 1)  # (B,)
        rows = torch.arange(B, device=k.device)
        l_next, l_k = keys.latents[rows, k + 1], keys.latents[rows, k]  # (B, C, T, H, W) each
        t_next, t_k = keys.times[k + 1], keys.times[k]  # (B,) each
        # 2. the student's Euler step l_{t'_{k+1}} → t'_k (AccVideo Eq. 5 with s_β)
        pred = student.predict(l_next, t_next.to(l_next.dtype), batch.cond)
        alpha_k, sigma_k = student.schedule.coefficients(t_k.to(l_k.dtype), l_k)  # (B, 1, 1, 1, 1) each
        _, sigma_next = student.schedule.coefficients(t_next.to(l_k.dtype), l_k)
        l_hat = euler_step(pred, alpha_k, sigma_k)
        # 3. Eq. 6 in velocity units: (l̂_k − l_k)/(σ_k − σ_{k+1}) = û − (l_k − l_{k+1})/(σ_k − σ_{k+1})
        dtype = torch.promote_types(l_hat.dtype, torch.float32)
        defect = (l_hat.to(dtype) - l_k.to(dtype)) / (sigma_k - sigma_next).to(dtype)
        loss = defect.pow(2).flatten(1).mean(1)  # (B,)
        return self.output({"traj": loss}, {"k_mean": float(k.float().mean()), "t_mean": float(t_next.mean())})
