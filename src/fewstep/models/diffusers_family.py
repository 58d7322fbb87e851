"""The diffusers family of the pipeline seam (:mod:`fewstep.models.family`): a local diffusers pipeline.

A directory with a diffusers ``model_index.json`` is a :class:`DiffusersVideoModel` when its
``_class_name`` is a supported pipeline (:data:`SPECS`); any other class is a one-line error
naming it and the supported ones. Nothing is downloaded: components load with
``from_pretrained(..., local_files_only=True)``. What fewstep adds sits beside the pipeline's own
files in ``fewstep_model.json`` (the clip geometry, the default sampler and, for a distilled
student, its times), so ``fewstep generate --model RUN/student`` samples as the student was trained.

``WanPipeline`` (Wan 2.1 T2V)
    UMT5 captions encoded as the pipeline encodes them: padded to ``max_sequence_length``
    (default 512; the padding length changes Wan's outputs) with zeros after the real tokens.
    ``AutoencoderKLWan`` latents normalised per channel, ``z = (z_vae − latents_mean) / latents_std``
    (the pipeline's decode inverts exactly this). Flow matching with the scheduler's shift
    (``shift`` of ``FlowMatchEulerDiscreteScheduler``, ``flow_shift`` of ``UniPCMultistepScheduler``),
    ``flow`` prediction. The default sampler is Euler on the diffusers grid
    (:func:`~fewstep.diffusion.schedules.sampling_grid` ``spacing="diffusers"``), which reproduces
    ``FlowMatchEulerDiscreteScheduler`` step for step; a teacher saved with UniPC is sampled by
    Euler on the same sigmas (fewstep's samplers are its own).

Geometry: frames ``T = 4k + 1`` (the VAE's temporal factor 4), height and width multiples of the
VAE's spatial factor times the transformer's patch (16 for Wan): other sizes are one-line errors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from ..config import StrictModel, parse_config
from ..diffusion.samplers import SAMPLERS, SampleResult
from ..diffusion.schedules import FlowMatching, Schedule, sampling_grid
from ..errors import UserError
from ..utils.frames import to_uint8
from ..utils.io import atomic_directory, read_json
from .backbones import Conditioning, WanBackbone
from .denoiser import Denoiser, cfg_active
from .family import Family, Geometry, SamplingConfig, register_family

SETTINGS_FILE = "fewstep_model.json"
INDEX_FILE = "model_index.json"


class DiffusersSettings(StrictModel):
    """``fewstep_model.json``: what fewstep keeps beside a diffusers pipeline's own files."""

    kind: str = Field("diffusers", description="marks the file as fewstep's")
    frames: int = Field(ge=1, description="decoded frames T of a clip")
    height: int = Field(ge=1)
    width: int = Field(ge=1)
    max_sequence_length: int = Field(ge=1, description="caption tokens, padded as the diffusers pipeline pads")
    negative_prompt: str = Field("", description="the unconditional caption of CFG")
    sampling: SamplingConfig


# ---------------------------------------------------------------------------------------------
# What differs between pipeline classes
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PipelineSpec:
    """One supported diffusers pipeline class: defaults, and the functions that differ per class."""

    pipeline: str  # diffusers class name
    backbone: Callable[[Any], nn.Module]  # transformer → Backbone adapter
    prediction_type: str
    defaults: dict[str, Any]  # DiffusersSettings defaults (geometry, caption length, sampling)
    schedule: Callable[[Any], Schedule]  # scheduler → Schedule
    encode_prompts: Callable[["DiffusersVideoModel", list[str]], Conditioning]
    check_geometry: Callable[["DiffusersVideoModel", int, int, int], None]
    latent_shape: Callable[["DiffusersVideoModel", int], tuple[int, int, int, int, int]]
    encode: Callable[["DiffusersVideoModel", Tensor], Tensor]  # video (B, 3, T, H, W) → latents
    decode: Callable[["DiffusersVideoModel", Tensor], Tensor]  # latents → video (B, 3, T, H, W)


