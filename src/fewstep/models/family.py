"""The pipeline seam (DESIGN §1): one protocol for a loadable video model, and the families behind it.

What ``--model M`` names everywhere (``fewstep generate/eval/distill/synth/bench``, a recipe's
``model`` key) is a :class:`VideoModel`: a shipped name (``toy-teacher``) or a directory that one
*family* recognises by what it holds. :func:`load_model` picks the family::

    family   detect(directory)                           class
    toy        model.json with "kind": "toy"               fewstep.models.pipeline.VideoPipeline
    diffusers  model_index.json of a diffusers pipeline    fewstep.models.diffusers_family.DiffusersVideoModel

Image-to-video models (``image_conditioned``) take the condition image with the prompt: callers build a
condition as ``model.encode_prompts(prompts).with_extra(model.encode_images(images))``, ``images`` being
``(B, H, W, 3)`` float in [−1, 1] at the model's geometry. ``encode_images`` returns the *visual extras*
(keys starting with ``image``, carried by :class:`Conditioning` like any extra): ``image_latent``
``(B, C, T', H', W')``, the normalised latent of the conditioning video (first latent frame = the encoded
image, the rest what the family's diffusers pipeline puts there), ``image_mask`` ``(B, M, T', H', W')``
where the family needs one, ``image_embeds`` for Wan 2.1 I2V's CLIP image tokens. A text-to-video
model's ``encode_images`` is a one-line error (:func:`no_image_input`); ``sample_latents``/``generate``
take ``images=`` and check it with :func:`check_images`.

Objectives, recipes, the engine and the evaluators only use the protocol; none of them asks
which family it got. A family registers itself with :func:`register_family` when its module is
imported; :data:`FAMILY_MODULES` lists the modules :func:`load_model` imports first.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from ..config import StrictModel
from ..diffusion.samplers import SampleResult
from ..diffusion.schedules import sampling_grid
from ..errors import UserError
from .backbones import Conditioning
from .denoiser import Denoiser

ASSETS = Path(__file__).resolve().parent.parent / "assets"
#: Models shipped inside the package, loadable by name.
SHIPPED = {"toy-teacher": ASSETS / "toy-teacher", "toy-teacher-i2v": ASSETS / "toy-teacher-i2v"}
#: Modules that register the built-in families (imported on the first lookup).
FAMILY_MODULES = ("fewstep.models.pipeline", "fewstep.models.diffusers_family")


class SamplingConfig(StrictModel):
    """How a model samples by default (the CLI may override steps/cfg)."""

    sampler: Literal["euler", "ddim", "consistency"] = "euler"
    steps: int = Field(50, ge=1)
    times: list[float] | None = Field(
        None, description="explicit decreasing times ending at 0 (students); overrides steps")
    cfg_scale: float | None = Field(None, description="CFG scale w in uncond + w·(cond − uncond); None = no CFG")
    spacing: Literal["uniform", "diffusers"] = Field(
        "uniform", description="grid of an N-step sample without explicit times (diffusion/schedules.sampling_grid)")


class SamplingMixin:
    """The step grid of a model with ``sampling`` (a :class:`SamplingConfig`) and ``denoiser``."""

    def sampling_times(self, steps: int | None = None) -> Tensor:
        """Times the sampler visits: the model's explicit ``sampling.times`` (a student's own grid)
        when ``steps`` is None or equals that grid's step count, else ``sampling_grid`` with the
        model's spacing (:meth:`grid_name` says which)."""
        cfg = self.sampling
        if cfg.times is not None and steps in (None, len(cfg.times) - 1):
            return torch.tensor(cfg.times, dtype=torch.float64)
        return sampling_grid(self.denoiser.schedule, steps or cfg.steps, cfg.spacing)

    def grid_name(self, steps: int | None = None) -> str:
        """Which grid :meth:`sampling_times` uses: ``"model"`` (its own times) or the spacing."""
        cfg = self.sampling
        return "model" if cfg.times is not None and steps in (None, len(cfg.times) - 1) else cfg.spacing

    def default_steps(self) -> int:
        """The step count this model samples with when none is asked for."""
        return len(self.sampling_times(None)) - 1


class Geometry(NamedTuple):
    """Decoded clip size: ``frames`` T, ``height`` H, ``width`` W of ``(B, T, H, W, 3)`` frames."""

    frames: int
    height: int
    width: int


