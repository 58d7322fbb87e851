"""Local transformers models: loading with one-line errors, their image normalisation and resize-and-crop.

Shared by the evaluation's vision features (CLIP / DINOv2) and the transformers-backed rewards
(CLIP, X-CLIP). Only local directories are read (``local_files_only=True``).
"""

from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from .io import read_json


def load_local(class_name: str, directory: str | Path, what: str, tokenizer: bool = False):
    """``transformers.<class_name>`` (and, with ``tokenizer``, its ``AutoTokenizer``) from ``directory``;
    a failure is one line naming ``what``, the directory and the first line of the reason."""
    import transformers

    directory = Path(directory)
    transformers.utils.logging.disable_progress_bar()  # one-line output: no loading bars on stderr
    try:
        model = getattr(transformers, class_name).from_pretrained(directory, local_files_only=True)
        tok = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True) if tokenizer else None
    except (OSError, ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        also = " and its tokenizer" if tokenizer else ""
        raise UserError(f"{what} {directory}: the {class_name}{also} could not be loaded ({first})") from None
    finally:
        transformers.utils.logging.enable_progress_bar()
    return (model, tok) if tokenizer else model


def image_processor(directory: str | Path, what: str) -> dict:
    """``preprocessor_config.json`` of ``directory`` ({} when there is none)."""
    path = Path(directory) / "preprocessor_config.json"
    return read_json(path, f"{what} {path}") if path.is_file() else {}


def image_stats(directory: str | Path, what: str, mean, std) -> tuple:
    """``(image_mean, image_std)`` of the directory's preprocessor, else the given defaults."""
    processor = image_processor(directory, what)
    return processor.get("image_mean", mean), processor.get("image_std", std)


def resize_center_crop(x: Tensor, size: int) -> Tensor:
    """``(N, C, H, W)`` → ``(N, C, size, size)``: the shorter side resized to ``size`` (bicubic,
    antialiased), then the centre crop — a CLIP / DINOv2 image processor's resize and crop;
    differentiable."""
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    resized = (max(size, round(h * scale)), max(size, round(w * scale)))
    if resized != (h, w):
        x = F.interpolate(x, size=resized, mode="bicubic", antialias=True, align_corners=False)
    top, left = (resized[0] - size) // 2, (resized[1] - size) // 2
    return x[:, :, top:top + size, left:left + size]
