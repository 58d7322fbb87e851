"""The objective contract: what every loss receives and returns (STYLE §3).

An objective is a small callable, EDM's ``training/loss.py`` style::

    class MyLoss(Objective):
        kind = "my_loss"                       # registry name, the ``kind:`` of its config
        Config = MyLossConfig                  # its typed config (subclass of ObjectiveConfig)

        def __call__(self, batch: Batch, roles: Roles, ctx: StepContext) -> ObjectiveOutput:
            x_t = ...                          # read roles["student"].module, roles["teacher"].module, ...
            return self.output({"mse": per_sample_loss}, {"t_mean": t.mean()})

It returns *unreduced* losses — one ``(B,)`` tensor per named term — plus detached metrics, and
says which role the losses update (``config.role``). It never calls ``backward`` or
``optimizer.step()``, never writes to the batch and draws randomness only through ``ctx``. The
engine sums ``weight · losses[term].mean()`` over the terms and objectives of a role, scales for
gradient accumulation, and does backward / clip / step / EMA (:mod:`fewstep.engine.trainer`).

Randomness: ``ctx.randn`` / ``ctx.rand`` / ``ctx.times`` draw *per sample* from a generator
seeded by ``(train.seed, step, sample id, role, name)``. A sample therefore gets the same noise
whatever the micro-batch split, the number of processes or the rank it lands on — which is what
makes "batch 1 × accumulation 4 = batch 4 × accumulation 1" and "2 processes = 1 process" hold
exactly. ``ctx.generator`` is one seeded generator for draws that need no such invariance.

Objectives are registered by ``kind`` (:func:`register_objective`) so that a recipe's stage lists
them in YAML and mixing objectives across papers is a config change (DESIGN §1).

This module sits below the engine (DESIGN §1 layers): it defines the types the engine hands to
objectives (:class:`Batch`, :class:`StepContext`) and never imports the engine.
"""

from __future__ import annotations

import importlib
import pkgutil
import zlib
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, ClassVar, Literal, Mapping, Protocol, Union

import numpy as np
import torch
from pydantic import Discriminator, Field, Tag
from torch import Tensor, nn

from ..config import StrictModel
from ..diffusion.schedules import LogitNormal, TimestepDistribution, Uniform
from ..models.backbones import Conditioning

#: A role's name: any identifier a recipe declares under ``roles:`` (student, teacher, fake_score,
#: lrm, discriminator_spatial, reward_temporal, …); objectives name the roles they use by key.
RoleName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]


# ---------------------------------------------------------------------------------------------
# What objectives receive
# ---------------------------------------------------------------------------------------------

@dataclass
class Batch:
    """One (micro-)batch as objectives see it; every tensor is batched along dim 0."""

    latents: Tensor  # (B, C, T, H, W) clean latents x0, in the codec's normalised space
    cond: Conditioning  # caption tokens (B, L, D) + mask (B, L)
    uncond: Conditioning  # the null caption "" repeated B times (for CFG and caption dropout)
    prompts: list[str]
    sample_ids: Tensor  # (B,) int64 positions in the data stream; seed the per-sample noise
    extra: dict[str, Tensor] = field(default_factory=dict)  # (B, ...) recipe-specific tensors

    def __len__(self) -> int:
        return len(self.prompts)

    def slice(self, start: int, stop: int) -> "Batch":
        """Samples ``start:stop`` (a micro-batch)."""
        s = slice(start, stop)
        return Batch(self.latents[s], self.cond.index(s), self.uncond.index(s), self.prompts[s],
                     self.sample_ids[s], {k: v[s] for k, v in self.extra.items()})

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.latents.to(device), self.cond.to(device=device), self.uncond.to(device=device),
                     list(self.prompts), self.sample_ids, {k: v.to(device) for k, v in self.extra.items()})


class RoleView(Protocol):
    """What an objective may use of a role (the engine's :class:`~fewstep.engine.roles.Role`)."""

    name: str
    module: nn.Module  # the live network (wrapped in place for DDP/FSDP); call it, never step it
    ema_module: nn.Module  # the EMA copy if the role has one, else ``module``
    trainable: bool


