"""Role builders by config: a role that is not a copy of the model says ``build: {kind: …, …}``.

::

    roles:
      student: {optim: …}                      # no build: a copy of the model's denoiser
      lrm:     {build: {kind: lrm, width: 64, …}, optim: …}            DOLLAR App. 7.2 latent reward model
      discriminator: {build: {kind: timestep_heads, heads: 5}, optim: …}  AccVideo Eq. 8 projection heads
      discriminator: {build: {kind: feature_discriminator, features: dinov2, path: DIR}, optim: …}  SwiftVideo Eq. 10
      discriminator: {build: {kind: feature_heads, blocks: [1, 2, 3]}, optim: …}  RGTD §3.3 multi-head D
      reward_video_text: {build: {kind: reward, name: toy-clip-video}}   a frozen reward model (RGTD Eq. 13–14)
      student: {build: {kind: expert, expert: transformer}, optim: …}    one expert of Wan 2.2 as a single student

Any recipe builds any registered kind, under any role name (two discriminators, two LRMs), so
mixing objectives across papers is a config change. A builder reads what it needs from the model
being distilled (latent channels, caption width, hidden width); a new one is a config class with
``kind`` and ``build(model)``, registered with :func:`register_builder`.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import Field, field_validator
from torch import nn

from ..config import KindRegistry, StrictModel
from ..errors import UserError
from ..models.features import depth
from ..models.family import VideoModel
from ..objectives.adversarial import TimestepHeads
from ..objectives.distribution_alignment import FeatureDiscriminatorConfig, build_feature_discriminator
from ..objectives.feature_gan import FeatureHeads
from ..rewards import REWARDS, build_reward
from ..rewards.latent import LatentRewardModelConfig, build_lrm

ROLE_BUILDERS = KindRegistry("role builder")
register_builder = ROLE_BUILDERS.register


def parse_build(raw, role: str) -> StrictModel:
    """``roles.<role>.build`` → its kind's config (one-line errors naming the key)."""
    return ROLE_BUILDERS.parse(raw, f"roles.{role}.build")


@register_builder
class LatentRewardModelBuild(LatentRewardModelConfig):
    """DOLLAR's latent reward model R^l_φ (App. 7.2, Tables 11–13) on the model's latents and captions."""

    kind: Literal["lrm"] = "lrm"

    def build(self, model: VideoModel) -> nn.Module:
        return build_lrm(self, model.latent_shape(1)[1], model.text_dim)


@register_builder
class TimestepHeadsBuild(StrictModel):
    """AccVideo's timestep-aware projection heads H_0 … H_{m−1} (Eq. 8) on the model's hidden width."""

    kind: Literal["timestep_heads"] = "timestep_heads"
    heads: int = Field(5, ge=1, description="m: one head per key timestep of the student grid (AccVideo: 5)")
    width: int = Field(64, ge=1, description="channels of each head's hidden conv")
    single_head: bool = Field(False, description="one head for every timestep (AccVideo §5.2 ablation)")

    def build(self, model: VideoModel) -> nn.Module:
        return TimestepHeads(model.hidden_dim, self.heads, self.width, self.single_head)


@register_builder
class FeatureHeadsBuild(StrictModel):
    """RGTD §3.3's multi-head discriminator: one head per teacher block it reads, on the model's hidden width."""

    kind: Literal["feature_heads"] = "feature_heads"
    blocks: list[int] = Field([-1], min_length=1, description="teacher blocks whose features the heads read "
                                                              "(negative: from the last)")
    width: int = Field(64, ge=1, description="channels of each head's hidden conv")

    def build(self, model: VideoModel) -> nn.Module:
        n = depth(model.denoiser)
        if any(not -n <= b < n for b in self.blocks):
            raise UserError(f"build key 'blocks': {self.blocks} out of range for the model's {n} transformer blocks")
        return FeatureHeads(model.hidden_dim, self.blocks, self.width)


@register_builder
class RewardBuild(StrictModel):
    """A frozen reward model (fewstep.rewards: toy-clip-frame, sharpness, clip, xclip, …) as a role."""

    kind: Literal["reward"] = "reward"
    name: str = Field(description="a registered reward (fewstep.rewards.REWARDS)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="its keyword arguments (e.g. path: DIR)")

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in REWARDS:
            raise ValueError(f"unknown reward {value!r}; expected one of {', '.join(REWARDS)}")
        return value

    def build(self, model: VideoModel) -> nn.Module:
        return build_reward(self.name, **self.kwargs)


@register_builder
class FeatureDiscriminatorBuild(FeatureDiscriminatorConfig):
    """SwiftVideo Eq. 10's discriminator: a frozen image feature network (toy CLIP frames or a local DINOv2)
    with trainable spatial and temporal heads (objectives/distribution_alignment.py)."""

    kind: Literal["feature_discriminator"] = "feature_discriminator"

    def build(self, model: VideoModel) -> nn.Module:
        return build_feature_discriminator(self, model)


@register_builder
class ExpertBuild(StrictModel):
    """One expert of a two-expert model (Wan 2.2) as a network of its own: the ``single`` student layout.

    A role without ``build`` is a copy of the model's denoiser, which for Wan 2.2 routes each sample by its t
    to a copy of its expert (models/experts.py): the ``per_expert`` layout, one student per expert, each owning
    the student steps on its side of the boundary and handing its output to the next (LightX2V's phased Wan 2.2
    scheme). ``{kind: expert}`` instead trains one network for every student step, initialised from one expert.
    Default: the high-noise ``transformer``. A few-step student spends most of its steps at high noise — on a
    Wan 2.2 T2V teacher (shift 12, boundary 0.875) ``dollar4``'s t = 1, 0.75, 0.5 lie on the high-noise side
    and only t = 0.25 (σ = 0.8) below — and its first step, which lays out the whole clip from pure noise, is
    the high-noise expert's job; the low-noise expert has never denoised from pure noise.
    ``RUN/student`` and the export hold this one network in both slots.
    """

    kind: Literal["expert"] = "expert"
    expert: str = Field("transformer", description="the pipeline slot of the expert the role starts from "
                                                   "(Wan 2.2: transformer = high noise, transformer_2 = low noise)")

    def source(self, model: VideoModel) -> nn.Module:
        """The expert's denoiser in ``model`` (shared weights: the base a LoRA student's adapters merge into)."""
        experts = model.denoisers()
        if self.expert not in experts:
            raise UserError(f"build key 'expert': {self.expert!r} is not one of the model's denoisers "
                            f"({', '.join(experts)})")
        return experts[self.expert]

    def build(self, model: VideoModel) -> nn.Module:
        """A trainable float32 copy (a LoRA role's engine freezes it and adds adapters; the copy is not shared)."""
        return copy.deepcopy(self.source(model)).float().requires_grad_(True)
