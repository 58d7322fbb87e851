"""JPEG compressibility (DDPO, Black et al. 2023; the non-differentiable reward of DOLLAR §4.5).

Each frame is JPEG-encoded with Pillow; the reward is minus the mean compressed size in
kilobytes per frame, so higher means more compressible (DDPO's definition). The encoder is a
black box: ``differentiable = False``, so it can only be optimised through a latent reward
model (DOLLAR Eq. 14–15) or by DDPO (DOLLAR App. 7.4).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fewstep.data.toyworld import to_uint8
from fewstep.errors import UserError

from .base import Reward, check_frames


def jpeg_kilobytes(frame: np.ndarray, quality: int) -> float:
    """Size of one ``(H, W, 3)`` uint8 frame as a JPEG of ``quality``, in kB (1000 bytes)."""
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000.0


class JpegCompressibility(Reward):
    """−(compressed kB per frame) of each video; ``quality`` is Pillow's JPEG quality (1–95)."""

    differentiable = False

    def __init__(self, quality: int = 95):
        super().__init__()
        if not 1 <= quality <= 95:
            raise UserError(f"jpeg quality={quality} is invalid; expected 1..95 (Pillow's range)")
        self.quality = quality

    @torch.no_grad()
    def reward(self, frames: Tensor, prompts: list[str] | None = None) -> Tensor:
        check_frames(frames, prompts)
        videos = to_uint8(frames).cpu().numpy()  # (B, T, H, W, 3) uint8
        kb = [[jpeg_kilobytes(frame, self.quality) for frame in video] for video in videos]
        return -torch.tensor(kb, dtype=torch.float32, device=frames.device).mean(dim=1)
