"""LoRA roles: low-rank adapters (peft) on a frozen base that the role shares with the other roles.

A role that says ``lora: {rank: r, alpha: α}`` trains only adapters: every targeted linear layer
``y = W x`` becomes (Hu et al. 2021, peft's ``LoraLayer``)::

    y = W x + (α / r) · B A x          A ∈ R^{r×d_in} (Kaiming-uniform), B ∈ R^{d_out×r} (zeros)

so the role starts exactly at its base. ``W`` is *shared*: the role's module is a
:func:`shared_copy` of the model's denoiser (new module objects, the same parameter tensors), so a
teacher, a LoRA fake score and a LoRA student cost one copy of the base weights plus adapters —
what makes a 14B teacher fit. The optimiser, the EMA (:class:`~fewstep.engine.ema.EMA` shares
frozen tensors too) and checkpoints see only the adapters (:func:`adapter_state`).

The exported student has the adapters merged, ``W' = W + (α / r) · B A`` (:func:`merge_adapters`);
:func:`diffusers_lora_layers` writes the same update in the key format diffusers'
``load_lora_weights`` reads, with ``B`` pre-scaled by α / r so that any loader's scale (α = r) gives
the same weights.

``targets: null`` adapts every ``nn.Linear`` inside the backbone's repeated blocks (attention
projections and MLPs of a DiT; not the time/text embeddings nor the output head, which LoRA
recipes for video DiTs leave alone); a list names module-name suffixes (``[to_q, to_k, to_v]``).
"""

from __future__ import annotations

import contextlib
import copy
import re
import warnings
from contextlib import contextmanager

import torch
from pydantic import Field
from torch import Tensor, nn

from ..config import StrictModel
from ..errors import UserError
from ..models.denoiser import Denoiser
from .ema import EMA

ADAPTER = "default"  # peft's adapter name; it appears in the parameter names (…lora_A.default.weight)
_LORA_KEY = re.compile(rf"^(?P<layer>.+)\.lora_(?P<ab>[AB])\.{ADAPTER}\.weight$")


class LoraConfig(StrictModel):
    """``roles.<name>.lora``: adapters on the role's linear layers (module doc)."""

    rank: int = Field(16, ge=1, description="r: the adapters' rank")
    alpha: float = Field(16.0, gt=0, description="α: the update is scaled by α / r")
    targets: list[str] | None = Field(None, min_length=1, description=(
        "module-name suffixes to adapt (e.g. [to_q, to_k, to_v, to_out.0]); null: every Linear in the "
        "backbone's repeated blocks"))
    dropout: float = Field(0.0, ge=0, lt=1)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def shared_copy(module: nn.Module) -> nn.Module:
    """A deep copy whose parameters and buffers *are* ``module``'s (the same tensor objects): the module
    tree is new (so adapters can be injected or the copy wrapped), the weights cost nothing."""
    memo = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo)


