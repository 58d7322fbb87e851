"""Pixel conversions shared by every layer: uint8 frames on disk ↔ float frames in memory (DESIGN §2)."""

from __future__ import annotations

import numpy as np
import torch


def to_unit(frames_uint8):
    """uint8 ``[0, 255]`` → float32 ``[−1, 1]`` (``x / 127.5 − 1``); numpy or torch in, same out."""
    if isinstance(frames_uint8, torch.Tensor):
        return frames_uint8.to(torch.float32) / 127.5 - 1.0
    return np.asarray(frames_uint8).astype(np.float32) / 127.5 - 1.0


def to_uint8(frames_float):
    """float ``[−1, 1]`` → uint8 ``[0, 255]`` (clip, ``(x + 1) · 127.5``, round)."""
    if isinstance(frames_float, torch.Tensor):
        x = ((frames_float.detach().float().clamp(-1, 1) + 1.0) * 127.5).round()
        return x.to(torch.uint8)
    x = (np.clip(np.asarray(frames_float, dtype=np.float32), -1, 1) + 1.0) * 127.5
    return x.round().astype(np.uint8)
