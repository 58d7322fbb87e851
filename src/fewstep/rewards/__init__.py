"""Reward models on decoded frames (DESIGN §4): ``reward(frames (B, T, H, W, 3) in [−1, 1], prompts) -> (B,)``.

``REWARDS`` maps a name to a factory (keyword arguments → :class:`Reward`); configs and the CLI
name rewards through :func:`build_reward`:

- ``toy-clip`` / ``toy-clip-frame`` / ``toy-clip-video``: the trained toy CLIP (both heads,
  first/middle/last frame–caption as in RGTD Eq. 13, clip–caption as in RGTD Eq. 14);
  differentiable; ``path`` = shipped name or directory (default the shipped ``toy-clip``).
- ``sharpness``: Laplacian-to-gradient energy ratio, a differentiable aesthetic proxy.
- ``jpeg``: JPEG compressibility (DDPO), not differentiable; ``quality`` (default 95).
- ``clip`` / ``clip-iqa`` / ``xclip``: local transformers models (:mod:`.hf`; ``path`` = a model
  directory): CLIP image–text (RGTD's R_it), CLIP-IQA quality (R_iq), X-CLIP video–text (R_v).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from fewstep.errors import UserError

from .base import Reward
from .hf import ClipQualityReward, ClipTextReward, XClipReward
from .jpeg import JpegCompressibility
from .sharpness import SharpnessReward
from .toy_clip import ToyClip, ToyClipConfig, ToyClipReward, toy_clip_frames, train_toy_clip


def _toy_clip(head: str) -> Callable[..., Reward]:
    def build(path: str = "toy-clip", device: str = "cpu") -> Reward:
        return ToyClipReward.load(path, head=head, device=device)

    return build


REWARDS: dict[str, Callable[..., Reward]] = {
    "toy-clip": _toy_clip("both"),
    "toy-clip-frame": _toy_clip("frame"),
    "toy-clip-video": _toy_clip("clip"),
    "sharpness": SharpnessReward,
    "jpeg": JpegCompressibility,
    "clip": ClipTextReward.load,
    "clip-iqa": ClipQualityReward.load,
    "xclip": XClipReward.load,
}


#: Frozen per-frame image encoders by name: ``(path, layers) -> module``, images (N, 3, H, W) in [−1, 1] →
#: feature maps [(N, C_k, h_k, w_k)] (a discriminator's features; a real teacher's DINOv2 is loaded apart).
FRAME_FEATURES: dict[str, Callable[..., torch.nn.Module]] = {"toy_clip": toy_clip_frames}


def build_reward(name: str, **kwargs: Any) -> Reward:
    """The reward registered as ``name``, built with ``kwargs``; an unknown name is a UserError."""
    if name not in REWARDS:
        raise UserError(f"unknown reward {name!r}; expected one of {', '.join(REWARDS)}")
    try:
        return REWARDS[name](**kwargs)
    except TypeError as err:
        raise UserError(f"reward {name!r}: {err}") from None


__all__ = ["FRAME_FEATURES", "REWARDS", "Reward", "build_reward", "JpegCompressibility", "SharpnessReward", "ToyClip",
           "ToyClipConfig", "ToyClipReward", "train_toy_clip"]