def block_linears(module: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` layers inside an ``nn.ModuleList`` (a DiT's repeated blocks) — not those
    of an ``nn.Sequential`` (an embedder's ``t_embedder.0``) elsewhere."""
    names = []
    for list_name, blocks in module.named_modules():
        if type(blocks) is nn.ModuleList:
            prefix = f"{list_name}." if list_name else ""
            names += [f"{prefix}{name}" for name, m in blocks.named_modules() if isinstance(m, nn.Linear)]
    return list(dict.fromkeys(names))


def add_lora(module: nn.Module, config: LoraConfig) -> nn.Module:
    """Freeze ``module`` and inject trainable adapters (in place; returns it). Adapter A is drawn from
    the global torch RNG (seeded by the run), B is zero: the output is unchanged."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    module.requires_grad_(False)
    targets = config.targets or block_linears(module)
    if not targets:
        raise UserError("config key 'lora.targets': the role has no Linear layer inside repeated blocks; name the "
                        "layers to adapt")
    peft_config = PeftLoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                 target_modules=targets)
    try:
        inject_adapter_in_model(peft_config, module, adapter_name=ADAPTER)
    except ValueError as err:
        raise UserError(f"config key 'lora.targets': {str(err).splitlines()[0]}") from None
    for name, p in module.named_parameters():
        if ".lora_" in name:
            p.data = p.data.float()  # adapters train in float32 on a bf16 base too
        p.requires_grad_(".lora_" in name)
    return module


def adapter_names(module: nn.Module, adapter: str | None = None) -> list[str]:
    """Parameter names of the adapters (what a LoRA role trains and checkpoints); of adapter ``adapter`` only,
    when given (a role's view of a shared base)."""
    return list(adapter_state(dict(module.named_parameters()), adapter))


def adapter_state(state: dict[str, Tensor], adapter: str | None = None) -> dict[str, Tensor]:
    """The adapter entries of a full state dict (of adapter ``adapter`` only, when given)."""
    marks = (".lora_",) if adapter is None else (f".lora_A.{adapter}.", f".lora_B.{adapter}.")
    return {k: v for k, v in state.items() if any(m in k for m in marks)}


def merge_adapters(base: dict[str, Tensor], adapters: dict[str, Tensor], scale: float) -> dict[str, Tensor]:
    """``W' = W + scale · B A`` for every adapted layer of a plain (un-injected) state dict ``base``.

    ``adapters`` holds ``<layer>.lora_A.default.weight`` / ``lora_B`` of the injected module; the
    plain model's weight is ``<layer>.weight`` (peft keeps the original as ``<layer>.base_layer``).
    """
    merged = dict(base)
    for layer, (a, b) in _pairs(adapters).items():
        key = f"{layer}.weight"
        if key not in merged:
            raise KeyError(f"adapter for {layer!r} has no base weight {key!r}")
        w = merged[key]
        merged[key] = (w.float() + scale * (b.float() @ a.float()).to(w.device)).to(w.dtype)
    return merged


def diffusers_lora_layers(adapters: dict[str, Tensor], prefix: str, scale: float) -> dict[str, Tensor]:
    """Adapters in diffusers' peft LoRA format for one component: keys relative to the component
    (``prefix`` stripped), no adapter name (``….lora_A.weight``), ``B`` pre-scaled by ``scale`` so the
    loader's α = r reproduces the merged weights."""
    out = {}
    for layer, (a, b) in _pairs(adapters).items():
        if not layer.startswith(prefix):
            raise KeyError(f"adapter {layer!r} is not under {prefix!r}")
        name = layer[len(prefix):]
        out[f"{name}.lora_A.weight"] = a.contiguous()
        out[f"{name}.lora_B.weight"] = (b.float() * scale).to(b.dtype).contiguous()
    return out


def _pairs(adapters: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """``layer → (A, B)``; the layer name without peft's ``.base_layer`` wrapping."""
    found: dict[str, dict[str, Tensor]] = {}
    for key, value in adapters.items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise KeyError(f"not a LoRA adapter key: {key!r}")
        found.setdefault(match["layer"], {})[match["ab"]] = value
    pairs = {}
    for layer, ab in found.items():
        if set(ab) != {"A", "B"}:
            raise KeyError(f"adapter {layer!r} lacks lora_{'B' if 'A' in ab else 'A'}")
        pairs[layer] = (ab["A"], ab["B"])
    return pairs


# ---------------------------------------------------------------------------------------------
# One base for several LoRA roles under FSDP2
# ---------------------------------------------------------------------------------------------

def rename_adapter(state: dict, old: str, new: str) -> dict:
    """Keys ``….lora_A.<old>.…`` → ``….lora_A.<new>.…`` (and ``lora_B``); other keys unchanged."""
    pattern = re.compile(rf"\.lora_(?P<ab>[AB])\.{re.escape(old)}\.")
    return {pattern.sub(lambda m: f".lora_{m['ab']}.{new}.", k): v for k, v in state.items()}


def rename_optimizer_adapter(state: dict, old: str, new: str) -> dict:
    """:func:`rename_adapter` on a full optimizer state (``{"state": {fqn: …}, "param_groups": [{"params": [fqn]}]}``)."""
    pattern = re.compile(rf"\.lora_(?P<ab>[AB])\.{re.escape(old)}\.")

    def fix(name):
        return pattern.sub(lambda m: f".lora_{m['ab']}.{new}.", name) if isinstance(name, str) else name

    if not state:
        return state
    return {"state": {fix(k): v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [fix(p) for p in g["params"]]} for g in state["param_groups"]]}


class AdapterHub:
    """One frozen base with one named adapter per LoRA role, switched per call.

    Under FSDP2 the sharding replaces a module's parameters, so roles that merely share tensors
    (:func:`shared_copy`) would each shard a copy of the base. The hub keeps *one* module — the base
    with every role's adapter injected under the role's name (peft's multi-adapter layers) — and
    gives each role an :class:`AdapterDenoiser` view that activates its own adapter (or none: the
    frozen teacher) for the duration of each call. FSDP2 shards the one module; the teacher, a LoRA
    student, its EMA (an adapter of its own, ``<role>_ema``) and a LoRA fake score then cost one
    sharded base plus adapters.

    The active adapter and the train/eval mode are module state read *during* a forward, and
    activation checkpointing runs a block's forward again in the backward pass, when another role may
    be active; the hub registers its state with :mod:`fewstep.utils.checkpointing`, whose
    ``checkpoint`` recomputes under the state of the original forward.
    """

    def __init__(self, base: nn.Module):
        from ..utils.checkpointing import register_state

        self.base = base.requires_grad_(False)
        self.default_targets = block_linears(base)  # before any injection adds Linear layers of its own
        self.adapters: dict[str, LoraConfig] = {}
        self.state: tuple[str | None, bool] = (None, False)  # (active adapter, training)
        self._layers: list[nn.Module] = []
        register_state(self.capture)

    def add(self, name: str, config: LoraConfig, *, like: str | None = None) -> None:
        """Inject adapter ``name`` (A from the global torch RNG as :func:`add_lora` draws it; B = 0). ``like``: start
        as a copy of that adapter instead, leaving the RNG untouched (an EMA adapter)."""
        from peft import LoraConfig as PeftLoraConfig
        from peft import inject_adapter_in_model
        from peft.tuners.tuners_utils import BaseTunerLayer

        targets = config.targets or self.default_targets
        if not targets:
            raise UserError("config key 'lora.targets': the role has no Linear layer inside repeated blocks; name "
                            "the layers to adapt")
        peft_config = PeftLoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                     target_modules=targets)
        trainable = {n: p.requires_grad for n, p in self.base.named_parameters()}
        try:
            with warnings.catch_warnings(), (torch.random.fork_rng(devices=[]) if like else contextlib.nullcontext()):
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # several adapters: meant
                inject_adapter_in_model(peft_config, self.base, adapter_name=name)
        except ValueError as err:
            raise UserError(f"config key 'lora.targets': {str(err).splitlines()[0]}") from None
        self.adapters[name] = config
        self._layers = [m for m in self.base.modules() if isinstance(m, BaseTunerLayer)]
        mine = dict(self.named_parameters(name))
        for n, p in self.base.named_parameters():  # peft re-marks requires_grad on injection: restore
            p.requires_grad_(trainable.get(n, False) or (n in mine and like is None))
        for p in mine.values():
            p.data = p.data.float()  # adapters train in float32 on a bf16 base too
        if like is not None:
            source = dict(self.named_parameters(like))
            with torch.no_grad():
                for n, p in mine.items():
                    p.copy_(source[swap_adapter(n, name, like)])
        self._apply(self.state)

    def named_parameters(self, name: str) -> list[tuple[str, nn.Parameter]]:
        """The parameters of adapter ``name``, by their names in the base."""
        return list(adapter_state(dict(self.base.named_parameters()), name).items())

    def _apply(self, state: tuple[str | None, bool]) -> None:
        adapter, training = state
        for layer in self._layers:  # peft's own set_adapter would also flip requires_grad: set the fields
            layer._disable_adapters = adapter is None
            if adapter is not None:
                layer._active_adapter = [adapter]
        if self.base.training != training:
            self.base.train(training)

    @contextmanager
    def using(self, adapter: str | None, training: bool):
        """Run the base as the role with ``adapter`` (None: the base alone) in train/eval mode ``training``."""
        previous, self.state = self.state, (adapter, training)
        self._apply(self.state)
        try:
            yield
        finally:
            self.state = previous
            self._apply(previous)

    def capture(self):
        """A context restoring the current state (for a checkpointed block's recomputation)."""
        return self.using(*self.state)

    def view(self, adapter: str | None) -> "AdapterDenoiser":
        return AdapterDenoiser(self, adapter)


def swap_adapter(name: str, old: str, new: str) -> str:
    """One parameter name with adapter ``old`` read as ``new``."""
    return next(iter(rename_adapter({name: None}, old, new)))


class AdapterDenoiser(Denoiser):
    """A role's view of an :class:`AdapterHub`: the hub's denoiser with the role's adapter active (module doc).

    Its ``backbone`` *is* the hub's (one module, one FSDP2 sharding); ``train()``/``eval()`` set the
    view's own mode, applied to the shared base per call."""

    def __init__(self, hub: AdapterHub, adapter: str | None):
        super().__init__(hub.base.backbone, hub.base.schedule, hub.base.prediction_type)
        self.hub, self.adapter = hub, adapter

    def train(self, mode: bool = True) -> "AdapterDenoiser":
        self.training = mode  # the view's mode only; the shared base takes it per call
        return self

    def _as_role(self):
        return self.hub.using(self.adapter, self.training)

    def forward(self, *args, **kwargs):
        with self._as_role():
            return super().forward(*args, **kwargs)

    def predict(self, *args, **kwargs):
        with self._as_role():
            return super().predict(*args, **kwargs)

    def jvp(self, *args, **kwargs):
        with self._as_role():
            return super().jvp(*args, **kwargs)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The view's own adapter's parameters (what its role's optimiser steps)."""
        return [p for _, p in self.hub.named_parameters(self.adapter)] if self.adapter else []


class AdapterEMA(EMA):
    """The EMA of a hub role: adapter ``<role>_ema`` of the same hub, lerped towards the role's adapter
    (:class:`~fewstep.engine.ema.EMA` with the pairs of the two adapters; the buffers are the hub's own)."""

    def __init__(self, hub: AdapterHub, live: str, decay: float):
        assert 0.0 < decay < 1.0, decay
        self.decay, self.live = decay, live
        name = f"{live}_ema"
        hub.add(name, hub.adapters[live], like=live)
        self.module = hub.view(name).eval()
        self._pairs = None

    def pairs(self, live: nn.Module) -> tuple[list, list]:
        if self._pairs is None:
            source = dict(self.module.hub.named_parameters(self.live))
            ema = self.module.hub.named_parameters(self.module.adapter)
            self._pairs = ([p for _, p in ema], [source[swap_adapter(n, self.module.adapter, self.live)]
                                                 for n, _ in ema])
        return self._pairs
