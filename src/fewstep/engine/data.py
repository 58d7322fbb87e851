"""Data for the engine: a deterministic stream of batches addressed by position, prepared ahead.

The engine never iterates a loader; it asks a :class:`DataSource` for the samples at given
*positions* of an endless stream. Step ``s`` of a run with global batch ``B`` reads positions
``[s·B, (s+1)·B)``; with ``W`` processes rank ``r`` takes the ``r``-th contiguous ``B/W`` of them,
and gradient accumulation splits those into micro-batches. Because a position fully determines
its sample (and its noise, see :class:`~fewstep.objectives.base.StepContext`), the data position
in a checkpoint is all that resume needs, and any world size or accumulation sees the same
global batch.

The engine knows no concrete source: the recipe builds one from its ``data:`` config
(:mod:`fewstep.recipes.sources`) and hands it over (``Plan.data_source``).

:class:`Prefetcher` prepares the next step's batch in a background thread while the current
step trains (DESIGN §5: the accelerator never waits on data). A batch is still a function of
its positions only, so prefetched and synchronous batches are identical.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Protocol, Sequence

import torch

from ..objectives.base import Batch


class DataSource(Protocol):
    """``batch(positions, device)``: the samples at ``positions`` as a :class:`Batch` on ``device``.

    Must be a pure function of the positions (no global RNG: the :class:`Prefetcher` calls it from
    another thread); it is never called from two threads at once."""

    def batch(self, positions: Sequence[int], device: torch.device) -> Batch: ...


class Prefetcher:
    """Wraps a :class:`DataSource`: :meth:`batch` returns the batch of ``positions`` and starts
    computing ``next_positions`` in one background thread.

    * **Same batches.** A prefetched batch is used only for exactly the positions it was started
      for; any other request (the first step, a step after resume, a changed schedule) waits for
      the thread to go idle and computes synchronously, so the source never runs twice at once.
    * **Errors** raised while preparing a batch are raised by the :meth:`batch` call that needs it
      (a batch nobody asks for is dropped, errors included).
    * **Thread state.** The worker runs ``init`` first (the trainer passes what its own thread has
      set: flushing denormals, the CUDA device); autocast and grad mode are per thread, and the
      worker runs outside both (a source uses ``torch.no_grad`` itself).
    * :meth:`close` waits for the batch in flight and stops the thread; use it in ``finally``.

    Under torchrun every rank has its own prefetcher for its own share of the positions.
    """

    def __init__(self, source: DataSource, device: torch.device, init: Callable[[], None] | None = None):
        self.source, self.device = source, device
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fewstep-data", initializer=init)
        self._pending: tuple[tuple[int, ...], Future] | None = None
        self._lock = threading.Lock()  # serialises batch() and close()

    def batch(self, positions: Sequence[int], next_positions: Sequence[int] | None = None) -> Batch:
        positions = tuple(int(p) for p in positions)
        with self._lock:
            pending, self._pending = self._pending, None
            if pending is not None and pending[0] == positions:
                batch = pending[1].result()  # re-raises the worker's exception
            else:
                if pending is not None:
                    _drop(pending[1])
                batch = self.source.batch(positions, self.device)
            if next_positions is not None:
                ahead = tuple(int(p) for p in next_positions)
                self._pending = (ahead, self._pool.submit(self.source.batch, ahead, self.device))
            return batch

    def close(self) -> None:
        """Drop the batch in flight (waiting for it) and stop the thread; idempotent."""
        with self._lock:
            pending, self._pending = self._pending, None
            if pending is not None:
                _drop(pending[1])
            self._pool.shutdown(wait=True)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _drop(future: Future) -> None:
    """Wait for an unwanted batch (the source must be idle before it is called again)."""
    if not future.cancel():
        future.exception()  # waits; its error, if any, belongs to positions nobody needs
