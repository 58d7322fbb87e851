"""The engine's typed config: ``train`` (keys every recipe has), ``roles`` and ``stages``.

A recipe's config (:class:`fewstep.recipes.base.RecipeConfig`) extends :class:`EngineConfig`
with its own keys. ``stages`` is an ordered mapping ``name → stage``; each stage lists its
objectives by name, each tagged with the registered ``kind`` and followed by that objective's
own typed keys::

    stages:
      critic_warmup:
        steps: 200                      # null (last stage only) = until train.steps
        every: {student: 5}             # cadence overrides for this stage
        objectives:
          fake:  {kind: flow_matching, role: fake_score}
          vsd:   {kind: vsd, role: student, weight: 1.0, cfg_scale: 4.5}

Everything is a mapping so ``--set stages.critic_warmup.objectives.vsd.weight=0.5`` works.
Validation names the offending key: an unknown objective kind, an objective or cadence naming a
role that is not declared under ``roles``, an objective updating a frozen role, a cadence of 0.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, SerializeAsAny, ValidationError, model_validator

from ..config import StrictModel, format_validation_error
from ..errors import UserError
from ..objectives.base import OBJECTIVES, ObjectiveConfig, RoleName, objective_class
from ..objectives.student import GeneratorConfig
from .health import HealthConfig
from .roles import FROZEN_ROLES, RoleSpec


class TrainConfig(StrictModel):
    """Keys every recipe uses."""

    steps: int = Field(1000, ge=1, description="total engine steps over all stages")
    batch_size: int = Field(8, ge=1, description="global batch per step (all processes × accumulation)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    seed: int = Field(0, ge=0, description="seeds data order, noise and initialisation")
    checkpoint_every: int = Field(500, ge=0, description="steps between checkpoints (0 = only at the end)")
    keep_checkpoints: int = Field(3, ge=1, description="checkpoints kept (oldest deleted first)")
    max_bad_steps: int = Field(10, ge=1, description="stop after this many non-finite steps in a row")
    stop_on_collapse: bool = Field(False, description="stop when a health check fails")
    eval_every: int = Field(0, ge=0, description="steps between evaluations (0 = never)")
    eval_steps: list[int] | None = Field(None, min_length=1, description=(
        "sampler step counts evaluated on the model's grid; null: the student as exported (its generator)"))
    eval_prompts: int = Field(2, ge=1, le=24, description="first N of the evaluator's prompts")
    eval_samples: int = Field(4, ge=2, description="samples per prompt (diversity needs >= 2)")
    log_every: int = Field(10, ge=1)
    prefetch: bool | Literal["auto"] = Field("auto", description=(
        "prepare the next step's batch on a data thread while the step trains (engine/data.py); auto: with an "
        "accelerator, or on a CPU with cores the step's threads leave free"))
    tensorboard: bool = True
    bf16: bool = Field(False, description="bf16 autocast around objectives")
    gradient_checkpointing: bool = False
    cpu_offload: bool = Field(False, description="FSDP on CUDA: keep shards, gradients and optimiser state in CPU memory")
    frozen_dtype: Literal["float32", "bfloat16"] = Field("float32", description=(
        "dtype of the model's frozen weights (the teacher, and the base a LoRA role shares with it); trainable "
        "weights, adapters and optimiser state stay float32"))
    distributed: Literal["ddp", "fsdp"] = "ddp"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    flush_denormal: bool = Field(True, description=(
        "CPU: flush denormal floats to zero while training (their arithmetic is ~15x slower; "
        "Adam's second moments are full of them early in adaLN-Zero training)"))
    health: HealthConfig = Field(default_factory=HealthConfig)


class StageConfig(StrictModel):
    steps: int | None = Field(None, ge=1, description="null = until train.steps (last stage only)")
    every: dict[RoleName, Annotated[int, Field(ge=1)]] = Field(
        default_factory=dict, description="per-role cadence overrides (update on every k-th step)")
    objectives: dict[str, SerializeAsAny[ObjectiveConfig]] = Field(min_length=1)


def _prefixed(message: str, prefix: str) -> str:
    """Put ``prefix.`` in front of the key a :func:`format_validation_error` message names."""
    return message.replace("config key '", f"config key '{prefix}.", 1)


class EngineConfig(StrictModel):
    train: TrainConfig = Field(default_factory=TrainConfig)
    generator: GeneratorConfig | None = Field(default_factory=GeneratorConfig, description=(
        "how the student samples: every objective that draws student samples, the periodic evaluation and the "
        "exported model use it; null: the student is a full model that keeps the model's own sampler (fine-tuning)"))
    roles: dict[RoleName, RoleSpec] = Field(min_length=1)
    stages: dict[str, StageConfig] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _typed_objectives(cls, data: Any) -> Any:
        """Validate each objective against the config class its ``kind`` names (full key in errors)."""
        if not isinstance(data, dict):
            return data
        if not isinstance(data.get("stages"), dict):
            return data
        stages = {}
        for sname, stage in data["stages"].items():
            if isinstance(stage, dict) and isinstance(stage.get("objectives"), dict):
                stage = dict(stage, objectives={oname: _parse_objective(obj, f"stages.{sname}.objectives.{oname}")
                                                for oname, obj in stage["objectives"].items()})
            stages[sname] = stage
        return {**data, "stages": stages}

    @model_validator(mode="after")
    def _check_roles(self) -> "EngineConfig":
        declared = ", ".join(self.roles)
        for name in FROZEN_ROLES:
            if name in self.roles and self.roles[name].trainable:
                raise UserError(f"config key 'roles.{name}.optim': the {name} is frozen; remove its optim")
        for sname, stage in self.stages.items():
            for role in stage.every:
                if role not in self.roles:
                    raise UserError(f"config key 'stages.{sname}.every.{role}': role {role!r} is not declared "
                                    f"under roles (declared: {declared})")
            for oname, obj in stage.objectives.items():
                key = f"stages.{sname}.objectives.{oname}"
                for role in sorted({obj.role} | obj.reads()):
                    if role not in self.roles:
                        raise UserError(f"config key '{key}': objective {obj.kind!r} uses role {role!r}, which is "
                                        f"not declared under roles (declared: {declared})")
                if obj.samples_student() and self.generator is None:
                    raise UserError(f"config key '{key}': objective {obj.kind!r} samples the student, which needs a "
                                    f"generator: block (generator is null)")
                if self.generator is not None:
                    obj.check_generator(self.generator, key)
                if not self.roles[obj.role].trainable:
                    raise UserError(f"config key '{key}.role': objective {obj.kind!r} updates role {obj.role!r}, "
                                    f"which is frozen (give roles.{obj.role}.optim)")
        updated = {obj.role for stage in self.stages.values() for obj in stage.objectives.values()}
        for name, spec in self.roles.items():
            if spec.trainable and name not in updated:
                raise UserError(f"config key 'roles.{name}.optim': role {name!r} has an optimizer but no objective "
                                f"updates it (add an objective with role: {name}, or remove its optim)")
        names = list(self.stages)
        for sname in names[:-1]:
            if self.stages[sname].steps is None:
                raise UserError(f"config key 'stages.{sname}.steps': only the last stage may leave steps open (null)")
        if self.stages[names[-1]].steps is not None:
            covered = sum(stage.steps for stage in self.stages.values())
            if covered < self.train.steps:
                raise UserError(f"config key 'train.steps': {self.train.steps} steps, but the stages cover only "
                                f"{covered}; lower train.steps or set stages.{names[-1]}.steps to null")
        if self.train.batch_size % self.train.grad_accum:
            raise UserError(f"config key 'train.batch_size': {self.train.batch_size} is not divisible by "
                            f"train.grad_accum={self.train.grad_accum}")
        return self

    def stage_bounds(self) -> list[tuple[str, int, int]]:
        """``(name, first step, end step)`` of each stage that runs within ``train.steps``."""
        out, start = [], 0
        for name, stage in self.stages.items():
            end = self.train.steps if stage.steps is None else min(start + stage.steps, self.train.steps)
            if start < end:
                out.append((name, start, end))
            start = end
        return out


def _parse_objective(raw: Any, key: str) -> Any:
    """A raw objective mapping → its kind's config instance (errors name ``key``)."""
    if isinstance(raw, ObjectiveConfig) or not isinstance(raw, dict):
        return raw
    kind = raw.get("kind")
    if kind is None:
        raise UserError(f"missing config key '{key}.kind' (the objective's registered name)")
    cls = objective_class(str(kind))
    if cls is None:
        raise UserError(f"config key '{key}.kind': unknown objective {kind!r}; known: {', '.join(sorted(OBJECTIVES))}")
    try:
        return cls.Config.model_validate(raw)
    except ValidationError as err:
        raise UserError(_prefixed(format_validation_error(err, cls.Config), key)) from None
