"""Exponential moving average of a module's weights.

``EMA(module, decay)`` keeps a frozen copy of ``module``'s trainable weights (its frozen parameters
are shared with ``module``, not copied) (made *before* the live module is
wrapped for DDP/FSDP) and after every optimizer step moves it towards the live weights::

    θ_ema ← decay · θ_ema + (1 − decay) · θ          (torch._foreach_lerp_, one fused call)

The copy is itself a module, so objectives can *run* it (``roles["student"].ema_module`` — the
EMA target of consistency models) and evaluation samples from it. Under FSDP2 the copy is
sharded like the live module and the lerp runs shard by shard; under DDP it is a plain replica,
updated identically on every rank from the synchronised live weights.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, module: nn.Module, decay: float):
        assert 0.0 < decay < 1.0, decay
        self.decay = decay
        # frozen tensors never move, so the copy shares them (a LoRA role's EMA costs its adapters only)
        memo = {id(p): p for p in module.parameters() if not p.requires_grad}
        self.module = copy.deepcopy(module, memo).eval().requires_grad_(False)
        self._pairs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    def pairs(self, live: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Matching (EMA, live) trainable-parameter lists, looked up once (after any wrapping)."""
        if self._pairs is None:
            ema = dict(self.module.named_parameters())
            named = [(n, p) for n, p in live.named_parameters() if p.requires_grad]
            self._pairs = [ema[n] for n, _ in named], [p for _, p in named]
        return self._pairs

    @torch.no_grad()
    def update(self, live: nn.Module) -> None:
        """One EMA step towards ``live``; buffers are copied, not averaged."""
        ema, params = self.pairs(live)
        if ema:
            torch._foreach_lerp_(ema, params, 1.0 - self.decay)
        for b_ema, b in zip(self.module.buffers(), live.buffers()):
            b_ema.copy_(b)
