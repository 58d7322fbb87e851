"""``finetune``: plain flow-matching fine-tuning of a model on the toy world.

The student starts from ``model`` (a shipped name or a model directory) and is trained with the
denoiser's own diffusion loss (:mod:`fewstep.objectives.flow_matching`) on toy-world clips.
It is not a distillation method; it exercises the whole engine end to end — roles, optimizer,
EMA, cadence, checkpoints, resume, DDP/FSDP, evaluation, health — and is what the engine's
tests run. Defaults: ``finetune.yaml`` next to this file.

Any role a :class:`~fewstep.recipes.base.PipelineRecipe` builds may be declared, e.g. a
``fake_score`` trained with its own ``flow_matching`` objective every 5th step — a config
change, no code.
"""

from __future__ import annotations

from pydantic import Field

from ..objectives import flow_matching  # noqa: F401  (registers the flow_matching objective)
from .base import PipelineRecipe, RecipeConfig, register_recipe


class FinetuneConfig(RecipeConfig):
    model: str = Field("toy-teacher", description="model to start from: a shipped name or a model directory")


@register_recipe
class Finetune(PipelineRecipe):
    name = "finetune"
    Config = FinetuneConfig
