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

import copy
import re

import torch
from pydantic import Field
from torch import Tensor, nn

from ..config import StrictModel
from ..errors import UserError

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


def adapter_names(module: nn.Module) -> list[str]:
    """Parameter names of the adapters (what a LoRA role trains and checkpoints)."""
    return [name for name, _ in module.named_parameters() if ".lora_" in name]


def adapter_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The adapter entries of a full state dict."""
    return {k: v for k, v in state.items() if ".lora_" in k}


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
