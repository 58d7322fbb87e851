"""Role builders by config: a role that is not a copy of the model says ``build: {kind: …, …}``.

::

    roles:
      student: {optim: …}                      # no build: a copy of the model's denoiser
      lrm:     {build: {kind: lrm, width: 64, …}, optim: …}            DOLLAR App. 7.2 latent reward model
      discriminator: {build: {kind: timestep_heads, heads: 5}, optim: …}  AccVideo Eq. 8 projection heads

Any recipe builds any registered kind, under any role name (two discriminators, two LRMs), so
mixing objectives across papers is a config change. A builder reads what it needs from the model
being distilled (latent channels, caption width, hidden width); a new one is a config class with
``kind`` and ``build(model)``, registered with :func:`register_builder`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from ..config import KindRegistry, StrictModel
from ..models.family import VideoModel
from ..objectives.adversarial import TimestepHeads
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