@runtime_checkable
class VideoModel(Protocol):
    """A loadable text-to-video model (an ``nn.Module``: ``to``, ``eval``, ``parameters`` …).

    ``denoiser`` is the network a distillation run copies into its roles; ``denoisers()`` names
    every denoiser the model samples with (one for most families; Wan 2.2's two experts, which
    ``denoiser`` routes between by t: models/experts.py).
    Frames are ``(B, T, H, W, 3)``: float in [−1, 1] for :meth:`encode`/:meth:`decode`, uint8 from
    :meth:`generate`; latents are ``(B, C, T', H', W')``.
    """

    denoiser: Denoiser
    sampling: SamplingConfig  # the default sampler; assignable (an exported student sets its own)

    # -- what objectives and recipes read --------------------------------------------------------
    @property
    def geometry(self) -> Geometry: ...  # decoded clip size
    def set_geometry(self, frames: int | None = None, height: int | None = None,
                     width: int | None = None) -> None: ...  # another clip size, or a one-line error
    @property
    def text_dim(self) -> int: ...  # width D of the caption tokens (B, L, D)
    @property
    def hidden_dim(self) -> int: ...  # the denoiser's hidden width (feature heads)
    def denoisers(self) -> dict[str, Denoiser]: ...

    # -- conditioning and latents ------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> Conditioning: ...  # "" is the unconditional prompt
    def null_condition(self, batch: int) -> Conditioning: ...
    @property
    def image_conditioned(self) -> bool: ...  # an image-to-video model (sampling needs images=)
    def encode_images(self, images: Tensor) -> dict[str, Tensor]: ...  # visual extras; module doc
    def latent_shape(self, batch: int) -> tuple[int, int, int, int, int]: ...
    def encode(self, frames: Tensor) -> Tensor: ...  # (B, T, H, W, 3) in [−1, 1] → (B, C, T', H', W')
    def decode(self, latents: Tensor) -> Tensor: ...  # (B, C, T', H', W') → (B, T, H, W, 3) in [−1, 1]

    # -- sampling ----------------------------------------------------------------------------------
    def sampling_times(self, steps: int | None = None) -> Tensor: ...
    def grid_name(self, steps: int | None = None) -> str: ...
    def default_steps(self) -> int: ...
    def sample_latents(self, prompts: list[str], *, steps: int | None = None, cfg_scale: float | None = None,
                       sampler: str | None = None, seed: int | None = None, noise: Tensor | None = None,
                       return_trajectory: bool = False, negative_prompt: str | None = None,
                       images: Tensor | None = None) -> SampleResult: ...
    def generate(self, prompts: list[str], **kwargs) -> tuple[np.ndarray, SampleResult]: ...

    # -- persistence -------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path: ...
    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> "VideoModel": ...


def no_image_input(model: object) -> UserError:
    """The one-line error of a text-to-video model given a condition image."""
    return UserError(f"--image: {type(model).__name__} is a text-to-video model; it takes no condition image "
                     f"(give an image-to-video model, or drop --image)")


def check_images(model: VideoModel, images: Tensor | None, batch: int) -> Tensor | None:
    """``images=`` of ``sample_latents``: ``(batch, H, W, 3)`` float at the model's geometry for an
    image-to-video model (missing: a one-line error naming ``--image``), None for a text-to-video one."""
    if not model.image_conditioned:
        if images is not None:
            raise no_image_input(model)
        return None
    if images is None:
        raise UserError("this model is image-to-video: give the condition image (--image FILE)")
    _, height, width = model.geometry
    if tuple(images.shape) != (batch, height, width, 3) or not images.is_floating_point():
        raise UserError(f"--image: condition images have shape {tuple(images.shape)} ({images.dtype}); expected "
                        f"({batch}, {height}, {width}, 3) float in [-1, 1] (one per prompt, the model's height × width)")
    return images


# ---------------------------------------------------------------------------------------------
# Families
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Family:
    """A model family: ``detect(directory)`` says whether a directory holds one of its models
    (it may raise a one-line :class:`UserError` when the file it recognises is unreadable);
    ``model.load(directory, device)`` loads it. ``expects`` names what ``detect`` looks for."""

    name: str
    detect: Callable[[Path], bool]
    model: type[nn.Module]
    expects: str


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    assert FAMILIES.get(family.name, family) == family, f"model family {family.name!r} registered twice"
    FAMILIES[family.name] = family
    return family


def _families() -> list[Family]:
    for module in FAMILY_MODULES:
        importlib.import_module(module)
    return list(FAMILIES.values())


def resolve_model(name_or_dir: str | Path) -> Path:
    """A shipped model's directory, or ``name_or_dir`` itself when it is a directory."""
    if str(name_or_dir) in SHIPPED:
        directory = SHIPPED[str(name_or_dir)]
        if not directory.is_dir():
            raise UserError(f"the shipped model {name_or_dir!r} is missing from this install "
                            f"(expected {directory}); run `fewstep pretrain` to build it")
        return directory
    directory = Path(name_or_dir)
    if not directory.is_dir():
        raise _not_a_model(name_or_dir)
    return directory


def _expected() -> str:
    return "expected " + " or ".join(f"{f.expects} ({f.name})" for f in _families())


def _not_a_model(name_or_dir: str | Path) -> UserError:
    return UserError(f"--model {name_or_dir}: not a shipped model ({', '.join(SHIPPED)}) nor a model directory "
                     f"({_expected()})")


def model_family(name_or_dir: str | Path) -> Family:
    """The family whose ``detect`` recognises the model (first registered wins)."""
    directory = resolve_model(name_or_dir)
    for family in _families():
        if family.detect(directory):
            return family
    if str(name_or_dir) in SHIPPED:
        raise UserError(f"the shipped model {name_or_dir!r} is incomplete in this install ({directory}: "
                        f"{_expected()}); run `fewstep pretrain` to build it")
    raise _not_a_model(name_or_dir)


def load_model(name_or_dir: str | Path, device: str | torch.device = "cpu") -> VideoModel:
    """Load a shipped model by name or a model directory of any registered family (eval mode)."""
    return model_family(name_or_dir).model.load(resolve_model(name_or_dir), device)
