"""Hidden features of a backbone's transformer blocks: one API for every model family.

Discriminators that read a frozen network's features (AccVideo Eq. 8 and Fig. 6, RGTD §3.3) call
:func:`extract_features`; it works on a :class:`~fewstep.models.denoiser.Denoiser` (continuous time
``t``) or a bare :class:`~fewstep.models.backbones.Backbone` (its model timestep), whatever the
network inside. The network runs as usual and forward hooks on its blocks catch their outputs, so
no adapter needs a feature method of its own: any backbone exposing its blocks as a ``ModuleList``
named ``blocks`` (the toy DiT, Wan) or ``transformer_blocks`` (CogVideoX, HunyuanVideo's
double-stream blocks) works. Tokens ``(B, N, D)`` are laid out on the ``(T', H', W')`` grid that
the backbone's ``patch_size`` implies by :func:`token_grid`. Behind a router of experts (Wan 2.2,
:mod:`fewstep.models.experts`) block ``i`` is block ``i`` of the expert each sample goes to.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from ..errors import UserError
from .backbones import Conditioning

BLOCK_LISTS = ("blocks", "transformer_blocks")


def find_blocks(module: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """``(owner, blocks)``: the first ``ModuleList`` named in :data:`BLOCK_LISTS` below ``module``."""
    for owner in module.modules():
        for name in BLOCK_LISTS:
            blocks = getattr(owner, name, None)
            if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
                return owner, blocks
    raise UserError(f"{type(module).__name__} exposes no transformer blocks (a ModuleList named "
                    f"{' or '.join(BLOCK_LISTS)}) to take discriminator features from")


def depth(module: nn.Module) -> int:
    """How many transformer blocks ``module`` has."""
    return len(find_blocks(module)[1])


def clean_block(module: nn.Module) -> int:
    """AccVideo's block for clean-input (t = 0) features: the one at 2/3 of the depth ("the 40th of 60")."""
    return max(0, round(2 * depth(module) / 3) - 1)


def token_grid(module: nn.Module, latent_shape: Sequence[int], tokens: int) -> tuple[int, int, int]:
    """``(T', H', W')`` of the block tokens for latents ``(B, C, T, H, W)``, from the backbone's ``patch_size``."""
    owner = find_blocks(module)[0]
    config = getattr(owner, "config", None)
    patch = getattr(config, "patch_size", None)
    if isinstance(patch, int):  # diffusers CogVideoX / HunyuanVideo: spatial size + patch_size_t
        patch = (getattr(config, "patch_size_t", None) or 1, patch, patch)
    grid = tuple(n // p for n, p in zip(latent_shape[2:], patch)) if patch is not None else ()
    if len(grid) != 3 or math.prod(grid) != tokens:
        raise UserError(f"{type(owner).__name__}: cannot lay {tokens} block tokens on a grid for latents "
                        f"{tuple(latent_shape)} (patch_size {patch})")
    return grid  # type: ignore[return-value]


def extract_features(model: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning,
                     blocks: Sequence[int]) -> list[Tensor]:
    """Hidden tokens ``(B, N, D)`` after each of ``blocks`` (negative indices allowed), one forward pass.

    ``model(x_t, t, cond)`` is called once: a Denoiser takes continuous time ``t`` (B,), a Backbone
    its model timestep. The whole network runs (stopping it early would skip the hooks distributed
    wrappers rely on) and its output is discarded; gradients flow to ``x_t`` when the caller's mode
    allows. A Denoiser counts the call as one NFE.
    """
    from .experts import ExpertBackbone

    router = next((m for m in model.modules() if isinstance(m, ExpertBackbone)), None)
    experts = list(router.experts.values()) if router is not None else [model]
    lists = [find_blocks(expert)[1] for expert in experts]
    n = len(lists[0])
    if any(len(m) != n for m in lists):
        raise UserError(f"feature blocks of experts of different depths ({', '.join(str(len(m)) for m in lists)})")
    if any(not -n <= b < n for b in blocks):
        raise UserError(f"feature blocks {list(blocks)} out of range for a backbone of depth {n}")
    ids = [b % n for b in blocks]
    caught: dict[tuple[int, int], Tensor] = {}  # (expert, block) → tokens of the expert's samples
    which: list[Tensor] = []  # the router's assignment of the call's samples (B,)

    def catch(e, i):
        def hook(module, args, output):
            if router is None or bool((which[0] == e).any()):  # not an idle expert's one-token run
                caught[e, i] = output[0] if isinstance(output, tuple) else output  # diffusers blocks return tuples
        return hook

    handles = [m[i].register_forward_hook(catch(e, i)) for e, m in enumerate(lists) for i in set(ids)]
    if router is not None:
        handles.append(router.register_forward_pre_hook(lambda module, args: which.append(module.route(args[1]))))
    try:
        model(x_t, t, cond)
    finally:
        for handle in handles:
            handle.remove()
    if router is None:
        return [caught[0, i] for i in ids]
    used = [e for e in range(len(experts)) if bool((which[0] == e).any())]
    inverse = torch.argsort(torch.cat([(which[0] == e).nonzero()[:, 0] for e in used]))
    return [torch.cat([caught[e, i] for e in used])[inverse] for i in ids]  # (B, N, D) in the batch's order
