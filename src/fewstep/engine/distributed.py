"""Scale-out: process group, in-place DDP / FSDP2 wrapping, full state dicts (DESIGN §5).

``torchrun`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; :func:`init_distributed` then starts a
process group (gloo on CPU, NCCL on GPU). A single process needs no process group at all.

**What gets wrapped.** Objectives call a role's module through methods (``Denoiser.predict``,
its CFG path, block-feature hooks), not only through ``forward``, so a wrapper *around* the
role module would be bypassed. Instead the engine wraps its *compute root* in place: the first
module below the role's module that has more than one child or parameters of its own — for
``Denoiser → ModuleBackbone → transformer`` that is the transformer, which every path calls. Wrapping is
in place (FSDP2's ``fully_shard``, and ``replicate``, the composable form of
``DistributedDataParallel`` built on its reducer), so parameter names do not change and
checkpoints are the same files as single-process.

* ``ddp``: trainable roles are replicated; frozen roles and EMA copies are plain replicas.
* ``fsdp``: every role (frozen ones too, to save memory) and every EMA copy is sharded: each
  block of a ``ModuleList`` child of the compute root, then the root. A router of experts (Wan 2.2's
  two transformers, :class:`~fewstep.models.experts.ExpertBackbone`) shards each expert as a root of
  its own — its blocks, then the expert — so both experts' blocks are sharded (:func:`shard_units`).
  With ``train.bf16`` the mixed-precision policy gathers parameters in bf16 and reduces gradients
  in fp32 (the shards stay fp32 for trainable roles); ``train.cpu_offload`` keeps shards, gradients and optimiser
  state in CPU memory between uses (CUDA only).

Checkpoints gather full state dicts with ``torch.distributed.checkpoint.state_dict``
(``full_state_dict=True, cpu_offload=True``): rank 0 gets the whole dict, the others ``{}``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from ..errors import UserError

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mode: str = "ddp"
    owns_group: bool = False  # this process started the group (and destroys it at the end)
    mesh: object = None  # FSDP device mesh
    bf16: bool = False  # FSDP: gather parameters in bf16, reduce gradients in fp32 (train.bf16)
    cpu_offload: bool = False  # FSDP: keep sharded parameters, gradients and optimiser state in CPU memory

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean over processes of a small float tensor (a copy)."""
        values = values.detach().clone()
        if self.distributed:
            dist.all_reduce(values)
            values /= self.world_size
        return values

    def all_gather_object(self, obj) -> list:
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self, wait_for_others: bool = True) -> None:
        """Leave the process group; after a normal end every rank first waits for the others (a rank
        tearing gloo down while another still talks to it can abort that process at exit)."""
        if self.owns_group and dist.is_initialized():
            try:
                if wait_for_others:
                    dist.barrier()
            finally:
                dist.destroy_process_group()


