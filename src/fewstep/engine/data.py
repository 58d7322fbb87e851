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

:class:`Prefetcher` prepares every batch in one background thread and, with ``train.prefetch``,
the next step's while the current step trains (DESIGN §5: the accelerator never waits on data).
A batch is a function of its positions only, so prefetching changes no number.

On a CPU the data thread needs a core of its own to overlap: with torch's default (the step's
thread pool on every core) there is none, and a data thread only competes with the step — so
``train.prefetch: auto`` prefetches with an accelerator, or on a CPU when the step's threads leave
a core free (:func:`spare_cores`); otherwise the step reads its batch itself, as without a
prefetcher. On 2 cores, a step on one thread (``OMP_NUM_THREADS=1``) with the data on the other
hides most of the data preparation (``benchmarks/engine_overhead.py --threads 1``).
"""

from __future__ import annotations

import os
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


def spare_cores() -> int:
    """CPU cores this process may use beyond its intra-op threads (× processes per node under torchrun)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores - torch.get_num_threads() * int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


class Prefetcher:
    """Runs a :class:`DataSource` in one background thread: :meth:`batch` returns the batch of
    ``positions`` and starts preparing ``next_positions`` (if given) while the caller trains.

    * **Same batches.** Every batch — prefetched or not — is computed by the data thread with the
      same thread settings, so where a run resumes changes no number. A prefetched batch is used
      only for exactly the positions it was started for; any other request (the first step, a step
      after resume) waits for it and is computed next. The source never runs twice at once. (A
      source whose results do not depend on the intra-op thread count (the default data source) gives
      the same batches with and without a prefetcher: tests/test_prefetch.py.)
    * **Errors** raised while preparing a batch are raised by the :meth:`batch` call that needs it
      (a batch nobody asks for is dropped, errors included).
    * **Thread state.** The data thread first runs ``init`` (the trainer passes what its own thread
      has set: flushing denormals, the CUDA device) and uses ``threads`` intra-op threads: one by
      default, so that it takes one core beside the step's (torch's CPU thread pool is per thread;
      two full pools on the same cores spin against each other and can slow a CPU step several-fold).
      Autocast and grad mode are per thread too; a source uses ``torch.no_grad`` itself.
    * :meth:`close` waits for the batch in flight and stops the thread; use it in ``finally``.

    Under torchrun every rank has its own prefetcher for its own share of the positions.
    """

    def __init__(self, source: DataSource, device: torch.device, init: Callable[[], None] | None = None,
                 threads: int = 1):
        self.source, self.device = source, device

        def setup() -> None:
            torch.set_num_threads(threads)
            if init is not None:
                init()

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fewstep-data", initializer=setup)
        self._pending: tuple[tuple[int, ...], Future] | None = None
        self._lock = threading.Lock()  # serialises batch() and close()

    def _submit(self, positions: tuple[int, ...]) -> Future:
        return self._pool.submit(self.source.batch, positions, self.device)

    def batch(self, positions: Sequence[int], next_positions: Sequence[int] | None = None) -> Batch:
        positions = tuple(int(p) for p in positions)
        with self._lock:
            pending, self._pending = self._pending, None
            if pending is not None and pending[0] == positions:
                future = pending[1]
            else:
                if pending is not None:
                    _drop(pending[1])
                future = self._submit(positions)
            if next_positions is not None:  # queued behind ``future`` on the one data thread
                ahead = tuple(int(p) for p in next_positions)
                self._pending = (ahead, self._submit(ahead))
            return future.result()  # re-raises the data thread's exception

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
