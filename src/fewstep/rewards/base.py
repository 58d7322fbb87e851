"""The reward contract, and the asset directories of the project's own trained scorers.

A reward maps decoded frames to one score per video (higher is better)::

    reward(frames, prompts) -> scores        frames (B, T, H, W, 3) float in [−1, 1], scores (B,)

``differentiable`` says whether gradients flow from the scores back to ``frames`` (direct reward
gradients, RGTD Eq. 13–14); a non-differentiable reward (JPEG compressibility) can only be
optimised through a latent reward model (DOLLAR Eq. 14–15) or DDPO (DOLLAR App. 7.4).

Trained scorers (the toy CLIP here, the Fréchet feature net in ``eval/features.py``) live in a
directory like a pipeline's::

    config.json          {"config": <the model's resolved config>, "metrics": <training metrics>}
    model.safetensors    weights

saved atomically (temporary sibling directory, fsync, rename) and loaded by a shipped name
(``src/fewstep/assets/<name>/``, written by ``fewstep pretrain``) or by a directory path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import torch
from pydantic import BaseModel
from safetensors.torch import save_file
from torch import Tensor, nn

from fewstep.config import parse_config
from fewstep.errors import UserError
from fewstep.models.pipeline import ASSETS
from fewstep.utils.io import atomic_directory, load_weights, read_json

C = TypeVar("C", bound=BaseModel)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class Reward(nn.Module):
    """``reward(frames (B, T, H, W, 3) in [−1, 1], prompts list[str]) -> (B,)``; higher is better.

    Rewards that ignore the caption (sharpness, JPEG) accept ``prompts=None``."""

    differentiable: bool = False

    def reward(self, frames: Tensor, prompts: list[str] | None = None) -> Tensor:
        raise NotImplementedError

    def forward(self, frames: Tensor, prompts: list[str] | None = None) -> Tensor:
        return self.reward(frames, prompts)


def keyframe_indices(frames: int) -> list[int]:
    """The first, middle and last of ``frames`` frames (RGTD Eq. 13): ``sorted({0, T // 2, T − 1})``."""
    return sorted({0, frames // 2, frames - 1})


def check_frames(frames: Tensor, prompts: list[str] | None = None) -> Tensor:
    """Validate ``(B, T, H, W, 3)`` float frames (and one prompt per video) at a reward's boundary."""
    if not isinstance(frames, Tensor) or frames.ndim != 5 or frames.shape[-1] != 3:
        shape = tuple(frames.shape) if hasattr(frames, "shape") else type(frames).__name__
        raise UserError(f"reward frames have shape {shape}; expected a (B, T, H, W, 3) tensor in [-1, 1]")
    if not frames.is_floating_point():
        raise UserError(f"reward frames have dtype {frames.dtype}; expected float in [-1, 1] (see to_unit)")
    if prompts is not None and len(prompts) != frames.shape[0]:
        raise UserError(f"got {frames.shape[0]} videos but {len(prompts)} prompts; expected one prompt per video")
    return frames


# --- asset directories ---------------------------------------------------------------------------


def resolve_asset(name_or_dir: str | Path, shipped: str, what: str) -> Path:
    """``shipped`` → ``src/fewstep/assets/<shipped>/``; anything else is a directory path.

    A missing directory is a UserError; a missing *shipped* one says to run ``fewstep pretrain``.
    """
    if str(name_or_dir) == shipped:
        directory = ASSETS / shipped
        if not (directory / CONFIG_FILE).is_file():
            raise UserError(f"the {what} {shipped!r} is missing from this install (expected {directory}); "
                            f"run `fewstep pretrain` to build it")
        return directory
    directory = Path(name_or_dir)
    if not (directory / CONFIG_FILE).is_file():
        raise UserError(f"{what} {name_or_dir}: not the shipped {shipped!r} nor a directory with {CONFIG_FILE}")
    return directory


def save_asset(directory: str | Path, config: BaseModel, module: nn.Module,
               metrics: dict[str, Any] | None = None) -> Path:
    """Write ``config`` + ``module``'s weights (+ training ``metrics``) atomically to ``directory``."""
    with atomic_directory(directory) as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
        save_file(state, tmp / WEIGHTS_FILE)
        meta = {"config": config.model_dump(mode="json"), "metrics": metrics or {}}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return Path(directory)


def load_asset(directory: Path, config_cls: type[C], build, what: str,
               device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Read a directory written by :func:`save_asset`: ``(build(config).eval() on device, metrics)``."""
    meta = read_json(directory / CONFIG_FILE, f"{what} {directory / CONFIG_FILE}")
    if not isinstance(meta, dict) or "config" not in meta:
        raise UserError(f"{what} {directory}: {CONFIG_FILE} lacks a 'config' mapping")
    module = build(parse_config(config_cls, meta["config"]))
    load_weights(module, directory / WEIGHTS_FILE, f"{what} {directory}", CONFIG_FILE)
    return module.to(device).eval(), dict(meta.get("metrics") or {})
