"""Experts by noise level: several backbones behind one, each sample routed by its own timestep.

Wan 2.2 A14B denoises with two experts (Wan 2.2 report §2; diffusers ``WanPipeline``, ``transformer`` and
``transformer_2``): the *high-noise* expert for the early, layout-forming steps and the *low-noise* expert
for the late, detail-refining ones. diffusers' ``WanPipeline.__call__`` picks, per step,

    model = transformer    if t ≥ boundary_ratio · num_train_timesteps    (guidance_scale)
            transformer_2  otherwise                                       (guidance_scale_2)

with ``t`` the scheduler's timestep, i.e. the model timestep ``1000·σ`` the transformer is given.
:class:`ExpertBackbone` is that rule as a :class:`~fewstep.models.backbones.Backbone`: it receives
model timesteps ``(B,)`` like any adapter, so it routes *each sample* by its own timestep. A batch with
timesteps on both sides (a training batch of random t, a mixed student step) is split, each part goes
through its expert, and the outputs are put back in the batch's order; a sample is never given to the
other expert. Routing by the model timestep keeps it independent of the pipeline class: any backbone
adapters (text-to-video or image-to-video) compose.

Because the router is a backbone, everything a :class:`~fewstep.models.denoiser.Denoiser` does — the
prediction-type conversion, CFG over ``[cond; uncond]`` (both halves share their sample's timestep and
so their expert), ``torch.func`` JVPs, finite differences, copies into roles, LoRA on the Linear layers of
each expert's blocks, FSDP2 over each expert's blocks (:func:`fewstep.engine.distributed.wrap`) — works
per expert without knowing there are two. :meth:`ExpertBackbone.cfg_scales` gives the per-sample CFG
scale (the low-noise expert's ``guidance_scale_2``), and :meth:`ExpertBackbone.blockwise` the block-wise
split of SwiftVideo's JVP (003 Alg. 2) over a mixed batch.

The experts sit in an ``nn.ModuleDict`` named by the pipeline's slots (``transformer``,
``transformer_2``), ordered from high noise to low; parameter names read
``backbone.experts.transformer.model.blocks.0…``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .backbones import Backbone, BlockwiseForward, Conditioning


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class ExpertBackbone(Backbone):
    """``ExpertBackbone({slot: backbone, …}, boundaries)``: experts ordered from high noise to low.

    ``boundaries`` (decreasing model timesteps, one fewer than experts): expert ``i`` takes the samples
    with ``boundaries[i] ≤ timestep < boundaries[i − 1]`` (Wan 2.2: one boundary ``boundary_ratio ·
    1000``; ``timestep ≥ boundary`` goes to ``transformer``, as ``WanPipeline``). ``cfg_scales``: each
    expert's CFG scale when a call is guided, None for an expert that takes the caller's scale (Wan 2.2:
    ``[None, guidance_scale_2]``).
    """

    def __init__(self, experts: dict[str, nn.Module], boundaries: list[float],
                 cfg_scales: list[float | None] | None = None):
        super().__init__()
        if len(boundaries) != len(experts) - 1 or any(b <= a for a, b in zip(boundaries[1:], boundaries)):
            raise ValueError(f"{len(experts)} experts need {len(experts) - 1} decreasing boundaries; got {boundaries}")
        self.experts = nn.ModuleDict(experts)
        self.boundaries = [float(b) for b in boundaries]
        self.expert_cfg_scales = list(cfg_scales or [None] * len(experts))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A state dict of one expert alone (its keys without ``experts.<slot>.``: a ``single`` student trained for
        every step, recipes/builders.py ``{kind: expert}``) loads into every slot."""
        mine = [k for k in state_dict if k.startswith(prefix)]
        if mine and not any(k.startswith(f"{prefix}experts.") for k in mine):
            for key in mine:
                value = state_dict.pop(key)
                for slot in self.experts:
                    state_dict[f"{prefix}experts.{slot}.{key[len(prefix):]}"] = value
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -------------------------------------------------------------------------------- routing
    def route(self, timestep: Tensor) -> Tensor:
        """Which expert (0 = highest noise) takes each sample: ``(B,)`` long, from model timesteps ``(B,)``."""
        bounds = torch.tensor(self.boundaries, dtype=timestep.dtype, device=timestep.device)
        return (timestep[:, None] < bounds[None, :]).sum(dim=1)  # number of boundaries above the timestep

    def _groups(self, timestep: Tensor) -> list[tuple[nn.Module, Tensor]]:
        """``(expert, sample indices)`` per expert that has samples, in expert order."""
        which = self.route(timestep)
        return [(expert, (which == i).nonzero()[:, 0]) for i, expert in enumerate(self.experts.values())
                if bool((which == i).any())]

    def forward(self, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        """Each sample through its expert (module doc); shapes as the backbone contract."""
        which = self.route(timestep)
        run_idle = self._run_idle()
        outs, order, extra = [], [], None
        for i, expert in enumerate(self.experts.values()):  # always in expert order (collectives, _idle)
            idx = (which == i).nonzero()[:, 0]
            if len(idx) == len(which):
                outs.append(expert(x, timestep, cond))
            elif len(idx):
                outs.append(expert(x[idx], timestep[idx], cond.index(idx)))
            elif run_idle:
                idle = self._idle(expert, x, timestep, cond)
                extra = idle if extra is None else extra + idle
                continue
            else:
                continue
            order.append(idx)
        out = outs[0] if len(outs) == 1 else torch.cat(outs)[torch.argsort(torch.cat(order))]  # batch order
        return out if extra is None else out + extra  # (B, C, T, H, W)

    def _run_idle(self) -> bool:
        """Whether an expert no sample goes to runs anyway: under DDP / FSDP always, when training in one process
        too (so one process and many update alike)."""
        return _distributed() or (torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()))

    @staticmethod
    def _idle(expert: nn.Module, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        """Zero times the output of an expert no sample went to, on a one-token input.

        Under FSDP / DDP every rank must run every expert in every forward, and in the same order (each one's
        parameter gathers and gradient reductions are collectives, matched by order: two equally shaped experts
        called in different orders on two ranks would silently swap shards), whichever samples its batch holds.
        The idle expert's gradient is then zero rather than absent — on every rank, and, for the same updates, in
        one process too: its optimiser steps with a zero gradient (Adam's momentum carries on), as an MoE's
        unrouted expert does. The input is the first sample cropped to one patch (one token), so the extra cost
        is that of the embeddings and the caption's cross-attention.
        """
        patch = getattr(getattr(getattr(expert, "model", None), "config", None), "patch_size", None)
        one = cond.index(slice(0, 1))
        if not (isinstance(patch, (tuple, list)) and len(patch) == 3):
            return 0.0 * expert(x[:1], timestep[:1], one).sum()

        def crop(v: Tensor) -> Tensor:  # (1, C, T, H, W) → (1, C, p_t, p_h, p_w): one token
            return v[:, :, :patch[0], :patch[1], :patch[2]]

        # extras laid out like the latents (an image-to-video model's image latent and mask) are cropped alike
        extra = {k: crop(v) if v.shape[2:] == x.shape[2:] else v for k, v in one.extra.items()}
        one = Conditioning(one.context, one.mask, extra)
        return 0.0 * expert(crop(x[:1]), timestep[:1], one).sum()

    def cfg_scales(self, timestep: Tensor, cfg_scale: float) -> float | Tensor:
        """The CFG scale of each sample ``(B,)`` when a call is guided with ``cfg_scale``: its expert's own scale
        (Wan 2.2's ``guidance_scale_2`` for the low-noise expert), else ``cfg_scale``."""
        if all(s is None for s in self.expert_cfg_scales):
            return cfg_scale
        table = torch.tensor([cfg_scale if s is None else s for s in self.expert_cfg_scales],
                             dtype=timestep.dtype, device=timestep.device)
        return table[self.route(timestep)]

    # -------------------------------------------------------------------------------- block-wise JVP
    def blockwise(self, x: Tensor, timestep: Tensor, cond: Conditioning) -> BlockwiseForward:
        """SwiftVideo Alg. 2's split over a batch routed to several experts.

        One expert's split when every sample goes to it; otherwise every piece runs each expert's own piece
        on its samples and puts the results back in the batch's order: the time state is the experts' states
        side by side, tokens ``(B, N, D)`` are split by sample, block ``i`` is block ``i`` of each expert (the
        experts must be equally deep, as Wan 2.2's are).
        """
        groups = self._groups(timestep)
        if len(groups) == 1:
            return groups[0][0].blockwise(x, timestep, cond)
        parts = [expert.blockwise(x[idx], timestep[idx], cond.index(idx)) for expert, idx in groups]
        depths = {len(p.blocks) for p in parts}
        if len(depths) != 1:
            raise ValueError(f"the block-wise JVP over a mixed batch needs experts of equal depth; got "
                             f"{sorted(depths)}")
        index = [idx for _, idx in groups]
        inverse = torch.argsort(torch.cat(index))
        sizes: list[int] = []  # time-state tensors per expert

        def merge(outs: list[Tensor]) -> Tensor:
            return torch.cat(outs)[inverse]

        def split_state(state: tuple[Tensor, ...]) -> list[tuple[Tensor, ...]]:
            out, start = [], 0
            for n in sizes:
                out.append(state[start:start + n])
                start += n
            return out

        def time_embed(ts: Tensor) -> tuple[Tensor, ...]:
            states = [p.time_embed(ts[idx]) for p, idx in zip(parts, index)]
            sizes[:] = [len(s) for s in states]
            return tuple(t for s in states for t in s)

        def patch_embed(x_: Tensor) -> Tensor:
            return merge([p.patch_embed(x_[idx]) for p, idx in zip(parts, index)])

        def make_block(i: int):
            def block(h: Tensor, *state: Tensor) -> Tensor:
                return merge([p.blocks[i](h[idx], *s) for p, idx, s in zip(parts, index, split_state(state))])
            return block

        def output(h: Tensor, *state: Tensor) -> Tensor:
            return merge([p.output(h[idx], *s) for p, idx, s in zip(parts, index, split_state(state))])

        return BlockwiseForward(time_embed, patch_embed, [make_block(i) for i in range(depths.pop())], output)
