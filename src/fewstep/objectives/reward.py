"""Reward objectives in latent space: latent reward models (DOLLAR (001) Eq. 14–15, App. 7.2) and
the DDPO baseline (DOLLAR App. 7.4, Alg. 2, Eq. 26–28; Black et al. 2023).

**Latent reward models** ``R^l_φ(x[, c])`` score latents ``x`` (B, C, T, H, W) directly, so that
fine-tuning needs neither the decoder nor the pixel reward in the graph (DOLLAR §3.4):

* :class:`ImageLRM` — App. 7.2 Table 12 on one latent frame ``(B, C, H, W)``: conv (k×k, stride
  s, padding 1) + GroupNorm + SiLU → conv (3×3, stride 2) + GroupNorm + SiLU → global average
  pool → 1×1 conv → linear (189,441 parameters for 12 latent channels, as in Table 12). The
  paper's stem is k = s = 4 for 24×40 latents; small latents use e.g. k = 3, s = 1 (config
  ``kernel_size``, ``stride``).
* :class:`TextImageLRM` — Table 13: the same image features ``e_x`` (B, W), a text projection
  (linear D → W + SiLU) of the caption tokens ``e_c`` (B, L, W) of the batch's
  :class:`Conditioning`, cross-attention
  ``Softmax(Q(e_x)·K(e_c)ᵀ/√W)·V(e_c)`` (App. 7.2) and a linear head on ``e_x + attention``.
  Table 13 averages the text tokens before the attention, which leaves one key — a softmax over
  one element is 1 and the image would not interact with the text — so here the image query
  attends over the (masked) text tokens, and a residual keeps the image features.
* :class:`VideoLRM` — a video reward from a frame model: the average of the frame rewards over
  latent frames (App. 7.2 (1), what DOLLAR uses), or ``temporal: conv3d``, the same network with
  3-D convolutions (temporal kernel 3, temporal stride 1) over the whole latent video (App. 7.2 (2)).

:func:`build_lrm` builds the video LRM of a :class:`LatentRewardModelConfig`; a recipe that
declares an ``lrm`` role builds its module with it.

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
keeps running statistics ``μ, σ`` of the fitted rewards (:meth:`VideoLRM.update_statistics`,
DDPO's reward normalisation with an EMA instead of per-batch statistics) and its network predicts
``z = (R − μ)/σ``; ``lrm_fit`` minimises ``(z_φ(x) − (R(Dec(x)) − μ)/σ)²`` (Eq. 14 divided by σ²)
and ``lrm_finetune`` maximises ``z_φ(G_θ(ε)) = (R^l_φ(G_θ(ε)) − μ)/σ`` (Eq. 15 divided by σ, a
constant shift aside), so β_FT = 1 weighs one standard deviation of reward against the VSD and CD
terms whatever the reward. The LRM itself still answers in reward units (``μ + σ·z``). With
``standardize: false`` / ``standardized: false`` the objectives are Eq. 14–15 as written.

**DDPO (kind ``ddpo``, role student)**, DOLLAR App. 7.4, DDPO_SF: the student samples with
DDIM η > 0 on its step schedule followed by ``t = 0`` (η = 1 on a VP schedule is the DDPM
posterior of Eq. 27), the reward of the decoded final sample weights the log-probabilities of
the *last* ``truncation`` stochastic transitions (Eq. 26, 28; Alg. 2)::

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

**Decoder.** ``lrm_fit`` and ``ddpo`` decode latents to frames ``(B, T, H, W, 3)`` in [−1, 1]. The
engine builds objectives from their configs alone, so the decoder is the objective's
``decoder`` attribute — any callable latents → frames, which a recipe or a test may assign after
construction — and, when unset, is loaded lazily from the model named by the config key
``decoder`` (a shipped name or a model directory: its codec's ``VideoPipeline.decode``), frozen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import torch.distributed as dist
from einops import rearrange
from pydantic import Field, field_validator
from torch import Tensor, nn

from ..config import StrictModel
from ..diffusion.samplers import sample_ddim
from ..errors import UserError
from ..models.backbones import Conditioning
from .base import (Batch, Objective, ObjectiveConfig, ObjectiveOutput, RoleName, Roles, StepContext,
                   TimestepsConfig, UniformTimes, register_objective)
from .student import Backprop, StepSchedule, generator_noise, step_times, student_sample

Decoder = Callable[[Tensor], Tensor]  # latents (B, C, T, H, W) -> frames (B, T, H, W, 3) in [−1, 1]


# =============================================================================================
# Latent reward models (DOLLAR App. 7.2, Tables 12–13)
# =============================================================================================

class LatentFeatures(nn.Module):
    """Table 12 up to the flatten: ``(B, C, H, W)`` (or ``(B, C, T, H, W)`` with ``dims=3``) → ``(B, W)``."""

    def __init__(self, in_channels: int, width: int = 128, groups: int = 32, kernel_size: int = 4,
                 stride: int = 4, dims: Literal[2, 3] = 2):
        super().__init__()
        if width % groups:
            raise UserError(f"latent reward model: width={width} is not divisible by groups={groups}")
        if dims == 2:
            conv, pool = nn.Conv2d, nn.AdaptiveAvgPool2d
            stem = {"kernel_size": kernel_size, "stride": stride, "padding": 1}
            down = {"kernel_size": 3, "stride": 2, "padding": 1}
        else:  # temporal kernel 3, temporal stride 1
            conv, pool = nn.Conv3d, nn.AdaptiveAvgPool3d
            stem = {"kernel_size": (3, kernel_size, kernel_size), "stride": (1, stride, stride), "padding": 1}
            down = {"kernel_size": 3, "stride": (1, 2, 2), "padding": 1}
        self.net = nn.Sequential(
            conv(in_channels, width, **stem), nn.GroupNorm(groups, width), nn.SiLU(),  # (B, W, H/s, W/s)
            conv(width, width, **down), nn.GroupNorm(groups, width), nn.SiLU(),  # (B, W, H/2s, W/2s)
            pool(1),  # (B, W, 1, 1)
            conv(width, width, kernel_size=1),  # (B, W, 1, 1)
            nn.Flatten(),  # (B, W)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ImageLRM(nn.Module):
    """Image latent reward model, DOLLAR App. 7.2 Table 12: ``(B, C, H, W) -> (B,)`` (the caption is ignored)."""

    def __init__(self, in_channels: int, width: int = 128, groups: int = 32, kernel_size: int = 4,
                 stride: int = 4, dims: Literal[2, 3] = 2):
        super().__init__()
        self.features = LatentFeatures(in_channels, width, groups, kernel_size, stride, dims)
        self.head = nn.Linear(width, 1)

    def forward(self, x: Tensor, cond: Conditioning | None = None) -> Tensor:
        return self.head(self.features(x)).squeeze(-1)  # (B,)


class TextImageLRM(nn.Module):
    """Text-image latent reward model, DOLLAR App. 7.2 Table 13 (see module doc): ``(B, C, H, W), c -> (B,)``."""

    def __init__(self, in_channels: int, text_dim: int, width: int = 128, groups: int = 32, kernel_size: int = 4,
                 stride: int = 4, dims: Literal[2, 3] = 2):
        super().__init__()
        self.features = LatentFeatures(in_channels, width, groups, kernel_size, stride, dims)
        self.text_mlp = nn.Sequential(nn.Linear(text_dim, width), nn.SiLU())  # Table 13: one D → 128 projection
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.head = nn.Linear(width, 1)

    def forward(self, x: Tensor, cond: Conditioning | None = None) -> Tensor:
        if cond is None:
            raise UserError("a text-image latent reward model needs the captions (the batch's cond)")
        e_x = self.features(x)  # (B, W)
        e_c = self.text_mlp(cond.context.to(e_x.dtype))  # (B, L, W)
        logits = torch.einsum("bw,blw->bl", self.q(e_x), self.k(e_c)) / math.sqrt(e_x.shape[-1])  # (B, L)
        if cond.mask is not None:
            logits = logits.masked_fill(~cond.mask, float("-inf"))
        attention = torch.einsum("bl,blw->bw", logits.softmax(-1), self.v(e_c))  # (B, W)
        return self.head(e_x + attention).squeeze(-1)  # (B,)


class VideoLRM(nn.Module):
    """Video latent reward model (DOLLAR App. 7.2): ``(B, C, T, H, W), c -> (B,)``.

    ``temporal="average"``: the mean over latent frames of ``frame_model`` (a 2-D LRM);
    ``temporal="conv3d"``: ``frame_model`` is a 3-D LRM (``dims=3``) applied to the whole video.

    The network predicts the reward in standard units, ``z(x)``, and ``forward`` returns it in the
    reward's own units, ``μ + σ·z(x)``, with ``μ, σ`` running statistics of the fitted rewards held
    as buffers (``reward_mean``, ``reward_var``; updated by :meth:`update_statistics`, see the module
    doc, "Standardised rewards"). Until the first update ``μ = 0, σ = 1``.
    """

    def __init__(self, frame_model: nn.Module, temporal: Literal["average", "conv3d"] = "average"):
        super().__init__()
        self.frame_model, self.temporal = frame_model, temporal
        self.register_buffer("reward_mean", torch.zeros(()))
        self.register_buffer("reward_var", torch.ones(()))
        self.register_buffer("reward_updates", torch.zeros((), dtype=torch.long))

    @property
    def reward_std(self) -> Tensor:
        return self.reward_var.clamp_min(1e-12).sqrt()

    def standardized(self, x: Tensor, cond: Conditioning | None = None) -> Tensor:
        """``z(x) = (R^l(x) − μ)/σ``, (B,)."""
        if self.temporal == "conv3d":
            return self.frame_model(x, cond)
        frames = x.shape[2]
        flat = rearrange(x, "b c t h w -> (b t) c h w")  # (B·T, C, H, W)
        per_frame = self.frame_model(flat, None if cond is None else cond.repeat(frames))  # (B·T,)
        return rearrange(per_frame, "(b t) -> b t", t=frames).mean(1)  # (B,)

    def to_reward(self, z: Tensor) -> Tensor:
        """Standard units → the reward's own: ``μ + σ·z``."""
        return self.reward_mean.to(z.dtype) + self.reward_std.to(z.dtype) * z

    def forward(self, x: Tensor, cond: Conditioning | None = None) -> Tensor:
        return self.to_reward(self.standardized(x, cond))  # (B,) R^l(x)

    @torch.no_grad()
    def update_statistics(self, rewards: Tensor, momentum: float) -> None:
        """Fold a batch of target rewards (N,) into ``μ, σ²``: set on the first call, then an EMA.

        ``δ = mean(r) − μ;  μ ← μ + (1 − m)·δ;  σ² ← m·(σ² + (1 − m)·δ²) + (1 − m)·var(r)`` — the
        exponentially weighted mean and variance (West 1979). The batch moments are sums of
        ``r − μ`` (in float64), which keeps ``var(r) = E[(r − μ)²] − δ²`` free of cancellation for
        rewards far from zero (JPEG: −0.3 ± 0.05 kB).
        """
        d = rewards.detach().double().flatten() - self.reward_mean.double()  # (N,) r − μ
        sums = torch.stack([torch.tensor(float(d.numel()), dtype=torch.float64, device=d.device), d.sum(),
                            d.pow(2).sum()])
        if dist.is_available() and dist.is_initialized():  # every rank folds in the same global batch
            dist.all_reduce(sums)
        n, total, squares = (float(v) for v in sums)
        delta = total / n  # mean(r) − μ
        batch_var = max(squares / n - delta**2, 0.0)
        if int(self.reward_updates) == 0:
            self.reward_mean.add_(delta)
            self.reward_var.fill_(batch_var if batch_var > 0 else 1.0)
        else:
            self.reward_mean.add_((1 - momentum) * delta)
            self.reward_var.copy_(momentum * (self.reward_var + (1 - momentum) * delta**2)
                                  + (1 - momentum) * batch_var)
        self.reward_updates.add_(1)


