"""Latent reward model objectives (DOLLAR (001) Eq. 14–15): fit the LRM to a pixel reward, and
fine-tune the student with it; plus the pixel reward on decoded latents that ``lrm_fit`` and DDPO
(:mod:`fewstep.objectives.ddpo`) share.

The networks ``R^l_φ(x[, c])`` (DOLLAR App. 7.2, Tables 12–13) are reward models and live in
:mod:`fewstep.rewards.latent`; a recipe that declares an ``lrm`` role builds it with
:func:`~fewstep.rewards.latent.build_lrm`, and these objectives receive it as that role.

**LRM fit (kind ``lrm_fit``, role lrm)**, DOLLAR Eq. 14::

    L_LRM(φ) = E_{x ∈ X ∪ X'} (R(Dec(x)) − R^l_φ(x))²

on the data latents ``X`` (``batch.latents``) and generated latents ``X'``: the generator's one-step
prediction ``x̂0`` (DOLLAR Eq. 8 — §3.4: "we apply Eq. (8) for single-step prediction of generated
samples") at a time ``t ~ U[0.02, 0.98]`` from the noisy data latents, detached. Option
(``generated_from: sample``): ``X'`` is the generator's few-step sample ``G_θ(ε)`` with the ε its
own objectives draw in the same step — the very latents whose reward gradient ``lrm_finetune``
takes — at the cost of one more gradient-free few-step generation; a one-step ``x̂0`` from noised
data is a blurrier, differently distributed stand-in for them. ``R`` is a pixel
reward named by ``reward`` (:func:`fewstep.rewards.build_reward`) and evaluated under
``torch.no_grad`` — it is never differentiated, so a non-differentiable reward such as JPEG
compressibility works. The loss term ``mse`` is, per sample, the mean of its squared errors on
the sets used (Eq. 14's mean over the merged batch, Alg. 1 l. 16); each set's error is a metric.

**LRM fine-tune (kind ``lrm_finetune``, role student)**, DOLLAR Eq. 15::

    L_FT(θ; φ) = −E_ε R^l_φ(G_θ(ε)[, c])

with ``G_θ(ε)`` the student's few-step sample (:mod:`fewstep.objectives.student`, the same ``ε`` as
the VSD term). The LRM is frozen in this term: ``g = ∂R^l/∂x`` is taken with
``torch.autograd.grad`` with respect to the (detached) sample only, and the loss is the surrogate
``−R^l(x̂) − Σ g·x̂ + sg(Σ g·x̂)`` whose value is ``−R^l(x̂)`` and whose gradient reaches the student
only (``−g·∂x̂/∂θ``); no gradient is accumulated on the LRM's parameters. (Under DDP the live
LRM is a replicated module of another role, whose forward with autograd enabled outside its own
update the DDP reducer does not expect; ``lrm_ema: true`` scores with the lrm role's EMA copy,
which is not replicated.)

**Standardised rewards** (deviation, on by default: ``standardize`` / ``standardized``). Eq. 14–15
are written in the reward's own units, so β_FT's meaning depends on them: JPEG compressibility of
toy clips is −0.30 ± 0.056 kB per frame, a CLIP-like score ±0.1, DOLLAR's HPS ±0.01. Here the LRM
keeps running statistics ``μ, σ`` of the fitted rewards
(:meth:`~fewstep.rewards.latent.VideoLRM.update_statistics`, DDPO's reward normalisation with an
EMA instead of per-batch statistics) and its network predicts
``z = (R − μ)/σ``; ``lrm_fit`` minimises ``(z_φ(x) − (R(Dec(x)) − μ)/σ)²`` (Eq. 14 divided by σ²)
and ``lrm_finetune`` maximises ``z_φ(G_θ(ε)) = (R^l_φ(G_θ(ε)) − μ)/σ`` (Eq. 15 divided by σ, a
constant shift aside), so β_FT = 1 weighs one standard deviation of reward against the VSD and CD
terms whatever the reward. The LRM itself still answers in reward units (``μ + σ·z``). With
``standardize: false`` / ``standardized: false`` the objectives are Eq. 14–15 as written.

**Decoder.** ``lrm_fit`` and ``ddpo`` decode latents to frames ``(B, T, H, W, 3)`` in [−1, 1] with the
objective's ``decoder`` attribute — any callable latents → frames. A loss loads nothing: the recipe
assigns it (``Plan.prepare_objective``: the frozen ``decode`` of the model the config key
``decoder`` names), or a test does.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from ..errors import UserError
from ..models.backbones import Conditioning
from .base import (Batch, Objective, ObjectiveConfig, ObjectiveOutput, RoleName, Roles, StepContext,
                   TimestepsConfig, UniformTimes, register_objective)
from .student import Backprop, student_sample

Decoder = Callable[[Tensor], Tensor]  # latents (B, C, T, H, W) -> frames (B, T, H, W, 3) in [−1, 1]


# =============================================================================================
# Pixel rewards on decoded latents (shared by lrm_fit and ddpo)
# =============================================================================================

def _known_reward(name: str) -> str:
    from ..rewards import REWARDS

    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; expected one of {', '.join(REWARDS)}")
    return name


class PixelRewardConfig(ObjectiveConfig):
    """Keys of objectives that score decoded latents with a pixel reward."""

    reward: str = Field("jpeg", description="pixel reward R (fewstep.rewards.build_reward name); never differentiated")
    reward_kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the reward")
    decoder: str | None = Field(None, description="model (shipped name or directory) whose codec decodes latents; "
                                                 "unused when the recipe assigns the objective's decoder")

    @field_validator("reward")
    @classmethod
    def _check_reward(cls, value: str) -> str:
        return _known_reward(value)


class PixelRewardObjective(Objective):
    """Holds the frozen decoder (assigned, module doc "Decoder") and the pixel reward (built on first use)."""

    def __init__(self, config: PixelRewardConfig, name: str):
        super().__init__(config, name)
        self.decoder: Decoder | None = None  # assigned by the recipe (config key `decoder`) or a test
        self.reward_model: nn.Module | None = None  # assignable; else build_reward(config.reward) on first use

    def pixel_reward(self, latents: Tensor, prompts: list[str]) -> Tensor:
        """``R(Dec(x))`` per sample (B,), without gradients. latents: (B, C, T, H, W)."""
        with torch.no_grad():
            if self.decoder is None:
                raise UserError(f"objective {self.name!r} ({self.config.kind}) has no decoder: set its 'decoder' key "
                                f"to a model name or directory (the recipe assigns that model's decoder)")
            if self.reward_model is None:
                from ..rewards import build_reward

                self.reward_model = build_reward(self.config.reward, **self.config.reward_kwargs).to(latents.device)
                self.reward_model.requires_grad_(False)
            frames = self.decoder(latents)  # (B, T, H, W, 3) in [−1, 1]
            return self.reward_model(frames.float(), list(prompts)).to(latents.device)  # (B,)


# =============================================================================================
# LRM fit (DOLLAR Eq. 14) and fine-tune (DOLLAR Eq. 15)
# =============================================================================================

def _one_step_times() -> UniformTimes:
    return UniformTimes(a=0.02, b=0.98)


class LRMFitConfig(PixelRewardConfig):
    kind: Literal["lrm_fit"] = "lrm_fit"
    role: RoleName = Field("lrm", description="the latent reward model being fitted")
    real: bool = Field(True, description="fit on the data latents X")
    generated: bool = Field(True, description="fit on generated latents X' (one-step x̂0, DOLLAR Eq. 8)")
    generated_from: Literal["one_step", "sample"] = Field(
        "one_step", description="X' as the generator's one-step x̂0 from noised data (DOLLAR Eq. 8) or its "
                                "few-step samples G(ε) of the run's generator, the latents lrm_finetune scores")
    generator: RoleName = Field("student", description="the role whose one-step x̂0 gives X'")
    timesteps: TimestepsConfig = Field(default_factory=_one_step_times, description="t of the one-step x̂0")
    cfg_scale: float | None = Field(None, description="CFG w of the generator's x̂0 (DOLLAR App. 7.4 uses v^w); "
                                                      "null = none")
    standardize: bool = Field(True, description="regress the standardised reward (r − μ)/σ, running μ, σ")
    stats_momentum: float = Field(0.99, ge=0, lt=1, description="EMA momentum of the running μ, σ² (per step)")

    def reads(self) -> set[str]:
        return {self.generator} if self.generated else set()

    def samples_student(self) -> bool:
        return self.generated and self.generated_from == "sample"


@register_objective
class LRMFit(PixelRewardObjective):
    """DOLLAR Eq. 14: regress ``R^l_φ(x)`` on ``R(Dec(x))`` over data and one-step generated latents."""

    kind = "lrm_fit"
    Config = LRMFitConfig

    def __init__(self, config: LRMFitConfig, name: str):
        super().__init__(config, name)
        if not (config.real or config.generated):
            raise UserError(f"objective {name!r}: lrm_fit needs real and/or generated latents")

    def one_step_x0(self, batch: Batch, roles: Roles, ctx: StepContext) -> Tensor:
        """X': the generator's x̂0 at ``x_t = α·x0 + σ·ε`` (DOLLAR Eq. 8), detached. (B, C, T, H, W)."""
        generator = roles[self.config.generator].module
        x0 = batch.latents
        with torch.no_grad():
            t = ctx.times(self.distribution, "lrm/t").to(x0.dtype)  # (B,)
            eps = ctx.randn(tuple(x0.shape[1:]), "lrm/eps", dtype=x0.dtype)
            x_t = generator.schedule.add_noise(x0, eps, t)
            pred = generator.predict(x_t, t, batch.cond, cfg_scale=self.config.cfg_scale, uncond=batch.uncond)
            return pred.x0

    def __call__(self, batch: Batch, roles: Roles, ctx: StepContext) -> ObjectiveOutput:
        lrm = roles[self.role].module
        sets = {}
        if self.config.real:
            sets["real"] = batch.latents
        if self.config.generated and self.config.generated_from == "sample":
            generator = roles[self.config.generator].module
            with torch.no_grad():  # the same ε as the generator's own objectives draw this step
                sets["generated"] = student_sample(generator, batch, ctx, role=self.config.generator).x0
        elif self.config.generated:
            sets["generated"] = self.one_step_x0(batch, roles, ctx)
        rewards = {key: self.pixel_reward(x.detach(), batch.prompts) for key, x in sets.items()}  # (B,) R(Dec(x))
        if self.config.standardize:
            lrm.update_statistics(torch.cat(list(rewards.values())), self.config.stats_momentum)
        mean, std = lrm.reward_mean.float(), lrm.reward_std.float()
        errors, metrics = [], {}
        for key, x in sets.items():
            r = rewards[key].float()
            if self.config.standardize:  # (z(x) − (r − μ)/σ)², the squared error in units of σ
                z = lrm.standardized(x.detach(), batch.cond).float()  # (B,)
                errors.append((z - (r - mean) / std).pow(2))  # (B,)
                r_hat = lrm.to_reward(z.detach())
            else:
                r_hat = lrm(x.detach(), batch.cond).float()  # (B,) R^l_φ(x)
                errors.append((r_hat - r).pow(2))  # (B,)
            metrics[f"mse_{key}"] = float((r_hat.detach() - r).pow(2).mean())  # in the reward's units
            metrics[f"reward_{key}"] = float(r.mean())
            metrics[f"lrm_{key}"] = float(r_hat.detach().mean())
        if self.config.standardize:
            metrics["reward_std"] = float(std)
        # Eq. 14's mean over the merged batch X ∪ X' (Alg. 1 l. 16), kept per sample: (B,)
        return self.output({"mse": torch.stack(errors).mean(0)}, metrics)


class LRMFinetuneConfig(ObjectiveConfig):
    kind: Literal["lrm_finetune"] = "lrm_finetune"
    SAMPLES_STUDENT: ClassVar[bool] = True
    backprop: Backprop = Field("all", description="'all': through every generator step; 'last': last call only")
    lrm_ema: bool = Field(False, description="score with the lrm role's EMA copy (if any) instead of the live LRM")
    standardized: bool = Field(True, description="maximise the standardised reward (R^l − μ)/σ, so that the "
                                                 "weight β_FT is in units of the reward's spread")

    lrm: RoleName = Field("lrm", description="the latent reward model role R^l_φ (frozen here)")

    def reads(self) -> set[str]:
        return {self.lrm}


def frozen_reward_gradient(score: Callable[[Tensor, Conditioning], Tensor], x: Tensor,
                           cond: Conditioning) -> tuple[Tensor, Tensor]:
    """``(s(x), ∂s/∂x)``: (B,) and (B, C, T, H, W) for a frozen scorer ``s`` (an LRM or its ``standardized``),
    differentiating w.r.t. ``x`` only (the scorer's parameters are untouched)."""
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        r = score(x_in, cond)  # (B,)
        (g,) = torch.autograd.grad(r.sum(), x_in)
    return r.detach(), g


@register_objective
class LRMFinetune(Objective):
    """DOLLAR Eq. 15: ``−R^l_φ(G_θ(ε))`` with the LRM frozen; gradient to the student only (module doc)."""

    kind = "lrm_finetune"
    Config = LRMFinetuneConfig

    def __call__(self, batch: Batch, roles: Roles, ctx: StepContext) -> ObjectiveOutput:
        student = roles[self.role].module
        lrm = roles[self.config.lrm].ema_module if self.config.lrm_ema else roles[self.config.lrm].module
        x_hat = student_sample(student, batch, ctx, role=self.role, backprop=self.config.backprop).x0  # G_θ(ε)
        score = lrm.standardized if self.config.standardized else lrm
        r, g = frozen_reward_gradient(score, x_hat, batch.cond)  # (B,), (B, C, T, H, W)
        dtype = torch.promote_types(x_hat.dtype, torch.float32)
        inner = (x_hat.to(dtype) * g.to(dtype)).flatten(1).sum(1)  # (B,) Σ g·x̂
        loss = -r.to(dtype) - inner + inner.detach()  # value −R^l(x̂) (or −z), gradient −g·∂x̂/∂θ
        reward = lrm.to_reward(r) if self.config.standardized else r
        return self.output({"ft": loss}, {"lrm_reward": float(reward.float().mean())})
