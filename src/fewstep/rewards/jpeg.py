"""JPEG compressibility (DDPO, Black et al. 2023; the non-differentiable reward of DOLLAR §4.5).

DDPO's reward is minus the JPEG file size of the image in kilobytes (higher = more compressible).
A video's frames are tiled row-major into one grid image (``ceil(√T)`` columns) and JPEG-encoded
once with Pillow; the reward is minus the file size divided by the number of frames, in kB per
frame. The encoder is a black box: ``differentiable = False``, so it can only be optimised
through a latent reward model (DOLLAR Eq. 14–15) or by DDPO (DOLLAR App. 7.4).

Deviation (why one grid, not one file per frame): DDPO scores 512² images, whose size is almost
all coded content. A 32² frame encoded alone is dominated by the JPEG container — quantisation
and Huffman tables and markers, 0.64 kB at quality 95, the size of a uniform frame — while toy
clips average 0.89 kB per frame, so per-frame files would make 70 % of the reward a constant no
model can change, and a relative change of it a different quantity than DDPO's. In the grid the
container is paid once per video (0.04 kB per frame for 16 frames), the same toy clips average
0.30 kB per frame with the same spread (std 0.056 kB either way, correlation 0.9998), and with
frame sides that are multiples of 16 (JPEG's 8×8 blocks, 2× chroma subsampling) no coding block
straddles two frames, so the grid size is the sum of the frames' coded content.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fewstep.data.toyworld import to_uint8
from fewstep.errors import UserError

from .base import Reward, check_frames


def jpeg_kilobytes(image: np.ndarray, quality: int) -> float:
    """Size of one ``(H, W, 3)`` uint8 image as a JPEG of ``quality``, in kB (1000 bytes)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000.0


def frame_grid(video: np.ndarray) -> np.ndarray:
    """``(T, H, W, 3)`` → ``(rows·H, cols·W, 3)``: frames row-major, ``cols = ceil(√T)``, zero padding."""
    frames, height, width, channels = video.shape
    cols = math.ceil(math.sqrt(frames))
    rows = math.ceil(frames / cols)
    padded = np.zeros((rows * cols, height, width, channels), dtype=video.dtype)
    padded[:frames] = video
    grid = padded.reshape(rows, cols, height, width, channels).transpose(0, 2, 1, 3, 4)  # (rows, H, cols, W, 3)
    return np.ascontiguousarray(grid.reshape(rows * height, cols * width, channels))


class JpegCompressibility(Reward):
    """−(kB per frame of the video's frames JPEG-encoded as one grid); ``quality``: Pillow's (1–95)."""

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
        kb = [jpeg_kilobytes(frame_grid(video), self.quality) / len(video) for video in videos]
        return -torch.tensor(kb, dtype=torch.float32, device=frames.device)  # (B,)