def _flow_shift(scheduler) -> FlowMatching:
    cfg = scheduler.config
    if cfg.get("use_dynamic_shifting", False):
        raise UserError(f"scheduler {type(scheduler).__name__} uses dynamic (resolution-dependent) shifting, which "
                        f"fewstep does not model; save the pipeline with a fixed shift")
    shift = cfg.get("flow_shift") if cfg.get("flow_shift") is not None else cfg.get("shift", 1.0)
    return FlowMatching(shift=float(shift))


def _wan_prompts(model: "DiffusersVideoModel", prompts: list[str]) -> Conditioning:
    """Captions as ``WanPipeline._get_t5_prompt_embeds``: padded to the caption length, zeros after the
    real tokens (B, L, D), and the token mask (B, L)."""
    pipe, length = model.pipe, model.settings.max_sequence_length
    device = next(model.text_encoder.parameters()).device
    context = pipe._get_t5_prompt_embeds(list(prompts), max_sequence_length=length, device=device,
                                         dtype=model.dtype)
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    mask = pipe.tokenizer([prompt_clean(p) for p in prompts], padding="max_length", max_length=length,
                          truncation=True, add_special_tokens=True, return_tensors="pt").attention_mask
    return Conditioning(context, mask.to(device=device, dtype=torch.bool))


def _wan_factors(model: "DiffusersVideoModel") -> tuple[int, int, int]:
    """(temporal, spatial) VAE factors and the transformer's spatial patch."""
    vae, patch = model.vae.config, model.transformer.config.patch_size
    return 2 ** sum(vae.temperal_downsample), 2 ** len(vae.temperal_downsample), patch[1]


def _wan_check(model: "DiffusersVideoModel", frames: int, height: int, width: int) -> None:
    temporal, spatial, patch = _wan_factors(model)
    if (frames - 1) % temporal:
        raise UserError(f"--frames {frames}: this model's VAE takes {temporal}k + 1 frames (e.g. "
                        f"{(frames - 1) // temporal * temporal + 1} or {((frames - 1) // temporal + 1) * temporal + 1})")
    for name, size in (("height", height), ("width", width)):
        if size % (spatial * patch):
            raise UserError(f"--{name} {size}: must be a multiple of {spatial * patch} (the VAE's factor {spatial} × "
                            f"the transformer's patch {patch})")


def _wan_latent_shape(model: "DiffusersVideoModel", batch: int) -> tuple[int, int, int, int, int]:
    temporal, spatial, _ = _wan_factors(model)
    s = model.settings
    return batch, model.vae.config.z_dim, (s.frames - 1) // temporal + 1, s.height // spatial, s.width // spatial


def _wan_stats(model: "DiffusersVideoModel", like: Tensor) -> tuple[Tensor, Tensor]:
    cfg = model.vae.config
    shape = (1, cfg.z_dim, 1, 1, 1)
    mean = torch.tensor(cfg.latents_mean, device=like.device, dtype=torch.float32).view(shape)
    std = torch.tensor(cfg.latents_std, device=like.device, dtype=torch.float32).view(shape)
    return mean, std


def _wan_encode(model: "DiffusersVideoModel", video: Tensor) -> Tensor:
    """``z = (mode(E(video)) − mean) / std``: the normalised latents the transformer works in."""
    z = model.vae.encode(video.to(model.vae.dtype)).latent_dist.mode().float()
    mean, std = _wan_stats(model, z)
    return (z - mean) / std


def _wan_decode(model: "DiffusersVideoModel", latents: Tensor) -> Tensor:
    mean, std = _wan_stats(model, latents)
    z = latents.float() * std + mean  # WanPipeline: latents / (1 / std) + mean
    return model.vae.decode(z.to(model.vae.dtype), return_dict=False)[0].float()


WAN = PipelineSpec(
    pipeline="WanPipeline", backbone=WanBackbone, prediction_type="flow",
    defaults={"frames": 81, "height": 480, "width": 832, "max_sequence_length": 512, "negative_prompt": "",
              "sampling": {"sampler": "euler", "steps": 50, "cfg_scale": 5.0, "spacing": "diffusers"}},
    schedule=_flow_shift, encode_prompts=_wan_prompts, check_geometry=_wan_check, latent_shape=_wan_latent_shape,
    encode=_wan_encode, decode=_wan_decode)

