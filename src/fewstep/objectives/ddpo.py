"""DDPO baseline (DOLLAR (001) App. 7.4, Alg. 2, Eq. 26–28; Black et al. 2023), kind ``ddpo``, role student.

DDPO_SF: the student samples with DDIM η > 0 on its step schedule followed by ``t = 0`` (η = 1 on
a VP schedule is the DDPM posterior of Eq. 27), the reward of the decoded final sample weights the
log-probabilities of the *last* ``truncation`` stochastic transitions (Eq. 26, 28; Alg. 2)::

    loss = −mean_k A · log p_θ(x_{t_{k+1}} | sg(x_{t_k}), c)

The final transition to ``t = 0`` has no noise (DDIM's ``c = 0`` at ``s = 0``), hence no density,
so "the last 2 steps" are the last two *stochastic* transitions — for ``[999, 749, 499, 249]``
the transitions 749→499 and 499→249 (DOLLAR's "t_n ∈ {499, 249}" read as the times of the
sampled states). Each transition's input is detached (Alg. 2's ``x_{t_n}.detach()``) and the
earlier steps run without gradients. Log-probabilities come from
:func:`fewstep.diffusion.samplers.sample_ddim` (summed over dimensions, Eq. 28); ``log_prob:
mean`` divides by the number of dimensions as DDPO's code does (a constant rescaling).
Advantages are the rewards normalised per prompt within the micro-batch (DDPO's per-prompt
statistics), falling back to the batch statistics for prompts seen once, and clipped to
``±advantage_clip``. They depend on which samples share a micro-batch (unlike every other
objective here, DDPO is therefore not invariant to ``grad_accum`` or the number of processes),
and a micro-batch of one sample has zero advantage.

The reward ``R(Dec(x̂0))`` is the pixel reward of :class:`~fewstep.objectives.reward.PixelRewardObjective`
(its decoder and reward model, module doc of :mod:`fewstep.objectives.reward`, "Decoder").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from ..diffusion.samplers import sample_ddim
from ..diffusion.schedules import FlowMatching
from ..errors import UserError
from .base import Batch, ObjectiveOutput, Roles, StepContext, register_objective
from .reward import PixelRewardConfig, PixelRewardObjective
from .student import generator_noise, step_times, student_generator


class DDPOConfig(PixelRewardConfig):
    kind: Literal["ddpo"] = "ddpo"
    SAMPLES_STUDENT: ClassVar[bool] = True
    eta: float = Field(1.0, gt=0, le=1, description="DDIM stochasticity (1 = DDPM posterior, DOLLAR Eq. 27)")
    truncation: int = Field(2, ge=1, description="the last N stochastic transitions carry log-prob gradients")
    advantage: Literal["per_prompt", "batch"] = Field("per_prompt", description="reward normalisation groups")
    advantage_clip: float = Field(5.0, gt=0, description="clip advantages to ±this (DDPO's adv_clip_max)")
    log_prob: Literal["mean", "sum"] = Field("mean", description="log p over dimensions: mean (DDPO code) or sum")

    def check_generator(self, generator, key: str) -> None:
        if len(step_times(generator.times, FlowMatching())) < 2:
            raise UserError(f"config key '{key}': objective 'ddpo' needs at least 2 student steps (a stochastic "
                            f"transition), but generator.times is {generator.times!r}")


@dataclass
class DDPORollout:
    x: Tensor  # (B, C, T, H, W) final sample x̂0 at t = 0
    times: Tensor  # (K + 1,) float64, the student times then 0
    states: list[Tensor]  # x at every time, K + 1 × (B, C, T, H, W), detached
    steps: list[int]  # transitions i (times[i] → times[i + 1]) that carry log-probabilities
    log_probs: list[Tensor]  # (B,) log p(x_{i+1} | sg(x_i)) summed over dims, differentiable, per step


def normalize_advantages(rewards: Tensor, prompts: list[str], per_prompt: bool, eps: float = 1e-6) -> Tensor:
    """``(r − mean)/(std + eps)`` per prompt group (B,); singleton groups use the batch statistics."""
    r = rewards.float()
    batch_adv = (r - r.mean()) / (r.std(unbiased=False) + eps)
    if not per_prompt:
        return batch_adv
    adv = batch_adv.clone()
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    for idx in groups.values():
        if len(idx) > 1:
            g = r[idx]
            adv[idx] = (g - g.mean()) / (g.std(unbiased=False) + eps)
    return adv


@register_objective
class DDPO(PixelRewardObjective):
    """DOLLAR App. 7.4 (DDPO_SF, REINFORCE with truncation to the last stochastic steps; module doc)."""

    kind = "ddpo"
    Config = DDPOConfig

    def rollout(self, student, batch: Batch, ctx: StepContext) -> DDPORollout:
        """Sample with DDIM η on the generator's times + 0; log-probs (with gradients) of the truncated steps."""
        times = student_generator(ctx).step_times(student.schedule)
        times = torch.cat([times, torch.zeros(1, dtype=times.dtype)])  # (K + 1,)
        x0 = batch.latents
        # ε (the generator's noise, as in G(ε)) and the per-transition DDIM noises z_i
        noises = generator_noise(ctx, tuple(x0.shape[1:]), len(times), role=self.role, dtype=x0.dtype)
        stochastic = [i for i in range(len(times) - 1) if times[i + 1] > 0]
        if not stochastic:
            raise UserError(f"objective {self.name!r}: generator.times {student_generator(ctx).config.times!r} has no "
                            f"stochastic transition (one step straight to t = 0); DDPO needs at least two student steps")
        grad_steps = stochastic[-self.config.truncation:]
        x, states, log_probs = noises[0], [noises[0]], []
        for i in range(len(times) - 1):
            with torch.set_grad_enabled(torch.is_grad_enabled() and i in grad_steps):
                step = sample_ddim(student, x.detach(), times[i:i + 2], batch.cond, eta=self.config.eta,
                                   noises=[noises[i + 1]])
            if i in grad_steps:
                log_probs.append(step.log_probs[0])  # (B,) Eq. 28 summed over dims
            x = step.x.detach()
            states.append(x)
        return DDPORollout(x=x, times=times, states=states, steps=grad_steps, log_probs=log_probs)

    def __call__(self, batch: Batch, roles: Roles, ctx: StepContext) -> ObjectiveOutput:
        student = roles[self.role].module
        roll = self.rollout(student, batch, ctx)
        r = self.pixel_reward(roll.x, batch.prompts)  # (B,) R(Dec(x̂0)), no grad
        adv = normalize_advantages(r, batch.prompts, self.config.advantage == "per_prompt")
        adv = adv.clamp(-self.config.advantage_clip, self.config.advantage_clip).to(roll.x.device)  # (B,)
        dims = roll.x[0].numel() if self.config.log_prob == "mean" else 1
        log_p = torch.stack(roll.log_probs) / dims  # (N, B)
        loss = -(adv[None] * log_p).mean(0)  # (B,) Eq. 26 with truncation (Alg. 2 l. 13)
        return self.output({"ddpo": loss}, {"reward": float(r.mean()), "reward_std": float(r.std(unbiased=False))})
