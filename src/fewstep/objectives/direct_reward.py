"""Direct reward gradients through the decoder (RGTD (000) §3.4, Eq. 13–14).

The student's sample ``x̂0 = G_θ(ε)`` (the run's ``generator:``; the same ``ε`` as its other
objectives) is decoded by the frozen decoder to frames ``(B, T, H, W, 3)`` and scored by frozen
reward roles (``build: {kind: reward, name: …}``, :mod:`fewstep.rewards`):

* **spatial** (kind ``spatial_reward``), Eq. 13: the first, middle and last frames
  (:func:`~fewstep.rewards.base.keyframe_indices`), each scored as an image by an image–text reward
  ``R_it(frame, c)`` and an image-quality reward ``R_iq(frame)``::

      L_spatial = −(1/3) Σ_{m ∈ first, middle, last} (R_it(x̂0^m, c) + R_iq(x̂0^m))

  (the paper says it "randomly samples" the 3 frames but names them: first, middle, last);
* **temporal** (kind ``temporal_reward``), Eq. 14: a video–text reward on the whole clip,
  ``L_temporal = −R_v(x̂0, c)`` (Eq. 14 writes ``R_v(x̂0)``; its §3.4 calls R_v a video–*text* model, so
  the caption is passed).

Only the student learns: the reward's gradient is taken with respect to the sample alone
(:func:`through_input`), so no gradient reaches the decoder, the reward models or any other role
whatever their ``requires_grad``. The decoder is the objective's ``decoder`` attribute, assigned
by the recipe (``Plan.prepare_objective``: the frozen ``decode`` of the model the config key
``decoder`` names, the recipe's own when null) or by a test.
"""

from __future__ import annotations

from typing import Callable, ClassVar, Literal

import torch
from einops import rearrange
from pydantic import Field
from torch import Tensor

from ..errors import UserError
from ..rewards.base import keyframe_indices
from .base import Batch, Objective, ObjectiveConfig, ObjectiveOutput, RoleName, Roles, StepContext, register_objective
from .student import Backprop, student_sample

Decoder = Callable[[Tensor], Tensor]  # latents (B, C, T, H, W) -> frames (B, T, H, W, 3) in [−1, 1]


def through_input(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``fn(x)`` (B,) as a loss that trains only what produced ``x``: its value is ``fn(x)`` and its gradient
    ``∂fn/∂x · ∂x/∂θ``, with ``∂fn/∂x`` taken by ``torch.autograd.grad`` with respect to a detached copy of ``x``,
    so no parameter inside ``fn`` (a frozen decoder, reward, teacher or discriminator) accumulates a gradient."""
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        value = fn(x_in)  # (B,)
        (g,) = torch.autograd.grad(value.sum(), x_in)
    dtype = torch.promote_types(x.dtype, torch.float32)
    inner = (x.to(dtype) * g.to(dtype)).flatten(1).sum(1)  # (B,) Σ g·x
    return value.detach().to(dtype) + inner - inner.detach()


def at_least_float32(frames: Tensor) -> Tensor:
    """Frames for a reward model: bf16/fp16 decoder output promoted to float32, float64 kept."""
    return frames.to(torch.promote_types(frames.dtype, torch.float32))


class DirectRewardConfig(ObjectiveConfig):
    """Keys both direct-reward objectives have."""

    SAMPLES_STUDENT: ClassVar[bool] = True
    backprop: Backprop = Field("all", description="'all': through every generator step; 'last': last call only")
    decoder: str | None = Field(None, description="model (shipped name or directory) whose decoder decodes the "
                                                 "sample; null = the recipe's model")


class DirectRewardObjective(Objective):
    """Holds the frozen decoder (assigned, module doc) and decodes the student's sample."""

    def __init__(self, config: DirectRewardConfig, name: str):
        super().__init__(config, name)
        self.decoder: Decoder | None = None

    def sample_and_decode(self, batch: Batch, roles: Roles, ctx: StepContext) -> tuple[Tensor, Callable]:
        """``(x̂0, decode)``: the student's sample in its graph (B, C, T, H, W) and the decoder."""
        if self.decoder is None:
            raise UserError(f"objective {self.name!r} ({self.config.kind}) has no decoder: set its 'decoder' key to a "
                            f"model name or directory (the recipe assigns that model's decoder)")
        student = roles[self.role].module
        x_hat = student_sample(student, batch, ctx, role=self.role, backprop=self.config.backprop).x0
        return x_hat, self.decoder


class SpatialRewardConfig(DirectRewardConfig):
    kind: Literal["spatial_reward"] = "spatial_reward"
    image_text: RoleName = Field("reward_image_text", description="R_it: an image–text reward role (frozen)")
    image_quality: RoleName | None = Field("reward_image_quality", description="R_iq: an image-quality reward role "
                                                                              "(frozen); null = none")

    def reads(self) -> set[str]:
        return {self.image_text} | ({self.image_quality} if self.image_quality else set())


@register_objective
class SpatialReward(DirectRewardObjective):
    """RGTD Eq. 13: ``−mean over the first, middle, last frames of R_it(frame, c) + R_iq(frame)`` (module doc)."""

    kind = "spatial_reward"
    Config = SpatialRewardConfig

    def __call__(self, batch: Batch, roles: Roles, ctx: StepContext) -> ObjectiveOutput:
        cfg = self.config
        x_hat, decode = self.sample_and_decode(batch, roles, ctx)
        r_it, r_iq = roles[cfg.image_text].module, roles[cfg.image_quality].module if cfg.image_quality else None
        scores: dict[str, Tensor] = {}

        def reward(x: Tensor) -> Tensor:
            frames = decode(x)  # (B, T, H, W, 3) in [−1, 1]
            keys = frames[:, keyframe_indices(frames.shape[1])]  # (B, 3, H, W, 3): first, middle, last
            m = keys.shape[1]
            images = at_least_float32(rearrange(keys, "b m h w c -> (b m) 1 h w c"))  # each frame a 1-frame clip
            prompts = [p for p in batch.prompts for _ in range(m)]
            scores["image_text"] = r_it(images, prompts).reshape(-1, m).mean(1)  # (B,)
            total = scores["image_text"]
            if r_iq is not None:
                scores["image_quality"] = r_iq(images, prompts).reshape(-1, m).mean(1)
                total = total + scores["image_quality"]
            return total

        loss = -through_input(reward, x_hat)  # value −(R_it + R_iq), gradient to the student only
        return self.output({"spatial": loss}, {k: float(v.detach().mean()) for k, v in scores.items()})


class TemporalRewardConfig(DirectRewardConfig):
    kind: Literal["temporal_reward"] = "temporal_reward"
    video_text: RoleName = Field("reward_video_text", description="R_v: a video–text reward role (frozen)")

    def reads(self) -> set[str]:
        return {self.video_text}


@register_objective
class TemporalReward(DirectRewardObjective):
    """RGTD Eq. 14: ``−R_v(x̂0, c)`` on the whole decoded clip (module doc)."""

    kind = "temporal_reward"
    Config = TemporalRewardConfig

    def __call__(self, batch: Batch, roles: Roles, ctx: StepContext) -> ObjectiveOutput:
        x_hat, decode = self.sample_and_decode(batch, roles, ctx)
        r_v = roles[self.config.video_text].module
        loss = -through_input(lambda x: r_v(at_least_float32(decode(x)), list(batch.prompts)), x_hat)  # (B,)
        return self.output({"temporal": loss}, {"video_text": float(-loss.detach().mean())})