#: Supported pipeline classes by ``model_index.json``'s ``_class_name``.
SPECS: dict[str, PipelineSpec] = {spec.pipeline: spec for spec in (WAN,)}


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

class DiffusersVideoModel(nn.Module):
    """A :class:`~fewstep.models.family.VideoModel` around a local diffusers pipeline (module doc).

    ``transformer``, ``vae`` and ``text_encoder`` are its submodules (``.to`` moves them); ``pipe`` is
    the diffusers pipeline object holding the same components, used for its own prompt encoding
    and for saving.
    """

    prompt_grammar = None  # any text

    def __init__(self, pipe, spec: PipelineSpec, settings: DiffusersSettings):
        super().__init__()
        self.spec, self.settings = spec, settings
        self.transformer, self.vae, self.text_encoder = pipe.transformer, pipe.vae, pipe.text_encoder
        object.__setattr__(self, "pipe", pipe)  # not a submodule: its components are registered above
        self.denoiser = Denoiser(spec.backbone(pipe.transformer), spec.schedule(pipe.scheduler), spec.prediction_type)
        spec.check_geometry(self, settings.frames, settings.height, settings.width)

    # ---------------------------------------------------------------------------- what the seam exposes
    @property
    def sampling(self) -> SamplingConfig:
        return self.settings.sampling

    @sampling.setter
    def sampling(self, sampling: SamplingConfig) -> None:
        self.settings = self.settings.model_copy(update={"sampling": sampling})

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.settings.frames, self.settings.height, self.settings.width)

    def set_geometry(self, frames: int | None = None, height: int | None = None, width: int | None = None) -> None:
        """Sample or encode clips of another size (checked against the VAE and patch factors)."""
        frames, height, width = (frames or self.settings.frames, height or self.settings.height,
                                 width or self.settings.width)
        self.spec.check_geometry(self, frames, height, width)
        self.settings = self.settings.model_copy(update={"frames": frames, "height": height, "width": width})

    @property
    def text_dim(self) -> int:
        return int(self.text_encoder.config.d_model)

    @property
    def hidden_dim(self) -> int:
        cfg = self.transformer.config
        return int(cfg.num_attention_heads * cfg.attention_head_dim)

    def denoisers(self) -> dict[str, Denoiser]:
        return {"transformer": self.denoiser}

    # ---------------------------------------------------------------------------- conditioning, latents
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        return self.spec.encode_prompts(self, list(prompts))

    def null_condition(self, batch: int) -> Conditioning:
        return self.encode_prompts([self.settings.negative_prompt] * batch)

    def latent_shape(self, batch: int) -> tuple[int, int, int, int, int]:
        return self.spec.latent_shape(self, batch)

    def encode(self, frames: Tensor) -> Tensor:
        """Frames ``(B, T, H, W, 3)`` in [−1, 1] → normalised latents ``(B, C, T', H', W')``."""
        return self.spec.encode(self, frames.permute(0, 4, 1, 2, 3))

    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``(B, C, T', H', W')`` → frames ``(B, T, H, W, 3)`` in [−1, 1]."""
        return self.spec.decode(self, latents).clamp(-1, 1).permute(0, 2, 3, 4, 1)

    # ---------------------------------------------------------------------------- sampling
    def sampling_times(self, steps: int | None = None) -> Tensor:
        cfg = self.settings.sampling
        if cfg.times is not None and steps in (None, len(cfg.times) - 1):
            return torch.tensor(cfg.times, dtype=torch.float64)
        return sampling_grid(self.denoiser.schedule, steps or cfg.steps, cfg.spacing)

    def grid_name(self, steps: int | None = None) -> str:
        cfg = self.settings.sampling
        return "model" if cfg.times is not None and steps in (None, len(cfg.times) - 1) else cfg.spacing

    def default_steps(self) -> int:
        return len(self.sampling_times(None)) - 1

    @torch.no_grad()
    def sample_latents(self, prompts: list[str], *, steps: int | None = None, cfg_scale: float | None = None,
                       sampler: str | None = None, seed: int | None = None, noise: Tensor | None = None,
                       return_trajectory: bool = False, negative_prompt: str | None = None) -> SampleResult:
        """Sample normalised latents; ``cfg_scale`` defaults to the model's own (1 or None: no CFG)."""
        sampling = self.settings.sampling
        sampler = sampler or sampling.sampler
        if sampler not in SAMPLERS:
            raise UserError(f"sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}")
        cfg_scale = sampling.cfg_scale if cfg_scale is None else cfg_scale
        device = next(self.transformer.parameters()).device
        generator = torch.Generator(device="cpu").manual_seed(0 if seed is None else seed)
        if noise is None:
            noise = torch.randn(self.latent_shape(len(prompts)), generator=generator)
        noise = noise.to(device=device, dtype=torch.float32)
        cond = self.encode_prompts(prompts)
        uncond = None
        if cfg_active(cfg_scale):
            negative = self.settings.negative_prompt if negative_prompt is None else negative_prompt
            uncond = self.encode_prompts([negative] * len(prompts))
        kwargs = {"cfg_scale": cfg_scale, "uncond": uncond, "return_trajectory": return_trajectory}
        if sampler == "consistency":
            kwargs["generator"] = generator
        return SAMPLERS[sampler](self.denoiser, noise, self.sampling_times(steps), cond, **kwargs)

    @torch.no_grad()
    def generate(self, prompts: list[str], **kwargs) -> tuple[np.ndarray, SampleResult]:
        result = self.sample_latents(prompts, **kwargs)
        return to_uint8(self.decode(result.x)).cpu().numpy(), result

    # ---------------------------------------------------------------------------- persistence
    def save(self, directory: str | Path) -> Path:
        """The diffusers pipeline (``save_pretrained``) and ``fewstep_model.json``, written atomically."""
        with atomic_directory(directory) as tmp:
            self.pipe.save_pretrained(tmp, safe_serialization=True)
            (tmp / SETTINGS_FILE).write_text(json.dumps(self.settings.model_dump(mode="json"), indent=2))
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None) -> "DiffusersVideoModel":
        directory = Path(directory)
        spec = pipeline_spec(directory)
        raw = dict(spec.defaults)
        if (directory / SETTINGS_FILE).is_file():
            saved = read_json(directory / SETTINGS_FILE, f"model {directory / SETTINGS_FILE}")
            if not isinstance(saved, dict):
                raise UserError(f"model {directory / SETTINGS_FILE} must hold a JSON object")
            raw.update(saved)
        settings = parse_config(DiffusersSettings, raw)
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()  # one-line output: no loading bars on stderr
        transformers.utils.logging.disable_progress_bar()
        try:
            pipe = getattr(diffusers, spec.pipeline).from_pretrained(directory, local_files_only=True, torch_dtype=dtype)
        except (OSError, ValueError, EnvironmentError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"model {directory}: the {spec.pipeline} could not be loaded ({first})") from None
        finally:
            diffusers.utils.logging.enable_progress_bar()
            transformers.utils.logging.enable_progress_bar()
        return cls(pipe, spec, settings).to(device).eval()


def pipeline_class(directory: Path) -> str:
    """``_class_name`` of a diffusers ``model_index.json`` (unreadable: a one-line error)."""
    index = read_json(directory / INDEX_FILE, f"model {directory / INDEX_FILE}")
    name = index.get("_class_name") if isinstance(index, dict) else None
    if not isinstance(name, str):
        raise UserError(f"model {directory / INDEX_FILE} names no pipeline class (_class_name)")
    return name


def pipeline_spec(directory: Path) -> PipelineSpec:
    name = pipeline_class(directory)
    if name not in SPECS:
        raise UserError(f"model {directory}: diffusers pipeline class {name!r} is not supported; supported: "
                        f"{', '.join(SPECS)}")
    return SPECS[name]


def is_diffusers_model(directory: Path) -> bool:
    """The family's ``detect``: a diffusers ``model_index.json``."""
    return (directory / INDEX_FILE).is_file()


DIFFUSERS = register_family(Family("diffusers", is_diffusers_model, DiffusersVideoModel,
                                   f"{INDEX_FILE} of a diffusers pipeline ({', '.join(SPECS)})"))