class LatentRewardModelConfig(StrictModel):
    """Architecture of a latent reward model (DOLLAR App. 7.2); for a recipe's ``lrm`` role."""

    text: bool = Field(False, description="condition on the caption (Table 13) for text-image/text-video rewards")
    temporal: Literal["average", "conv3d"] = Field("average", description="frame average of a 2-D LRM, or 3-D conv")
    width: int = Field(128, ge=1, description="feature channels (Tables 12–13: 128)")
    groups: int = Field(32, ge=1, description="GroupNorm groups")
    kernel_size: int = Field(4, ge=1, description="stem conv kernel (Table 12: 4; e.g. 3 for tiny latents)")
    stride: int = Field(4, ge=1, description="stem conv stride (Table 12: 4; e.g. 1 for tiny latents)")


def build_lrm(config: LatentRewardModelConfig, in_channels: int, text_dim: int | None = None) -> VideoLRM:
    """The video LRM of ``config`` for latents with ``in_channels`` channels (and captions of ``text_dim``)."""
    dims = 3 if config.temporal == "conv3d" else 2
    common = {"width": config.width, "groups": config.groups, "kernel_size": config.kernel_size,
              "stride": config.stride, "dims": dims}
    if config.text:
        if text_dim is None:
            raise UserError("a text-conditioned latent reward model needs the text encoder's width (text_dim)")
        frame = TextImageLRM(in_channels, text_dim, **common)
    else:
        frame = ImageLRM(in_channels, **common)
    return VideoLRM(frame, config.temporal)


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
    """Holds the frozen decoder and pixel reward, each assignable or built on first use (module doc, "Decoder")."""

    def __init__(self, config: PixelRewardConfig, name: str):
        super().__init__(config, name)
        self.decoder: Decoder | None = None  # assignable; else loaded from config.decoder on first use
        self.reward_model: nn.Module | None = None  # assignable; else build_reward(config.reward) on first use

    def pixel_reward(self, latents: Tensor, prompts: list[str]) -> Tensor:
        """``R(Dec(x))`` per sample (B,), without gradients. latents: (B, C, T, H, W)."""
        with torch.no_grad():
            if self.decoder is None:
                if self.config.decoder is None:
                    raise UserError(f"objective {self.name!r} ({self.config.kind}) needs a decoder: set its "
                                    f"'decoder' key to a model name or directory, or have the recipe assign one")
                from ..models.pipeline import VideoPipeline

                pipe = VideoPipeline.load(self.config.decoder, device=latents.device).requires_grad_(False)
                self.decoder = pipe.decode
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
                                "few-step samples G(ε) on student_times, the latents lrm_finetune scores")
    student_times: StepSchedule = Field("dollar4", description="the generator's step schedule (generated_from: sample)")
    generator: RoleName = Field("student", description="the role whose one-step x̂0 gives X'")
    timesteps: TimestepsConfig = Field(default_factory=_one_step_times, description="t of the one-step x̂0")
    cfg_scale: float | None = Field(None, description="CFG w of the generator's x̂0 (DOLLAR App. 7.4 uses v^w); "
                                                      "null = none")
    standardize: bool = Field(True, description="regress the standardised reward (r − μ)/σ, running μ, σ")
    stats_momentum: float = Field(0.99, ge=0, lt=1, description="EMA momentum of the running μ, σ² (per step)")

    def reads(self) -> set[str]:
        return {self.generator} if self.generated else set()