Roles = Mapping[str, RoleView]


def _sample_seed(*words: int) -> int:
    """A 63-bit seed hashed from non-negative integers (numpy's SeedSequence)."""
    state = np.random.SeedSequence([int(w) for w in words]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def name_code(name: str) -> int:
    """A stable integer for a string (crc32), used in seeds."""
    return zlib.crc32(name.encode())


@dataclass
class StepContext:
    """Where in training a call happens, and its seeded randomness."""

    step: int  # global engine step being computed (0-based)
    stage: int  # index of the current stage
    stage_step: int  # step within the stage (0-based)
    role: str  # the role being updated by this call
    seed: int  # train.seed
    device: torch.device
    sample_ids: Tensor  # (B,) of the current micro-batch
    generator: torch.Generator  # seeded from (seed, step, rank, role, micro-batch); not split-invariant
    rank: int = 0
    world_size: int = 1
    student: Any = None  # the run's StudentGenerator (objectives/student.py; the engine sets it from `generator:`)

    def with_batch(self, sample_ids: Tensor, micro: int) -> "StepContext":
        """The context of micro-batch ``micro`` holding ``sample_ids`` (a fresh seeded generator)."""
        gen_device = self.device if self.device.type == "cuda" else "cpu"
        gen = torch.Generator(device=gen_device).manual_seed(
            _sample_seed(self.seed, self.step, self.rank, name_code(self.role), micro))
        return replace(self, sample_ids=sample_ids, generator=gen)

    # -- per-sample draws (identical for a sample whatever the batching) -----------------------
    def sample_generators(self, name: str) -> list[torch.Generator]:
        """One generator per sample, seeded by ``(seed, step, sample id, role, name)``."""
        gen_device = self.device if self.device.type == "cuda" else "cpu"
        role, key = name_code(self.role), name_code(name)
        return [torch.Generator(device=gen_device).manual_seed(_sample_seed(self.seed, self.step, int(i), role, key))
                for i in self.sample_ids.tolist()]

    def randn(self, shape: tuple[int, ...], name: str, dtype: torch.dtype = torch.float32) -> Tensor:
        """Standard normal ``(B, *shape)``; ``name`` keeps independent draws apart ("noise", "z", …)."""
        gens = self.sample_generators(name)
        rows = [torch.randn(shape, generator=g, dtype=dtype, device=g.device) for g in gens]
        return torch.stack(rows).to(self.device)

    def rand(self, name: str, dtype: torch.dtype = torch.float64) -> Tensor:
        """Uniform ``(B,)`` in [0, 1)."""
        gens = self.sample_generators(name)
        return torch.cat([torch.rand(1, generator=g, dtype=dtype, device=g.device) for g in gens]).to(self.device)

    def times(self, distribution: TimestepDistribution, name: str = "t") -> Tensor:
        """Training times ``(B,)`` float64 drawn per sample from ``distribution``."""
        gens = self.sample_generators(name)
        return torch.cat([distribution.sample(1, generator=g, device=g.device) for g in gens]).to(self.device)


# ---------------------------------------------------------------------------------------------
# What objectives return, and their configs
# ---------------------------------------------------------------------------------------------

@dataclass
class ObjectiveOutput:
    """Unreduced losses ``{term: (B,)}`` that update ``role``, and detached metrics."""

    losses: dict[str, Tensor]
    metrics: dict[str, float | Tensor] = field(default_factory=dict)
    role: str = "student"


class ObjectiveConfig(StrictModel):
    """Keys every objective has; a subclass adds its own (``kind`` is its registry name)."""

    kind: str
    role: RoleName = Field("student", description="the role whose parameters these losses update")
    weight: float = Field(1.0, description="multiplies every loss term of this objective")

    def reads(self) -> set[str]:
        """Roles this objective needs besides the one it updates (e.g. a frozen teacher)."""
        return set()

    #: whether the kind draws samples ``G(ε)`` of the run's generator (``generator:``; refused when null)
    SAMPLES_STUDENT: ClassVar[bool] = False

    def samples_student(self) -> bool:
        """Whether this objective draws samples of the run's generator (:attr:`SAMPLES_STUDENT`)."""
        return self.SAMPLES_STUDENT

    def needs(self) -> set[str]:
        """What its batches must carry beyond latents and captions, from the data source (e.g.
        ``trajectory``: stored teacher paths); checked against the recipe's ``data:`` before a run."""
        return set()

    def check_generator(self, generator, key: str) -> None:
        """Refuse a ``generator:`` block (:class:`~fewstep.objectives.student.GeneratorConfig`) this
        objective cannot train (one-line :class:`UserError` naming ``key``)."""


class LogitNormalTimes(StrictModel):
    """t = sigmoid(mean + std·z), z ~ N(0, 1) (Esser et al. 2024)."""

    kind: Literal["logit_normal"] = "logit_normal"
    mean: float = 0.0
    std: float = Field(1.0, gt=0)

    def build(self) -> TimestepDistribution:
        return LogitNormal(self.mean, self.std)


class UniformTimes(StrictModel):
    """t ~ U[a, b]."""

    kind: Literal["uniform"] = "uniform"
    a: float = Field(0.0, ge=0, le=1)
    b: float = Field(1.0, ge=0, le=1)

    def build(self) -> TimestepDistribution:
        return Uniform(self.a, self.b)


def _times_kind(value: Any) -> str:
    return value.get("kind", "logit_normal") if isinstance(value, dict) else getattr(value, "kind", "logit_normal")


#: A training-time distribution in a config: ``{kind: logit_normal, mean, std}`` or ``{kind: uniform, a, b}``.
TimestepsConfig = Annotated[
    Union[Annotated[LogitNormalTimes, Tag("logit_normal")], Annotated[UniformTimes, Tag("uniform")]],
    Discriminator(_times_kind),
]


class Objective:
    """Base class: holds the validated config; subclasses implement ``__call__``."""

    kind: ClassVar[str]
    Config: ClassVar[type[ObjectiveConfig]]

    def __init__(self, config: ObjectiveConfig, name: str):
        self.config = config
        self.name = name  # the key under the stage's ``objectives:``; names the logged losses
        timesteps = getattr(config, "timesteps", None)  # a config's training-time distribution of t
        self.distribution: TimestepDistribution | None = timesteps.build() if timesteps is not None else None

    @property
    def role(self) -> str:
        return self.config.role

    @property
    def weight(self) -> float:
        return self.config.weight

    def output(self, losses: dict[str, Tensor], metrics: dict[str, float | Tensor] | None = None) -> ObjectiveOutput:
        return ObjectiveOutput(losses=losses, metrics=metrics or {}, role=self.role)

    def __call__(self, batch: Batch, roles: Roles, ctx: StepContext) -> ObjectiveOutput:  # pragma: no cover
        raise NotImplementedError

    # Optional persistent state (e.g. a latent queue): tensors only, saved with checkpoints.
    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make ``cls`` available as ``kind: cls.kind`` in recipe configs."""
    assert cls.kind not in OBJECTIVES or OBJECTIVES[cls.kind] is cls, f"objective {cls.kind!r} registered twice"
    assert cls.Config.model_fields["kind"].default == cls.kind, f"{cls.__name__}.Config.kind must default to {cls.kind!r}"
    OBJECTIVES[cls.kind] = cls
    return cls


def objective_class(kind: str) -> type[Objective] | None:
    """The objective registered as ``kind``; imports every ``fewstep.objectives`` module on a miss."""
    if kind not in OBJECTIVES:
        from .. import objectives as package

        for info in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package.__name__}.{info.name}")
    return OBJECTIVES.get(kind)


def build_objective(name: str, config: ObjectiveConfig) -> Objective:
    return OBJECTIVES[config.kind](config, name)
