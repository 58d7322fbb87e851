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

``lora: {rank: r, alpha: α}`` trains low-rank adapters on the role's frozen base instead of the
base itself (:mod:`fewstep.engine.lora`; the recipe gives the role a base that shares its weights).

At run time each declared role becomes a :class:`Role`: the module the recipe built for it
(wrapped in place for DDP/FSDP by :mod:`fewstep.engine.distributed`), a fused AdamW optimizer
if it is trainable, its EMA, and the number of optimizer updates it has taken (which drives the
linear LR warm-up: update ``n`` (0-based) uses ``lr · min(1, (n + 1) / warmup_steps)``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import nn

from ..config import StrictModel
from ..errors import UserError
from ..utils.checkpointing import diffusers_checkpoint
from ..models.denoiser import Denoiser
from .ema import EMA
from .lora import (ADAPTER, AdapterDenoiser, AdapterEMA, AdapterHub, LoraConfig, adapter_names, adapter_state, add_lora,
                   rename_adapter, rename_optimizer_adapter)

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
    lora: LoraConfig | None = Field(None, description=(
        "{rank, alpha, targets}: train LoRA adapters on a frozen base shared with the other roles (engine/lora.py); "
        "null = every parameter the recipe leaves trainable"))

    @model_validator(mode="after")
    def _lora_trains(self):
        if self.lora is not None and self.optim is None:
            raise ValueError("lora needs optim: a frozen role has no adapters to train")
        return self

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
    def adapters_only(self) -> bool:
        """A LoRA role: its optimiser, EMA and checkpoints cover the adapters only."""
        return self.spec.lora is not None

    @property
    def ema_module(self) -> nn.Module:
        """The EMA copy if this role has one, else the live module."""
        return self.ema.module if self.ema is not None else self.module

    def hub_adapter(self, ema: bool = False) -> str | None:
        """The adapter name of this role (or its EMA) in a shared FSDP base (engine/lora.AdapterHub), else None."""
        module = self.ema.module if ema else self.module
        return module.adapter if isinstance(module, AdapterDenoiser) else None

    def weights(self, ema: bool = False) -> dict[str, torch.Tensor]:
        """The live (or EMA) full state dict on rank 0 — adapters only for a LoRA role (collective). A role of a
        shared base gives its own adapter's entries, named as a role of its own would (``default``)."""
        from .distributed import full_model_state

        state = full_model_state(self.ema.module if ema else self.module)
        if (adapter := self.hub_adapter(ema)) is not None:
            return rename_adapter(adapter_state(state, adapter), adapter, ADAPTER)
        return adapter_state(state) if self.adapters_only else state

    def load_weights(self, state: dict[str, torch.Tensor], env, ema: bool = False) -> None:
        """Load what :meth:`weights` gave (every rank passes the whole dict); a LoRA role's base stays."""
        from .distributed import load_model_state

        module = self.ema.module if ema else self.module
        if (adapter := self.hub_adapter(ema)) is not None:
            state = rename_adapter(state, ADAPTER, adapter)
        if self.adapters_only:
            want = set(adapter_names(module, adapter))
            if set(state) != want:
                missing = sorted(want - set(state)) or sorted(set(state) - want)
                raise KeyError(f"role {self.name!r} adapters differ from the checkpoint's (e.g. {missing[0]})")
        load_model_state(module, state, env, strict=not self.adapters_only)

    def optimizer_state(self) -> dict:
        """The optimiser's full state on rank 0 (collective), parameters named as by :meth:`weights`."""
        from .distributed import full_optimizer_state

        state = full_optimizer_state(self.module, self.optimizer)
        adapter = self.hub_adapter()
        return rename_optimizer_adapter(state, adapter, ADAPTER) if adapter is not None else state

    def load_optimizer_state(self, state: dict) -> None:
        from .distributed import load_optimizer_state

        if (adapter := self.hub_adapter()) is not None:
            state = rename_optimizer_adapter(state, ADAPTER, adapter)
        load_optimizer_state(self.module, self.optimizer, state)

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
            m.enable_gradient_checkpointing(gradient_checkpointing_func=diffusers_checkpoint)
            count += 1
        elif hasattr(m, "gradient_checkpointing"):  # fewstep's own backbones and similar
            m.gradient_checkpointing = True
            count += 1
    return count


def shared_bases(modules: dict[str, nn.Module], specs: dict[str, RoleSpec], env) -> dict[str, nn.Module]:
    """Under FSDP2, the modules of the roles that share the model's tensors (the recipe's frozen and LoRA roles):
    where a LoRA role is among them they become views of one :class:`~fewstep.engine.lora.AdapterHub`, so that
    the base is sharded once (adapters injected in role order, as :func:`add_lora` would); otherwise each gets a
    copy of its own. ``name → module``; ``{}`` elsewhere (roles keep their modules). Either way the sharded
    module owns its tensors, so sharding frees them whatever else held the model's."""
    if not (env.distributed and env.mode == "fsdp"):
        return {}
    groups: dict[int, list[str]] = {}
    for name, module in modules.items():
        first = next(iter(module.parameters()), None)
        if isinstance(module, Denoiser) and first is not None and (specs[name].lora is not None
                                                                   or not specs[name].trainable):
            groups.setdefault(id(first), []).append(name)
    replaced: dict[str, nn.Module] = {}
    for names in groups.values():
        if not any(specs[n].lora is not None for n in names):
            replaced.update({n: copy.deepcopy(modules[n]) for n in names})
            continue
        hub = AdapterHub(copy.deepcopy(modules[names[0]]).to(env.device))
        for name in names:
            if specs[name].lora is not None:
                hub.add(name, specs[name].lora)
            replaced[name] = hub.view(name if specs[name].lora is not None else None)
    return replaced


def build_roles(modules: dict[str, nn.Module], specs: dict[str, RoleSpec], env, gradient_checkpointing: bool) -> Roles:
    """Turn the recipe's modules into roles: device, train/eval mode, EMA copy, DDP/FSDP, optimizer.

    The EMA copy is taken before wrapping (and then wrapped like a frozen role), and the optimizer
    is built after wrapping, over the (possibly sharded) parameters. Under FSDP2, roles sharing one base
    are views of one module (:func:`shared_bases`), wrapped once.
    """
    from .distributed import compute_root, wrap

    missing = [n for n in specs if n not in modules]
    if missing:
        raise UserError(f"config key 'roles.{missing[0]}': this recipe does not build a {missing[0]!r} role "
                        f"(it builds {', '.join(modules) or 'none'})")
    modules = {**modules, **shared_bases(modules, specs, env)}
    wrapped: dict[int, nn.Module | None] = {}

    def wrap_once(module: nn.Module, trainable: bool) -> nn.Module | None:
        key = id(compute_root(module))
        if key not in wrapped:
            wrapped[key] = wrap(module, env, trainable=trainable)
        return wrapped[key]

    roles = Roles()
    for name, spec in specs.items():
        view = modules[name] if isinstance(modules[name], AdapterDenoiser) else None
        module = modules[name].to(env.device)
        if spec.lora is not None and view is None:
            add_lora(module, spec.lora)
        if spec.trainable:
            module.train()  # which parameters train is the recipe's choice (e.g. LoRA adapters only)
            if gradient_checkpointing:
                enable_gradient_checkpointing(module)
        elif view is not None:
            module.eval()  # the view's mode; the shared base's parameters stay as the hub set them
        else:
            module.eval().requires_grad_(False)
        if spec.ema is None:
            ema = None
        elif view is not None:
            ema = AdapterEMA(view.hub, name, spec.ema)
        else:
            ema = EMA(module, spec.ema)
        root = wrap_once(module, spec.trainable)
        if ema is not None:
            wrap_once(ema.module, False)
        role = Role(name, spec, module, ema=ema, dp_root=root)
        if spec.trainable:
            role.params = (module.trainable_parameters() if view is not None
                           else [p for p in module.parameters() if p.requires_grad])
            role.optimizer = make_optimizer(role.params, spec.optim)
        roles[name] = role
    return roles