@register_objective
class LRMFit(PixelRewardObjective):
    """DOLLAR Eq. 14: regress ``R^l_φ(x)`` on ``R(Dec(x))`` over data and one-step generated latents."""

    kind = "lrm_fit"
    Config = LRMFitConfig

    def __init__(self, config: LRMFitConfig, name: str):
        super().__init__(config, name)
        if not (config.real or config.generated):
            raise UserError(f"objective {name!r}: lrm_fit needs real and/or generated latents")
        self.distribution = config.timesteps.build()

    def one_step_x0(self, batch: Batch, roles: Roles, ctx: StepContext) -> Tensor:
        """X': the generator's x̂0 at ``x_t = α·x0 + σ·ε`` (DOLLAR Eq. 8), detached. (B, C, T, H, W)."""
        generator = roles[self.config.generator].module
        x0 = batch.latents
        cfg = self.config.cfg_scale
        guided = cfg is not None and cfg != 1.0
        with torch.no_grad():
            t = ctx.times(self.distribution, "lrm/t").to(x0.dtype)  # (B,)
            eps = ctx.randn(tuple(x0.shape[1:]), "lrm/eps", dtype=x0.dtype)
            x_t = generator.schedule.add_noise(x0, eps, t)
            pred = generator.predict(x_t, t, batch.cond, cfg_scale=cfg if guided else None,
                                     uncond=batch.uncond if guided else None)
            return pred.x0

    def __call__(self, batch: Batch, roles: Roles, ctx: StepContext) -> ObjectiveOutput:
        lrm = roles[self.role].module
        sets = {}
        if self.config.real:
            sets["real"] = batch.latents
        if self.config.generated and self.config.generated_from == "sample":
            generator = roles[self.config.generator].module
            times = step_times(self.config.student_times, generator.schedule)
            with torch.no_grad():  # the same ε as the generator's own objectives draw this step
                sets["generated"] = student_sample(generator, batch, ctx, times, role=self.config.generator).x0
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
    student_times: StepSchedule = Field("dollar4", description="the student's step schedule (as in the vsd objective)")
    backprop: Backprop = Field("all", description="'all': through every generator step; 'last': last call only")
    lrm_ema: bool = Field(False, description="score with the lrm role's EMA copy (if any) instead of the live LRM")
    standardized: bool = Field(True, description="maximise the standardised reward (R^l − μ)/σ, so that the "
                                                 "weight β_FT is in units of the reward's spread")

    def reads(self) -> set[str]:
        return {"lrm"}


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
        lrm = roles["lrm"].ema_module if self.config.lrm_ema else roles["lrm"].module
        times = step_times(self.config.student_times, student.schedule)
        x_hat = student_sample(student, batch, ctx, times, role=self.role, backprop=self.config.backprop).x0
        score = lrm.standardized if self.config.standardized else lrm
        r, g = frozen_reward_gradient(score, x_hat, batch.cond)  # (B,), (B, C, T, H, W)
        dtype = torch.promote_types(x_hat.dtype, torch.float32)
        inner = (x_hat.to(dtype) * g.to(dtype)).flatten(1).sum(1)  # (B,) Σ g·x̂
        loss = -r.to(dtype) - inner + inner.detach()  # value −R^l(x̂) (or −z), gradient −g·∂x̂/∂θ
        reward = lrm.to_reward(r) if self.config.standardized else r
        return self.output({"ft": loss}, {"lrm_reward": float(reward.float().mean())})


