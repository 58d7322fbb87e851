"""Data for the engine: a deterministic stream of batches addressed by position.

The engine never iterates a loader; it asks a :class:`DataSource` for the samples at given
*positions* of an endless stream. Step ``s`` of a run with global batch ``B`` reads positions
``[s·B, (s+1)·B)``; with ``W`` processes rank ``r`` takes the ``r``-th contiguous ``B/W`` of them,
and gradient accumulation splits those into micro-batches. Because a position fully determines
its sample (and its noise, see :class:`~fewstep.objectives.base.StepContext`), the data position
in a checkpoint is all that resume needs, and any world size or accumulation sees the same
global batch.

:class:`ToyWorldSource` renders toy-world clips (DESIGN §4) and turns them into what objectives
consume: latents through the model's frozen codec, captions through its frozen text encoder.
With ``train.seed = s`` the stream starts at toy-world index ``s · 2³²``.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from ..data.toyworld import ToyWorld
from ..models.codec import frames_to_video
from ..objectives.base import Batch


class DataSource(Protocol):
    def batch(self, positions: Sequence[int], device: torch.device) -> Batch: ...


class ToyWorldSource:
    """Toy-world clips → ``Batch(latents, cond, uncond, …)`` through a pipeline's frozen codec and text encoder."""

    STREAM_STRIDE = 2**32

    def __init__(self, pipeline, seed: int):
        self.pipeline = pipeline  # VideoPipeline; only its codec and text encoder are used
        self.offset = seed * self.STREAM_STRIDE
        self.world = ToyWorld("train", frames=pipeline.config.frames, size=pipeline.config.size, length=2**62)

    @torch.no_grad()
    def batch(self, positions: Sequence[int], device: torch.device) -> Batch:
        items = self.world.batch([self.offset + p for p in positions])
        frames = items["frames"].to(device)  # (B, T, H, W, 3) in [−1, 1]
        latents = self.pipeline.codec.encode(frames_to_video(frames))  # (B, C, T', H', W')
        cond = self.pipeline.encode_prompts(items["prompts"])
        uncond = self.pipeline.null_condition(len(positions))
        return Batch(latents=latents, cond=cond, uncond=uncond, prompts=items["prompts"],
                     sample_ids=torch.as_tensor(list(positions), dtype=torch.int64))
