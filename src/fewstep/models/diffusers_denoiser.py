"""A :class:`~fewstep.models.denoiser.Denoiser` around a diffusers transformer, built from config."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..config import StrictModel
from ..diffusion.schedules import FlowMatchingConfig, ScheduleConfig
from .backbones import load_diffusers_backbone
from .denoiser import Denoiser


class DiffusersDenoiserConfig(StrictModel):
    """A diffusers transformer loaded from a local directory (never from a hub)."""

    backbone: Literal["wan", "cogvideox", "hunyuanvideo"]
    path: str = Field(description="local model or pipeline directory")
    subfolder: str | None = Field(None, description="e.g. 'transformer' for a pipeline directory")
    prediction_type: Literal["eps", "x0", "v", "flow", "conjugate"] | None = Field(
        None, description="defaults to the backbone's own (wan, hunyuanvideo: flow; cogvideox: v)")
    schedule: ScheduleConfig = Field(default_factory=FlowMatchingConfig)

    def build(self) -> Denoiser:
        backbone = load_diffusers_backbone(self.backbone, self.path, self.subfolder)
        return Denoiser(backbone, self.schedule.build(), self.prediction_type or backbone.prediction_type)