# =============================================================================================
# DDPO baseline (DOLLAR App. 7.4, Alg. 2, Eq. 26–28)
# =============================================================================================

class DDPOConfig(PixelRewardConfig):
    kind: Literal["ddpo"] = "ddpo"
    student_times: StepSchedule = Field("dollar4", description="the student's step schedule; t = 0 is appended")
    eta: float = Field(1.0, gt=0, le=1, description="DDIM stochasticity (1 = DDPM posterior, DOLLAR Eq. 27)")
    truncation: int = Field(2, ge=1, description="the last N stochastic transitions carry log-prob gradients")
    advantage: Literal["per_prompt", "batch"] = Field("per_prompt", description="reward normalisation groups")
    advantage_clip: float = Field(5.0, gt=0, description="clip advantages to ±this (DDPO's adv_clip_max)")
    log_prob: Literal["mean", "sum"] = Field("mean", description="log p over dimensions: mean (DDPO code) or sum")


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
        """Sample with DDIM η on the student times + 0; log-probs (with gradients) of the truncated steps."""
        times = step_times(self.config.student_times, student.schedule)
        times = torch.cat([times, torch.zeros(1, dtype=times.dtype)])  # (K + 1,)
        x0 = batch.latents
        # ε (the generator's noise, as in G(ε)) and the per-transition DDIM noises z_i
        noises = generator_noise(ctx, tuple(x0.shape[1:]), len(times), role=self.role, dtype=x0.dtype)
        stochastic = [i for i in range(len(times) - 1) if times[i + 1] > 0]
        if not stochastic:
            raise UserError(f"objective {self.name!r}: student_times {self.config.student_times!r} has no stochastic "
                            f"transition (one step straight to t = 0); DDPO needs at least two student steps")
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
