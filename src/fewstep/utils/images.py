"""Condition images of image-to-video models: a PNG/JPEG file → ``(H, W, 3)`` float in [−1, 1] (DESIGN §2).

The image must already have the model's height × width and be RGB: fewstep neither resizes nor converts
a condition image silently (a resized or alpha-flattened first frame is a different condition).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .frames import to_unit


def load_condition_image(path: str | Path, height: int, width: int) -> torch.Tensor:
    """``path`` (PNG or JPEG, 8-bit RGB, ``height`` × ``width``) → ``(height, width, 3)`` float32 in [−1, 1].

    Anything else — a missing or unreadable file, greyscale or RGBA, 16-bit, another size — is a
    one-line :class:`UserError` naming ``--image`` and what was expected."""
    import imageio.v3 as iio

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--image {path}: no such file")
    try:
        image = np.asarray(iio.imread(path, plugin="pillow"))
    except Exception as error:  # imageio raises plugin-specific errors for a file it cannot decode
        raise UserError(f"--image {path}: not a readable PNG/JPEG image ({type(error).__name__})") from None
    if image.ndim != 3 or image.shape[-1] != 3:
        got = "greyscale" if image.ndim == 2 else f"{image.shape[-1]} channels" if image.ndim == 3 else f"shape {image.shape}"
        raise UserError(f"--image {path}: expected an RGB image (3 channels); got {got}")
    if image.dtype != np.uint8:
        raise UserError(f"--image {path}: expected 8-bit channels; got {image.dtype}")
    if image.shape[:2] != (height, width):
        raise UserError(f"--image {path}: the model takes {height}×{width} (height × width) images; "
                        f"got {image.shape[0]}×{image.shape[1]}")
    return torch.from_numpy(to_unit(image))  # (H, W, 3)