def init_distributed(device: str = "auto", mode: str = "ddp", bf16: bool = False, cpu_offload: bool = False) -> DistEnv:
    """Join the torchrun process group if there is one; pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("config key 'train.device': cuda, but no CUDA device is available (use auto or cpu)")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if cpu_offload and not (mode == "fsdp" and use_cuda):
        raise UserError("config key 'train.cpu_offload': offloads FSDP shards from a GPU; it needs train.distributed: "
                        "fsdp on CUDA")
    env = DistEnv(rank, world, local_rank, dev, mode, bf16=bf16, cpu_offload=cpu_offload)
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
            env.owns_group = True
        if mode == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh

            env.mesh = init_device_mesh(dev.type, (world,))
    return env


def compute_root(module: nn.Module) -> nn.Module:
    """The first module below ``module`` with several children or parameters of its own, or whose one child is a
    container (a ``ModuleList`` of discriminator heads is never called itself, so its wrapper's hooks would not run)."""
    while True:
        children = list(module.children())
        if (len(children) != 1 or any(True for _ in module.parameters(recurse=False))
                or isinstance(children[0], (nn.ModuleList, nn.ModuleDict))):
            return module
        module = children[0]


def wrap(module: nn.Module, env: DistEnv, trainable: bool) -> nn.Module | None:
    """Wrap ``module``'s compute root in place for ``env.mode``; returns the wrapped root (or None)."""
    if not env.distributed:
        return None
    root = compute_root(module)
    if env.mode == "fsdp":
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        policy = {"mesh": env.mesh,
                  "mp_policy": (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                                if env.bf16 else MixedPrecisionPolicy()),
                  "offload_policy": CPUOffloadPolicy() if env.cpu_offload else OffloadPolicy()}
        for unit in shard_units(root):
            fully_shard(unit, **policy)
        if not trainable:  # FSDP2 keeps a root's own parameters gathered after forward, for a backward that a frozen
            root.register_forward_hook(_reshard)  # copy often never runs: the EMA's lerp and memory want them sharded
        return root
    if trainable:
        from torch.distributed._composable.replicate import replicate

        kwargs = {"device_ids": [env.device.index]} if env.device.type == "cuda" else {}
        replicate(root, **kwargs)
        return root
    return None


def _reshard(module, args, output) -> None:
    """Forward hook of a frozen FSDP2 root: back to sharded parameters after a forward no backward will pass
    through (an output that requires grad — a GAN on the teacher's features differentiates through it to its
    input — keeps them gathered for that backward, as FSDP2 does by itself)."""
    outputs = (output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list))
               else (output,))
    if not any(isinstance(o, torch.Tensor) and o.requires_grad for o in outputs):
        module.reshard()


def shard_units(root: nn.Module) -> list[nn.Module]:
    """What FSDP2 shards, innermost first: each block of the root's ``ModuleList`` children; for each expert of an
    :class:`~fewstep.models.experts.ExpertBackbone` root, the expert's own units (from its compute root); then the
    root."""
    from ..models.experts import ExpertBackbone

    units = []
    if isinstance(root, ExpertBackbone):
        for expert in root.experts.values():
            units += shard_units(compute_root(expert))
    for child in root.children():
        if isinstance(child, nn.ModuleList):
            units += list(child)
    return [*units, root]


def set_gradient_sync(root: nn.Module | None, enabled: bool) -> None:
    """Skip (or restore) the gradient all-reduce / reduce-scatter, for accumulation micro-batches."""
    if root is not None and hasattr(root, "set_requires_gradient_sync"):
        root.set_requires_gradient_sync(enabled)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float | None) -> float:
    """Global grad norm (before clipping), clipping to ``max_norm`` if given; works on DTensors."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"), foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


# ---------------------------------------------------------------------------------------------
# Full state dicts (collective under FSDP: every rank must call)
# ---------------------------------------------------------------------------------------------

def full_model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole ``state_dict`` on CPU on rank 0 (``{}`` elsewhere)."""
    return get_model_state_dict(module, options=FULL)


def load_model_state(module: nn.Module, state: dict[str, torch.Tensor], env: DistEnv, strict: bool = True) -> None:
    """Load a full state dict (every rank passes the whole dict); ``strict=False``: a part of it (adapters)."""
    if env.distributed and env.mode == "fsdp":
        set_model_state_dict(module, dict(state), options=StateDictOptions(full_state_dict=True, strict=strict))
    else:
        module.load_state_dict(state, strict=strict)


def full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``{"state": {param name: {...}}, "param_groups": [...]}`` on rank 0 (``{}`` elsewhere)."""
    return get_optimizer_state_dict(module, optimizer, options=FULL)


def load_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load what :func:`full_optimizer_state` gave. Not strict about parameters without state: PyTorch's optimisers
    create a parameter's state at its first gradient, so one that never had a gradient (an expert no sample has
    been routed to yet, :mod:`fewstep.models.experts`) has none, in the checkpoint as in the optimiser that wrote
    it. Names that do not match fail earlier, in the strict load of the role's weights. (``set_optimizer_state_dict``
    first gives every parameter a state by a zero-learning-rate step; those without saved state lose it again.)"""
    set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True, strict=False))
    saved = set(state.get("state", {}))
    for name, param in module.named_parameters():
        if name not in saved:
            optimizer.state.pop(param, None)
