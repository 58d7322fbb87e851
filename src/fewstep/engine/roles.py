"""Roles: the networks a recipe trains or consults, each with its optimizer, cadence and EMA.

A recipe's config declares its roles under ``roles:`` (DESIGN §1)::

    roles:
      student:    {optim: {lr: 1.0e-5, grad_clip: 1.0, warmup_steps: 100}, every: 5, ema: 0.999}
      fake_score: {optim: {lr: 1.0e-5}}          # every: 1 (default) — 5 updates per student update
      teacher:    {}                             # no optim → frozen

Any identifier is a role name (``lrm``, ``discriminator_spatial``, …); ``teacher`` and
``reference`` are always frozen. ``every: k`` updates the role on the steps ``s`` of a stage with
``(s + 1) % k == 0`` (steps k−1, 2k−1, …: a role with ``every: 5`` first steps together with the
fifth step of the every-step roles, as in DMD2's 5 critic updates per generator update); a stage
may override a role's cadence. ``ema: d`` keeps an EMA copy with decay ``d``.

At run time each declared role becomes a :class:`Role`: the module the recipe built for it
(wrapped in place for DDP/FSDP by :mod:`fewstep.engine.distributed`), a fused AdamW optimizer
if it is trainable, its EMA, and the number of optimizer updates it has taken (which drives the
linear LR warm-up: update ``n`` (0-based) uses ``lr · min(1, (n + 1) / warmup_steps)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import Field
from torch import nn

from ..config import StrictModel
from ..errors import UserError
from .ema import EMA

FROZEN_ROLES = ("teacher", "reference")


class OptimConfig(StrictModel):
    """AdamW settings of one role."""

    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0, description="max global grad norm; null = no clipping")
    warmup_steps: int = Field(0, ge=0, description="linear LR warm-up over this many updates of the role")


class RoleSpec(StrictModel):
    """One declared role: optimizer (none = frozen), update cadence, EMA decay."""

    build: dict[str, Any] | None = Field(None, description=(
        "{kind: …, …}: built by a registered role builder (recipes/builders.py); null = a copy of the model"))
    optim: OptimConfig | None = Field(None, description="null = frozen")
    every: int = Field(1, ge=1, description="update on every k-th step of a stage")
    ema: float | None = Field(None, gt=0, lt=1, description="EMA decay; null = no EMA")

    @property
    def trainable(self) -> bool:
        return self.optim is not None


def warmup_factor(updates: int, warmup_steps: int) -> float:
    """LR multiplier of the role's update number ``updates`` (0-based)."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (updates + 1) / warmup_steps)


@dataclass
class Role:
    """A declared role at run time."""

    name: str
    spec: RoleSpec
    module: nn.Module  # live network; objectives call it
    optimizer: torch.optim.Optimizer | None = None
    ema: EMA | None = None
    updates: int = 0  # optimizer steps taken
    params: list[nn.Parameter] = field(default_factory=list)  # trainable parameters
    dp_root: nn.Module | None = None  # the submodule wrapped for DDP/FSDP (None in one process)

    @property
    def trainable(self) -> bool:
        return self.optimizer is not None

    @property
    def ema_module(self) -> nn.Module:
        """The EMA copy if this role has one, else the live module."""
        return self.ema.module if self.ema is not None else self.module

    def set_lr(self) -> float:
        """Apply the warm-up for the next update; returns the LR used."""
        optim = self.spec.optim
        lr = optim.lr * warmup_factor(self.updates, optim.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr


class Roles(dict):
    """``name → Role``; a missing role is an error that lists the declared ones."""

    def __missing__(self, name: str) -> Role:
        raise KeyError(f"role {name!r} is not declared (declared: {', '.join(self) or 'none'})")

    def trainable(self) -> list[Role]:
        return [r for r in self.values() if r.trainable]


def make_optimizer(params: list[nn.Parameter], optim: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                             weight_decay=optim.weight_decay, fused=True)


def enable_gradient_checkpointing(module: nn.Module) -> int:
    """Turn on activation checkpointing wherever a submodule supports it; returns how many did."""
    count = 0
    for m in module.modules():
        if hasattr(m, "enable_gradient_checkpointing"):  # diffusers models
            m.enable_gradient_checkpointing()
            count += 1
        elif hasattr(m, "gradient_checkpointing"):  # fewstep's own backbones and similar
            m.gradient_checkpointing = True
            count += 1
    return count


def build_roles(modules: dict[str, nn.Module], specs: dict[str, RoleSpec], env, gradient_checkpointing: bool) -> Roles:
    """Turn the recipe's modules into roles: device, train/eval mode, EMA copy, DDP/FSDP, optimizer.

    The EMA copy is taken before wrapping (and then wrapped like a frozen role), and the optimizer
    is built after wrapping, over the (possibly sharded) parameters.
    """
    from .distributed import wrap

    missing = [n for n in specs if n not in modules]
    if missing:
        raise UserError(f"config key 'roles.{missing[0]}': this recipe does not build a {missing[0]!r} role "
                        f"(it builds {', '.join(modules) or 'none'})")
    roles = Roles()
    for name, spec in specs.items():
        module = modules[name].to(env.device)
        if spec.trainable:
            module.train()  # which parameters train is the recipe's choice (e.g. LoRA adapters only)
            if gradient_checkpointing:
                enable_gradient_checkpointing(module)
        else:
            module.eval().requires_grad_(False)
        ema = EMA(module, spec.ema) if spec.ema is not None else None
        root = wrap(module, env, trainable=spec.trainable)
        if ema is not None:
            wrap(ema.module, env, trainable=False)
        role = Role(name, spec, module, ema=ema, dp_root=root)
        if spec.trainable:
            role.params = [p for p in module.parameters() if p.requires_grad]
            role.optimizer = make_optimizer(role.params, spec.optim)
        roles[name] = role
    return roles
