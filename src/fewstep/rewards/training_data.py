"""Labelled toy-world clips for training the project's own scorers (toy CLIP, Fréchet features).

Rendering a clip costs milliseconds (4×4 supersampling), more than a training step of a small
scorer spends on it, so training draws batches from a *pool* of clips of ``ToyWorld(split)``
(items ``start .. start + num − 1``, each with the attributes it realises) rendered once. Two
label-preserving symmetries multiply the pool by four and hand every batch hard negatives —
the same appearance with a different motion:

- horizontal flip (``W`` axis): left ↔ right (every shape is symmetric about its vertical axis);
- time reversal (``T`` axis): left ↔ right and up ↔ down.

A vertical flip would turn the apex-up triangle upside down, so it is not used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from fewstep.data.toyworld import (
    BACKGROUNDS, COLOURS, FRAMES, MOTIONS, SHAPES, SIZE, Prompt, ToyWorld, parse_prompt, render_clip, to_unit,
)

SPEED_CLASSES: tuple[str, ...] = ("still", "slow", "fast")  # a still clip has no speed class
#: Attribute name → class names; the label of a clip is an index into these.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "motion": MOTIONS,
    "speed": SPEED_CLASSES,
    "background": BACKGROUNDS,
}
APPEARANCE = ("colour", "shape", "background")  # what a single frame shows
Progress = Callable[[int, int, dict], None]  # progress(step, steps, metrics) of a training function

_HFLIP = {"left": "right", "right": "left"}
_REVERSE = {"left": "right", "right": "left", "up": "down", "down": "up"}


@dataclass
class LabelledClips:
    """``videos (N, T, H, W, 3)`` uint8, their captions, and per-attribute labels ``(N,)``."""

    videos: np.ndarray
    prompts: list[str]
    labels: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.prompts)

    @classmethod
    def render(cls, split: str, num: int, frames: int = FRAMES, size: int = SIZE, start: int = 0) -> LabelledClips:
        """Items ``start .. start + num − 1`` of ``ToyWorld(split)`` with the attributes they realise."""
        world = ToyWorld(split, frames, size, length=start + num)
        return cls.from_suite([world.prompt_and_seed(start + k) for k in range(num)], frames, size)

    @classmethod
    def from_suite(cls, suite: list[tuple[str, int]], frames: int = FRAMES, size: int = SIZE) -> LabelledClips:
        """Clips of explicit ``(prompt, seed)`` pairs (e.g. ``eval_suite(n)``)."""
        videos = np.empty((len(suite), frames, size, size, 3), dtype=np.uint8)
        labels = {name: np.empty(len(suite), dtype=np.int64) for name in ATTRIBUTES}
        for k, (prompt, seed) in enumerate(suite):
            videos[k], meta = render_clip(prompt, seed, frames, size)
            resolved = {"colour": meta.prompt.colour, "shape": meta.shape, "motion": meta.motion,
                        "speed": meta.speed or "still", "background": meta.background}
            for name, value in resolved.items():
                labels[name][k] = ATTRIBUTES[name].index(value)
        return cls(videos, [p for p, _ in suite], labels)

    def sample(self, batch_size: int, generator: np.random.Generator, augment: bool = True,
               pairs: bool = True, group: int = 1, group_by: tuple[str, ...] = ("colour", "background")) -> dict:
        """A training batch: ``frames (B, T, H, W, 3)`` float32 tensor in [−1, 1], ``prompts``, ``labels``.

        With ``pairs`` the batch holds ``B/2`` pool clips, each twice under two different
        symmetries (so the same appearance appears with two motions when the clip moves). With
        ``group > 1`` the pool clips come in groups of ``group`` that share the attributes
        ``group_by``, so that clips differ from many others only in shape or motion (hard negatives).
        """
        num = (batch_size + 1) // 2 if pairs else batch_size
        if group > 1:
            anchors = generator.integers(len(self), size=-(-num // group))
            keys = np.stack([self.labels[name] for name in group_by], axis=1)  # (N, len(group_by))
            base = np.concatenate([generator.choice(np.flatnonzero((keys == keys[a]).all(1)), size=group)
                                   for a in anchors])[:num]
        else:
            base = generator.integers(len(self), size=num)
        if pairs:
            first = generator.integers(4, size=len(base))
            second = (first + generator.integers(1, 4, size=len(base))) % 4  # a different symmetry
            index = np.repeat(base, 2)[:batch_size]
            ops = np.stack([first, second], axis=1).reshape(-1)[:batch_size]
        else:
            index = base
            ops = generator.integers(4, size=batch_size)
        if not augment:
            ops = np.zeros_like(ops)
        videos, prompts = [], []
        labels = {name: values[index].copy() for name, values in self.labels.items()}
        for k, (i, op) in enumerate(zip(index, ops)):
            video, prompt = self.videos[i], parse_prompt(self.prompts[i])
            motion = ATTRIBUTES["motion"][labels["motion"][k]]
            if op & 1:  # horizontal flip
                video, motion = video[:, :, ::-1], _HFLIP.get(motion, motion)
            if op & 2:  # time reversal
                video, motion = video[::-1], _REVERSE.get(motion, motion)
            labels["motion"][k] = ATTRIBUTES["motion"].index(motion)
            videos.append(video)
            prompts.append(str(Prompt(prompt.colour, prompt.shape, motion, prompt.speed, prompt.background)))
        frames = torch.from_numpy(to_unit(np.stack(videos)))  # (B, T, H, W, 3)
        return {"frames": frames, "prompts": prompts, "labels": {k: torch.from_numpy(v) for k, v in labels.items()}}

    def all(self) -> dict:
        """The whole pool as one batch, unaugmented (for evaluation)."""
        return {"frames": torch.from_numpy(to_unit(self.videos)), "prompts": list(self.prompts),
                "labels": {k: torch.from_numpy(v) for k, v in self.labels.items()}}


def caption_matches(prompts: list[str], labels: dict[str, torch.Tensor], appearance_only: bool = False) -> torch.Tensor:
    """``M[i, j]`` = clip ``i`` (its resolved attribute ``labels``) satisfies caption ``j``: ``(N, P)`` bool.

    A caption fixes colour, shape and motion, and speed and background only when it names them;
    with ``appearance_only`` only what a single frame shows counts (colour, shape, background).
    """
    n = len(labels["colour"])
    out = torch.ones(n, len(prompts), dtype=torch.bool)
    for j, text in enumerate(prompts):
        p = parse_prompt(text)
        wanted = {"colour": p.colour, "shape": p.shape, "background": p.background}
        if not appearance_only:
            wanted |= {"motion": p.motion, "speed": p.speed}
        for name, value in wanted.items():
            if value is not None:
                out[:, j] &= labels[name] == ATTRIBUTES[name].index(value)
    return out


def warmup_cosine(step: int, steps: int, warmup: int, floor: float = 0.05) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine decay to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(1, steps - warmup), 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def fit(model: nn.Module, steps: int, lr: float, warmup_steps: int,
        loss_fn: Callable[[], tuple[torch.Tensor, dict]], progress=None, log_every: int = 50) -> dict:
    """The toy pixel models' training loop: AdamW (weight decay 0.01), warm-up + cosine LR,
    gradient clipping at 1; ``loss_fn()`` draws a batch and returns ``(loss, metrics)``.
    ``progress(step, steps, metrics)`` is called every ``log_every`` steps and at the end.
    Returns the last step's metrics."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, steps, warmup_steps))
    metrics: dict = {}
    for step in range(1, steps + 1):
        loss, metrics = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if progress is not None and (step % log_every == 0 or step == steps):
            progress(step, steps, metrics)
    return metrics
