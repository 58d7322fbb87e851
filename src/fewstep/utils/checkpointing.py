"""Activation checkpointing that recomputes under the state its forward ran in.

``torch.utils.checkpoint`` (non-reentrant) runs a block's forward again during the backward pass.
Whatever module state the forward read must then be the same; most is (weights, ``training``), but
a state switched per call is not: a LoRA base shared by several roles under FSDP
(:class:`~fewstep.engine.lora.AdapterHub`) runs the student's adapter in the student's forward and
the fake score's in the fake score's, so when the student's loss is back-propagated the hub may be
switched to another role. :func:`checkpoint` asks every registered state (:func:`register_state`)
for a context manager that restores its *current* value, at forward time, and enters them for the
recomputation (``context_fn``, torch's hook for exactly this).

Every checkpointed block of the project goes through :func:`checkpoint`: the toy DiT's blocks
directly, a diffusers model's through ``enable_gradient_checkpointing(gradient_checkpointing_func=
diffusers_checkpoint)``.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch.utils.checkpoint

#: Weak references to callables that each return a context manager which, entered later, restores the
#: state as it is *now* (weak: registering a bound method keeps nothing alive).
_STATES: list[weakref.ref] = []


def register_state(capture: Callable[[], AbstractContextManager]) -> None:
    """Have :func:`checkpoint` recompute under the value ``capture()`` saw at forward time."""
    _STATES.append(weakref.WeakMethod(capture) if inspect.ismethod(capture) else weakref.ref(capture))


def _captures() -> list[Callable[[], AbstractContextManager]]:
    live = [(ref, ref()) for ref in _STATES]
    _STATES[:] = [ref for ref, capture in live if capture is not None]
    return [capture for _, capture in live if capture is not None]


def _contexts() -> tuple[AbstractContextManager, AbstractContextManager]:
    restores = [capture() for capture in _captures()]

    @contextlib.contextmanager
    def recompute():
        with contextlib.ExitStack() as inner:
            for restore in restores:
                inner.enter_context(restore)
            yield

    return contextlib.nullcontext(), recompute()


def checkpoint(function: Callable, *args, **kwargs):
    """``torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)``, recomputed under the
    registered states as they were at this call."""
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, context_fn=_contexts, **kwargs)


def diffusers_checkpoint(module, *args):
    """The ``gradient_checkpointing_func`` of a diffusers model (called as ``func(block, *args)``)."""
    return checkpoint(module.__call__, *args)
