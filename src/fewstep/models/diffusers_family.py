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

``WanPipeline`` with ``transformer_2`` and ``boundary_ratio`` (Wan 2.2 A14B T2V)
    Two experts as one denoiser (:mod:`fewstep.models.experts`): a sample whose model timestep is at least
    ``boundary_ratio · num_train_timesteps`` goes to ``transformer`` (high noise), any other to
    ``transformer_2`` (low noise), each sample by its own timestep; the low-noise expert's CFG scale is
    ``guidance_scale_2`` (``fewstep_model.json``; None: the call's scale, as the pipeline's default).
    Both experts load on first use. Not Wan-specific: any pipeline here whose config has a
    ``boundary_ratio`` and whose index a ``transformer_2`` denoises so.

``CogVideoXPipeline`` (CogVideoX 1.0 and 1.5 T2V)
    T5 captions as ``_get_t5_prompt_embeds``: padded to ``max_sequence_length`` (default 226), no mask
    (the transformer attends to the padding too). ``z = mode(E(video)) · scaling_factor``, decode
    divides. :class:`~fewstep.models.backbones.CogVideoXBackbone` permutes to the transformer's
    ``(B, F, C, H, W)`` and computes the pipeline's rotary embeddings. The VP schedule of the scheduler's
    config (betas, ``snr_shift_scale``, ``rescale_betas_zero_snr``; :class:`~fewstep.diffusion.schedules.VPDiscrete`)
    and its ``prediction_type``; default DDIM (η = 0), 50 steps on the trailing grid, CFG 6. CogVideoX 1.5
    (``patch_size_t``) pads the latent frames in front to a multiple of it, as the pipeline does:
    ``latent_shape`` includes the padding, decode drops it, encode fills it with the first latent frames
    (as ``CogVideoXImageToVideoPipeline`` pads its image latents).
    Deviations: a ``CogVideoXDPMScheduler`` (or non-trailing spacing) teacher loads with the same schedule
    but samples with DDIM on the trailing grid (the DPM-Solver's stochastic multistep update is not
    modelled); diffusers' DDIM steps from ``k`` to ``k − ⌊1000/N⌋``, which is the next trailing timestep
    only when N divides 1000 (4, 5, 10, 20, 50, …), while fewstep always steps to the next grid time; encode
    takes the posterior's mode where CogVideoX's video-to-video pipeline draws a sample (the seam's encode
    is deterministic); dynamic CFG (off by default) is not modelled.

``HunyuanVideoPipeline`` (HunyuanVideo T2V)
    Captions as ``encode_prompt``: Llama states in the ``prompt_template`` (default the pipeline's),
    ``crop_start`` template tokens cropped, padded to ``max_sequence_length`` (default 256) with a mask
    (B, L), and CLIP's pooled projection as ``cond.extra["pooled_projections"]`` (B, D_clip).
    ``embedded_guidance_scale`` (default 6) is an input of the guidance-distilled transformer, not CFG;
    ``cfg_scale`` defaults to 1 and, when set, is the pipeline's ``true_cfg_scale`` with the negative
    prompt. ``z = mode(E(video)) · scaling_factor`` (the mode, as its image-to-video pipeline encodes),
    decode divides. Flow matching with the scheduler's shift (7); the pipeline's sigmas ``1 − i/N``,
    shifted by the scheduler, are ``sampling_grid`` ``"uniform"``.

Geometry: frames ``T = 4k + 1`` (the VAE's temporal factor 4; ``8k + 1`` for CogVideoX, whose VAE decodes
an even number of latent frames to ``4k`` frames), height and width multiples of the VAE's spatial factor
times the transformer's patch (16 for all three): other sizes are one-line errors. Without
``fewstep_model.json`` the clip size, caption length and sampling are the pipeline's own defaults.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from ..config import StrictModel, parse_config
from ..diffusion.samplers import SAMPLERS, SampleResult
from ..diffusion.schedules import FlowMatching, Schedule, VPDiscrete
from ..errors import UserError
from ..utils.frames import to_uint8
from ..utils.io import atomic_directory, read_json
from .backbones import CogVideoXBackbone, Conditioning, HunyuanVideoBackbone, WanBackbone
from .experts import ExpertBackbone
from .denoiser import Denoiser, cfg_active
from .family import Family, Geometry, SamplingConfig, SamplingMixin, check_images, no_image_input, register_family

SETTINGS_FILE = "fewstep_model.json"
INDEX_FILE = "model_index.json"


class PromptTemplate(StrictModel):
    """HunyuanVideo's Llama prompt template (the pipeline's ``prompt_template`` argument)."""

    template: str = Field(description="the text around the caption, which goes where '{}' is")
    crop_start: int | None = Field(None, ge=0, description="template tokens dropped from the encoder's states; "
                                                           "None: counted as the pipeline counts them")

    @field_validator("template")
    @classmethod
    def _has_slot(cls, template: str) -> str:
        if "{}" not in template:
            raise ValueError("must contain '{}' where the caption goes")
        return template


class DiffusersSettings(StrictModel):
    """``fewstep_model.json``: what fewstep keeps beside a diffusers pipeline's own files."""

    kind: str = Field("diffusers", description="marks the file as fewstep's")
    frames: int = Field(ge=1, description="decoded frames T of a clip")
    height: int = Field(ge=1)
    width: int = Field(ge=1)
    max_sequence_length: int = Field(ge=1, description="caption tokens, padded as the diffusers pipeline pads")
    negative_prompt: str = Field("", description="the unconditional caption of CFG")
    sampling: SamplingConfig
    embedded_guidance_scale: float | None = Field(
        None, description="HunyuanVideo: the guidance scale the guidance-distilled transformer takes as an input "
                          "(not CFG)")
    prompt_template: PromptTemplate | None = Field(
        None, description="HunyuanVideo: the Llama prompt template; None: the pipeline's default")
    guidance_scale_2: float | None = Field(
        None, description="Wan 2.2: the low-noise expert's (transformer_2's) CFG scale in a guided call; None: the "
                          "call's scale (WanPipeline's guidance_scale_2)")


# ---------------------------------------------------------------------------------------------
# What differs between pipeline classes
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PipelineSpec:
    """One supported diffusers pipeline class: defaults, and the functions that differ per class."""

    pipeline: str  # diffusers class name
    backbone: Callable[[Any, DiffusersSettings], nn.Module]  # (transformer, settings) → Backbone adapter
    schedule: Callable[[Any], tuple[Schedule, str]]  # scheduler → (Schedule, prediction type)
    defaults: dict[str, Any]  # DiffusersSettings defaults (geometry, caption length, sampling)
    encode_prompts: Callable[["DiffusersVideoModel", list[str]], Conditioning]
    check_geometry: Callable[["DiffusersVideoModel", int, int, int], None]
    latent_shape: Callable[["DiffusersVideoModel", int], tuple[int, int, int, int, int]]
    encode: Callable[["DiffusersVideoModel", Tensor], Tensor]  # video (B, 3, T, H, W) → latents
    decode: Callable[["DiffusersVideoModel", Tensor], Tensor]  # latents → video (B, 3, T, H, W)
    text_dim: Callable[[Any], int] = lambda config: int(config.d_model)  # text encoder config → D of (B, L, D)
    pipeline_defaults: Callable[[Any, Any], dict[str, Any]] = lambda transformer_config, vae_config: {}  # from configs
    check_settings: Callable[[Any, Any], None] = lambda transformer_config, settings: None  # before loading
    settings_keys: tuple[str, ...] = ()  # the optional DiffusersSettings keys this class reads
    check_pipeline: Callable[[Any], None] = lambda pipe: None  # the loaded pipeline object, at load
    # image-to-video classes (models/diffusers_i2v.py): images (B, H, W, 3) in [−1, 1] → the visual extras
    encode_images: Callable[["DiffusersVideoModel", Tensor], dict[str, Tensor]] | None = None


def _check_clip(frames: int, height: int, width: int, temporal: int, spatial: int, patch: int) -> None:
    """Frames ``temporal·k + 1``; height and width multiples of the VAE's ``spatial`` factor × ``patch``."""
    if (frames - 1) % temporal:
        raise UserError(f"--frames {frames}: this model's VAE takes {temporal}k + 1 frames (e.g. "
                        f"{(frames - 1) // temporal * temporal + 1} or {((frames - 1) // temporal + 1) * temporal + 1})")
    for name, size in (("height", height), ("width", width)):
        if size % (spatial * patch):
            raise UserError(f"--{name} {size}: must be a multiple of {spatial * patch} (the VAE's factor {spatial} × "
                            f"the transformer's patch {patch})")


def _flow_shift(scheduler) -> FlowMatching:
    cfg = scheduler.config
    if cfg.get("use_dynamic_shifting", False):
        raise UserError(f"scheduler {type(scheduler).__name__} uses dynamic (resolution-dependent) shifting, which "
                        f"fewstep does not model; save the pipeline with a fixed shift")
    shift = cfg.get("flow_shift") if cfg.get("flow_shift") is not None else cfg.get("shift", 1.0)
    return FlowMatching(shift=float(shift))


def _wan_prompts(model: "DiffusersVideoModel", prompts: list[str]) -> Conditioning:
    """Captions as ``WanPipeline._get_t5_prompt_embeds``: padded to the caption length, zeros after the
    real tokens (B, L, D), and the token mask (B, L). ``WanPipeline``'s own method for every Wan class (the I2V
    pipeline's copy of it requires ftfy; this one cleans with ftfy when it is installed)."""
    from diffusers import WanPipeline
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    pipe, length = model.pipe, model.settings.max_sequence_length
    device = next(model.text_encoder.parameters()).device
    context = WanPipeline._get_t5_prompt_embeds(pipe, list(prompts), max_sequence_length=length, device=device,
                                                dtype=model.dtype)

    mask = pipe.tokenizer([prompt_clean(p) for p in prompts], padding="max_length", max_length=length,
                          truncation=True, add_special_tokens=True, return_tensors="pt").attention_mask
    return Conditioning(context, mask.to(device=device, dtype=torch.bool))


def _wan_factors(model: "DiffusersVideoModel") -> tuple[int, int, int]:
    """(temporal, spatial) VAE factors and the transformer's spatial patch."""
    vae, patch = model.config_of("vae"), model.config_of("transformer").patch_size
    return 2 ** sum(vae.temperal_downsample), 2 ** len(vae.temperal_downsample), patch[1]


def _wan_check(model: "DiffusersVideoModel", frames: int, height: int, width: int) -> None:
    _check_clip(frames, height, width, *_wan_factors(model))


def _wan_latent_shape(model: "DiffusersVideoModel", batch: int) -> tuple[int, int, int, int, int]:
    temporal, spatial, _ = _wan_factors(model)
    s = model.settings
    return batch, model.config_of("vae").z_dim, (s.frames - 1) // temporal + 1, s.height // spatial, s.width // spatial


def _wan_stats(model: "DiffusersVideoModel", like: Tensor) -> tuple[Tensor, Tensor]:
    cfg = model.config_of("vae")
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
    pipeline="WanPipeline", backbone=lambda transformer, settings: WanBackbone(transformer),
    schedule=lambda scheduler: (_flow_shift(scheduler), "flow"),
    defaults={"frames": 81, "height": 480, "width": 832, "max_sequence_length": 512, "negative_prompt": "",
              "sampling": {"sampler": "euler", "steps": 50, "cfg_scale": 5.0, "spacing": "diffusers"}},
    encode_prompts=_wan_prompts, check_geometry=_wan_check, latent_shape=_wan_latent_shape,
    encode=_wan_encode, decode=_wan_decode)


# ---------------------------------------------------------------------------------------------
# CogVideoX
# ---------------------------------------------------------------------------------------------

#: diffusers' ``prediction_type`` → fewstep's (diffusion/parameterization.py)
VP_PREDICTION_TYPES = {"v_prediction": "v", "epsilon": "eps", "sample": "x0"}


def _vp_schedule(scheduler) -> tuple[VPDiscrete, str]:
    """The DDPM VP schedule of a (CogVideoX) DDIM/DPM scheduler's config, and its prediction type.

    ``ᾱ`` as ``CogVideoXDDIMScheduler.__init__``: betas, SNR shift ``snr_shift_scale``, then
    ``rescale_betas_zero_snr`` (:class:`~fewstep.diffusion.schedules.VPDiscrete`); or ``trained_betas``
    as given (an exported consistency student's ``LCMScheduler``, :mod:`fewstep.export`).
    """
    cfg, name = scheduler.config, type(scheduler).__name__
    trained = cfg.get("trained_betas")
    if trained is None and cfg.get("beta_schedule") not in ("linear", "scaled_linear"):
        raise UserError(f"scheduler {name}: fewstep models linear, scaled_linear or trained betas, not "
                        f"{cfg.get('beta_schedule')!r}")
    if not cfg.get("set_alpha_to_one", True):
        raise UserError(f"scheduler {name}: set_alpha_to_one=false is not modelled (fewstep's t = 0 is the clean "
                        f"sample, ᾱ = 1)")
    prediction = VP_PREDICTION_TYPES.get(cfg.get("prediction_type"))
    if prediction is None:
        raise UserError(f"scheduler {name}: prediction_type must be one of {', '.join(VP_PREDICTION_TYPES)}; "
                        f"got {cfg.get('prediction_type')!r}")
    schedule = VPDiscrete(betas=cfg.get("beta_schedule", "linear"), beta_start=float(cfg["beta_start"]),
                          beta_end=float(cfg["beta_end"]), zero_terminal_snr=bool(cfg.get("rescale_betas_zero_snr")),
                          num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)),
                          snr_shift_scale=float(cfg.get("snr_shift_scale", 1.0)), trained_betas=trained)
    return schedule, prediction


def _cogvideox_backbone(transformer, settings: DiffusersSettings) -> CogVideoXBackbone:
    """The adapter (settings checked by :func:`_cogvideox_settings`)."""
    _cogvideox_settings(transformer.config, settings)
    return CogVideoXBackbone(transformer)


def _cogvideox_settings(cfg, settings: DiffusersSettings) -> None:
    """A model with sin-cos or learned position embeddings takes exactly its caption length."""
    fixed_text = not cfg.use_rotary_positional_embeddings or cfg.use_learned_positional_embeddings
    if fixed_text and settings.max_sequence_length != cfg.max_text_seq_length:
        raise UserError(f"{SETTINGS_FILE}: max_sequence_length {settings.max_sequence_length} does not fit this "
                        f"CogVideoX transformer, whose position embeddings take {cfg.max_text_seq_length} caption "
                        f"tokens")


def _cogvideox_prompts(model: "DiffusersVideoModel", prompts: list[str]) -> Conditioning:
    """Captions as ``CogVideoXPipeline._get_t5_prompt_embeds``: T5 states of the caption padded to the caption
    length (B, L, D). The transformer attends to every position, padding included: no mask."""
    device = next(model.text_encoder.parameters()).device
    context = model.pipe._get_t5_prompt_embeds(list(prompts), max_sequence_length=model.settings.max_sequence_length,
                                               device=device, dtype=model.dtype)
    return Conditioning(context)


def _cogvideox_factors(model: "DiffusersVideoModel") -> tuple[int, int, int]:
    """(temporal, spatial) VAE factors and the transformer's spatial patch, as ``CogVideoXPipeline`` reads them."""
    vae = model.config_of("vae")
    return vae.temporal_compression_ratio, 2 ** (len(vae.block_out_channels) - 1), model.config_of("transformer").patch_size


def _cogvideox_check(model: "DiffusersVideoModel", frames: int, height: int, width: int) -> None:
    """CogVideoX's VAE decodes an odd number T' of latent frames to ``4(T' − 1) + 1`` frames but an even one to
    ``4T'`` (its temporal upsampling keeps the first frame of odd counts only): clips of ``8k + 1`` frames."""
    temporal, spatial, patch = _cogvideox_factors(model)
    _check_clip(frames, height, width, 2 * temporal, spatial, patch)
    cfg = model.config_of("transformer")
    if cfg.patch_size_t is not None and cfg.use_rotary_positional_embeddings:  # 1.5: RoPE sliced from a fixed grid
        for name, size, most in (("height", height, cfg.sample_height * spatial),
                                 ("width", width, cfg.sample_width * spatial)):
            if size > most:
                raise UserError(f"--{name} {size}: this CogVideoX 1.5 transformer's rotary embeddings cover at most "
                                f"{most} (its sample size)")


def _cogvideox_frames(model: "DiffusersVideoModel") -> tuple[int, int]:
    """Latent frames of the clip and the padding frames CogVideoX 1.5 puts in front of them.

    ``CogVideoXPipeline.__call__``: with ``patch_size_t`` the latent frames are padded to a multiple of it.
    """
    temporal, _, _ = _cogvideox_factors(model)
    frames = (model.settings.frames - 1) // temporal + 1
    patch_t = model.config_of("transformer").patch_size_t
    return frames, (-frames) % patch_t if patch_t else 0


def _cogvideox_latent_shape(model: "DiffusersVideoModel", batch: int) -> tuple[int, int, int, int, int]:
    _, spatial, _ = _cogvideox_factors(model)
    frames, pad = _cogvideox_frames(model)
    s = model.settings
    return batch, model.config_of("vae").latent_channels, pad + frames, s.height // spatial, s.width // spatial


def _cogvideox_encode(model: "DiffusersVideoModel", video: Tensor) -> Tensor:
    """``z = mode(E(video)) · scaling_factor`` (B, C, T', H', W'); CogVideoX 1.5's padding frames are the first
    latent frames repeated in front, as ``CogVideoXImageToVideoPipeline`` pads its image latents."""
    z = model.vae.encode(video.to(model.vae.dtype)).latent_dist.mode().float() * model.vae.config.scaling_factor
    patch_t = model.config_of("transformer").patch_size_t
    pad = (-z.shape[2]) % patch_t if patch_t else 0
    return torch.cat([z[:, :, :pad], z], dim=2)  # (B, C, pad + T', H', W')


def _cogvideox_decode(model: "DiffusersVideoModel", latents: Tensor) -> Tensor:
    """``CogVideoXPipeline``: drop the padding frames, ``D(z / scaling_factor)``."""
    frames, pad = _cogvideox_frames(model)
    if latents.shape[2] != pad + frames:
        raise UserError(f"latents with {latents.shape[2]} frames do not fit this model's {model.settings.frames}-frame "
                        f"clips ({pad + frames} latent frames)")
    z = latents[:, :, pad:].float() / model.vae.config.scaling_factor
    return model.vae.decode(z.to(model.vae.dtype)).sample.float()


def _cogvideox_defaults(transformer_config, vae_config) -> dict[str, Any]:
    """The pipeline's own clip size: the transformer's sample size (``CogVideoXPipeline.__call__``)."""
    cfg, spatial = transformer_config, 2 ** (len(vae_config.block_out_channels) - 1)
    return {"frames": cfg.sample_frames, "height": cfg.sample_height * spatial, "width": cfg.sample_width * spatial}


COGVIDEOX = PipelineSpec(
    pipeline="CogVideoXPipeline", backbone=_cogvideox_backbone, schedule=_vp_schedule,
    defaults={"max_sequence_length": 226, "negative_prompt": "",
              "sampling": {"sampler": "ddim", "steps": 50, "cfg_scale": 6.0, "spacing": "diffusers"}},
    encode_prompts=_cogvideox_prompts, check_geometry=_cogvideox_check, latent_shape=_cogvideox_latent_shape,
    encode=_cogvideox_encode, decode=_cogvideox_decode, pipeline_defaults=_cogvideox_defaults,
    check_settings=_cogvideox_settings)


# ---------------------------------------------------------------------------------------------
# HunyuanVideo
# ---------------------------------------------------------------------------------------------

def _hunyuan_backbone(transformer, settings: DiffusersSettings) -> HunyuanVideoBackbone:
    """The adapter, fed ``embedded_guidance_scale`` when the transformer is guidance-distilled."""
    _hunyuan_settings(transformer.config, settings)
    scale = settings.embedded_guidance_scale
    return HunyuanVideoBackbone(transformer, 6.0 if scale is None else scale)


def _hunyuan_settings(cfg, settings: DiffusersSettings) -> None:
    scale = settings.embedded_guidance_scale
    if cfg.guidance_embeds and scale is None:
        raise UserError(f"{SETTINGS_FILE}: embedded_guidance_scale must be set: this HunyuanVideo transformer takes "
                        f"the guidance scale as an input (the pipeline's default is 6.0)")


def _hunyuan_prompts(model: "DiffusersVideoModel", prompts: list[str]) -> Conditioning:
    """Captions as ``HunyuanVideoPipeline.encode_prompt``: Llama states in the prompt template, cropped and padded
    (B, L, D) with their mask (B, L), and CLIP's pooled projection (B, D_clip)."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    s = model.settings
    template = DEFAULT_PROMPT_TEMPLATE if s.prompt_template is None else s.prompt_template.model_dump()
    device = next(model.text_encoder.parameters()).device
    context, pooled, mask = model.pipe.encode_prompt(list(prompts), prompt_template=template, device=device,
                                                     dtype=model.dtype, max_sequence_length=s.max_sequence_length)
    return Conditioning(context, mask.to(dtype=torch.bool), {"pooled_projections": pooled.to(model.dtype)})


def _hunyuan_factors(model: "DiffusersVideoModel") -> tuple[int, int, int]:
    """(temporal, spatial) VAE factors and the transformer's spatial patch, as ``HunyuanVideoPipeline`` reads them."""
    vae = model.config_of("vae")
    return vae.temporal_compression_ratio, vae.spatial_compression_ratio, model.config_of("transformer").patch_size


def _hunyuan_check(model: "DiffusersVideoModel", frames: int, height: int, width: int) -> None:
    _check_clip(frames, height, width, *_hunyuan_factors(model))


def _hunyuan_latent_shape(model: "DiffusersVideoModel", batch: int) -> tuple[int, int, int, int, int]:
    temporal, spatial, _ = _hunyuan_factors(model)
    s = model.settings
    frames = (s.frames - 1) // temporal + 1
    return batch, model.config_of("vae").latent_channels, frames, s.height // spatial, s.width // spatial


def _hunyuan_encode(model: "DiffusersVideoModel", video: Tensor) -> Tensor:
    """``z = mode(E(video)) · scaling_factor`` (B, C, T', H', W')."""
    z = model.vae.encode(video.to(model.vae.dtype)).latent_dist.mode().float()
    return z * model.vae.config.scaling_factor


def _hunyuan_decode(model: "DiffusersVideoModel", latents: Tensor) -> Tensor:
    """``HunyuanVideoPipeline``: ``D(z / scaling_factor)``."""
    z = latents.float() / model.vae.config.scaling_factor
    return model.vae.decode(z.to(model.vae.dtype), return_dict=False)[0].float()


HUNYUAN = PipelineSpec(
    pipeline="HunyuanVideoPipeline", backbone=_hunyuan_backbone,
    schedule=lambda scheduler: (_flow_shift(scheduler), "flow"),
    defaults={"frames": 129, "height": 720, "width": 1280, "max_sequence_length": 256, "negative_prompt": "",
              "embedded_guidance_scale": 6.0,
              "sampling": {"sampler": "euler", "steps": 50, "cfg_scale": 1.0, "spacing": "uniform"}},
    encode_prompts=_hunyuan_prompts, check_geometry=_hunyuan_check, latent_shape=_hunyuan_latent_shape,
    encode=_hunyuan_encode, decode=_hunyuan_decode, text_dim=lambda config: int(config.hidden_size),
    settings_keys=("embedded_guidance_scale", "prompt_template"), check_settings=_hunyuan_settings)

#: Supported pipeline classes by ``model_index.json``'s ``_class_name``.
SPECS: dict[str, PipelineSpec] = {spec.pipeline: spec for spec in (WAN, COGVIDEOX, HUNYUAN)}


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

class _Component:
    """A frozen encoder of the pipeline (``vae``, ``text_encoder``, ``text_encoder_2``), loaded from the
    model's directory the first time it is used (:meth:`DiffusersVideoModel.component`)."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, model, owner=None):
        return self if model is None else model.component(self.name)


class DiffusersVideoModel(SamplingMixin, nn.Module):
    """A :class:`~fewstep.models.family.VideoModel` around a local diffusers pipeline (module doc).

    ``transformer``, ``vae``, ``text_encoder`` (and HunyuanVideo's CLIP ``text_encoder_2``) are its
    submodules (``.to`` moves them); ``pipe`` is the diffusers pipeline object holding the same components,
    used for its own prompt encoding and for saving.

    **Lazy networks.** :meth:`load` loads the tokenizers and the scheduler; the transformer (with the
    :attr:`denoiser` around it), the VAE and the text encoders load on first use onto the model's
    device, frozen. A distillation that reads latents and captions from a cache (``data: {kind:
    latent_cache}``) never loads the encoders, ``fewstep cache`` never loads the transformer; shapes
    come from the configs (:meth:`config_of`), and :meth:`save` copies the files of a network it never
    loaded.
    """

    prompt_grammar = None  # any text
    LAZY = ("transformer", "transformer_2", "vae", "text_encoder", "text_encoder_2", "image_encoder")
    transformer, vae, text_encoder, text_encoder_2 = _Component(), _Component(), _Component(), _Component()
    transformer_2 = _Component()  # Wan 2.2's low-noise expert (models/experts.py)
    image_encoder = _Component()  # Wan 2.1 I2V's CLIP vision encoder (models/diffusers_i2v.py)

    def __init__(self, pipe, spec: PipelineSpec, settings: DiffusersSettings, source: Path | None = None,
                 lazy: dict[str, tuple[str, str]] | None = None, load_dtype: torch.dtype | None = None):
        super().__init__()
        for key in ("embedded_guidance_scale", "prompt_template"):
            if getattr(settings, key) is not None and key not in spec.settings_keys:
                raise UserError(f"{SETTINGS_FILE}: {key} does not apply to a {spec.pipeline}")
        self.spec, self.settings = spec, settings
        self.source, self.load_dtype = source, load_dtype
        self.lazy = {name: entry for name, entry in (lazy or {}).items() if getattr(pipe, name, None) is None}
        self._device = torch.device("cpu")  # where deferred components go (``to`` updates it)
        for name in self.LAZY:
            if getattr(pipe, name, None) is not None:
                self._modules[name] = getattr(pipe, name)  # (add_module would consult the descriptor)
        object.__setattr__(self, "pipe", pipe)  # not a submodule: its components are registered above
        self._schedule = spec.schedule(pipe.scheduler)  # (schedule, prediction type)
        spec.check_settings(self.config_of("transformer"), settings)
        self._check_experts()
        spec.check_pipeline(pipe)
        spec.check_geometry(self, settings.frames, settings.height, settings.width)

    @property
    def denoiser(self) -> Denoiser:
        """The transformer as a :class:`~fewstep.models.denoiser.Denoiser` (built, and the transformer loaded,
        on first use)."""
        if "denoiser" not in self._modules:
            schedule, prediction_type = self._schedule
            backbones = {name: self.spec.backbone(self.component(name), self.settings) for name in self.expert_slots}
            backbone = backbones["transformer"]
            if len(backbones) > 1:  # Wan 2.2: routed by timestep (module doc)
                boundary = self.pipe.config["boundary_ratio"] * self.pipe.scheduler.config.num_train_timesteps
                backbone = ExpertBackbone(backbones, [boundary], [None, self.settings.guidance_scale_2])
            self._modules["denoiser"] = Denoiser(backbone, schedule, prediction_type)
        return self._modules["denoiser"]

    @property
    def expert_slots(self) -> list[str]:
        """The pipeline's transformers from high noise to low: ``["transformer", "transformer_2"]`` for a pipeline
        with a ``boundary_ratio`` (Wan 2.2), else ``["transformer"]``."""
        two = self.pipe.config.get("boundary_ratio") is not None
        return ["transformer", "transformer_2"] if two else ["transformer"]

    def _check_experts(self) -> None:
        has_second = "transformer_2" in self._modules or "transformer_2" in self.lazy
        if self.pipe.config.get("boundary_ratio") is not None and not has_second:
            raise UserError(f"model {self.source}: the pipeline has a boundary_ratio but no transformer_2 (the "
                            f"low-noise expert)")
        if self.settings.guidance_scale_2 is not None and len(self.expert_slots) < 2:
            raise UserError(f"{SETTINGS_FILE}: guidance_scale_2 applies to a two-expert pipeline (Wan 2.2: "
                            f"transformer_2 and boundary_ratio), not to this {self.spec.pipeline}")

    def to(self, *args, **kwargs):
        """``nn.Module.to``; a dtype given also applies to the encoders not loaded yet."""
        device, dtype = torch._C._nn._parse_to(*args, **kwargs)[:2]
        if dtype is not None:
            self.load_dtype = dtype
        if device is not None:
            self._device = torch.device(device)
        return super().to(*args, **kwargs)

    # ---------------------------------------------------------------------------- lazy encoders
    def component(self, name: str) -> nn.Module | None:
        """The pipeline's ``name`` (loading it now if it was deferred); None if the pipeline has none."""
        if name in self._modules:
            return self._modules[name]
        if name not in self.lazy:
            return None
        import diffusers
        import transformers

        library, class_name = self.lazy[name]
        cls = getattr(diffusers if library == "diffusers" else transformers, class_name)
        try:
            with _quiet():
                module = cls.from_pretrained(self.source, subfolder=name, local_files_only=True,
                                             torch_dtype=self.load_dtype)
        except (OSError, ValueError, EnvironmentError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"model {self.source}: its {name} could not be loaded ({first})") from None
        loaded = next(self.parameters(), None)  # a deep copy moved elsewhere knows its device by its tensors
        module = module.to(self._device if loaded is None else loaded.device).eval().requires_grad_(False)
        self._modules[name] = module
        self.pipe.register_modules(**{name: module})
        del self.lazy[name]
        return module

    def with_settings(self, settings: DiffusersSettings) -> "DiffusersVideoModel":
        """The same pipeline (shared components) with other settings (e.g. another embedded guidance)."""
        return DiffusersVideoModel(self.pipe, self.spec, settings, self.source, self.lazy, self.load_dtype)

    def component_checksum(self, name: str) -> str:
        """:func:`~fewstep.data.cache.tensor_checksum` of component ``name``'s weights as stored in the model
        directory's safetensors files (the encoder need not be loaded); a component with no such files
        (built in memory) is checksummed as loaded."""
        from safetensors import safe_open

        from ..data.cache import tensor_checksum

        files = sorted((self.source / name).glob("*.safetensors")) if self.source is not None else []
        if not files:
            state = self.component(name).state_dict()
            return tensor_checksum(list(state), lambda k, rows: (state[k][:rows] if state[k].ndim else state[k],
                                                                 state[k].shape))
        handles = [safe_open(str(f), "pt") for f in files]
        where = {key: h for h in handles for key in h.keys()}

        def get(key: str, rows: int):
            part = where[key].get_slice(key)
            shape = part.get_shape()
            return (part[:rows] if shape else where[key].get_tensor(key)), shape

        return tensor_checksum(list(where), get)

    def config_of(self, name: str):
        """A component's config (attribute access), without loading its weights if it is deferred."""
        if name in self._modules or name not in self.lazy:
            return self.component(name).config
        return _stored_config(self.source, name, self.lazy[name])

    # ---------------------------------------------------------------------------- what the seam exposes
    @property
    def sampling(self) -> SamplingConfig:
        return self.settings.sampling

    @sampling.setter
    def sampling(self, sampling: SamplingConfig) -> None:
        self.settings = self.settings.model_copy(update={"sampling": sampling})

    @property
    def dtype(self) -> torch.dtype:
        """The networks' dtype: the first loaded of transformer, text encoder and VAE, else the dtype asked for."""
        for name in ("transformer", "text_encoder", "vae"):
            if name in self._modules:
                return next(self._modules[name].parameters()).dtype
        return self.load_dtype or torch.float32

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
        return self.spec.text_dim(self.config_of("text_encoder"))

    @property
    def hidden_dim(self) -> int:
        cfg = self.config_of("transformer")
        return int(cfg.num_attention_heads * cfg.attention_head_dim)

    def denoisers(self) -> dict[str, Denoiser]:
        """One denoiser per transformer, by pipeline slot (Wan 2.2: each expert alone, sharing its weights with
        :attr:`denoiser`, which routes between them)."""
        if len(self.expert_slots) == 1:
            return {"transformer": self.denoiser}
        schedule, prediction_type = self._schedule
        return {name: Denoiser(expert, schedule, prediction_type)
                for name, expert in self.denoiser.backbone.experts.items()}

    # ---------------------------------------------------------------------------- conditioning, latents
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        for name in ("text_encoder", "text_encoder_2"):  # the pipeline's encode_prompt reads them from pipe
            self.component(name)
        return self.spec.encode_prompts(self, list(prompts))

    def null_condition(self, batch: int) -> Conditioning:
        return self.encode_prompts([self.settings.negative_prompt] * batch)

    @property
    def image_conditioned(self) -> bool:
        """Whether the pipeline class is image-to-video (its spec encodes images: models/diffusers_i2v.py)."""
        return self.spec.encode_images is not None

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> dict[str, Tensor]:
        """Condition images ``(B, H, W, 3)`` in [−1, 1] at the model's height × width → the visual extras
        (``image_latent``, ``image_mask``, ``image_embeds``: as the pipeline class builds them); a
        text-to-video pipeline: a one-line error."""
        if self.spec.encode_images is None:
            raise no_image_input(self)
        _, height, width = self.geometry
        if images.ndim != 4 or tuple(images.shape[1:]) != (height, width, 3):
            raise UserError(f"--image: condition images of shape {tuple(images.shape)}; this model takes "
                            f"(B, {height}, {width}, 3) (its height × width)")
        return self.spec.encode_images(self, images.to(next(self.vae.parameters()).device))

    def has_component(self, name: str) -> bool:
        """Whether the pipeline has component ``name`` (loaded or deferred)."""
        return name in self._modules or name in self.lazy

    def latent_shape(self, batch: int) -> tuple[int, int, int, int, int]:
        return self.spec.latent_shape(self, batch)

    def encode(self, frames: Tensor) -> Tensor:
        """Frames ``(B, T, H, W, 3)`` in [−1, 1] → normalised latents ``(B, C, T', H', W')``."""
        return self.spec.encode(self, frames.permute(0, 4, 1, 2, 3))

    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``(B, C, T', H', W')`` → frames ``(B, T, H, W, 3)`` in [−1, 1]."""
        return self.spec.decode(self, latents).clamp(-1, 1).permute(0, 2, 3, 4, 1)

    # ---------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample_latents(self, prompts: list[str], *, steps: int | None = None, cfg_scale: float | None = None,
                       sampler: str | None = None, seed: int | None = None, noise: Tensor | None = None,
                       return_trajectory: bool = False, negative_prompt: str | None = None,
                       images: Tensor | None = None, cfg_scale_2: float | None = None) -> SampleResult:
        """Sample normalised latents; ``cfg_scale`` defaults to the model's own (1 or None: no CFG); ``images``
        ``(B, H, W, 3)`` in [−1, 1] condition an image-to-video model (family.check_images); ``cfg_scale_2``:
        Wan 2.2's low-noise expert's scale in a guided call (default: the settings' ``guidance_scale_2``)."""
        if cfg_scale_2 is not None and len(self.expert_slots) < 2:
            raise UserError(f"--cfg-2 applies to a two-expert model (Wan 2.2), not to this {self.spec.pipeline}")
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
        images = check_images(self, images, len(prompts))
        cond = self.encode_prompts(prompts)
        if images is not None:  # CFG's unconditional branch keeps the image (Denoiser.predict)
            cond = cond.with_extra(self.encode_images(images.to(device)))
        uncond = None
        if cfg_active(cfg_scale):
            negative = self.settings.negative_prompt if negative_prompt is None else negative_prompt
            uncond = self.encode_prompts([negative] * len(prompts))
        kwargs = {"cfg_scale": cfg_scale, "uncond": uncond, "return_trajectory": return_trajectory}
        if sampler == "consistency":
            kwargs["generator"] = generator
        if cfg_scale_2 is None:
            return SAMPLERS[sampler](self.denoiser, noise, self.sampling_times(steps), cond, **kwargs)
        router = self.denoiser.backbone  # the low-noise expert's scale for this call only
        saved, router.expert_cfg_scales = router.expert_cfg_scales, [None, cfg_scale_2]
        try:
            return SAMPLERS[sampler](self.denoiser, noise, self.sampling_times(steps), cond, **kwargs)
        finally:
            router.expert_cfg_scales = saved

    @torch.no_grad()
    def generate(self, prompts: list[str], **kwargs) -> tuple[np.ndarray, SampleResult]:
        result = self.sample_latents(prompts, **kwargs)
        return to_uint8(self.decode(result.x)).cpu().numpy(), result

    # ---------------------------------------------------------------------------- persistence
    def save(self, directory: str | Path) -> Path:
        """The diffusers pipeline (``save_pretrained``) and ``fewstep_model.json``, written atomically; an
        encoder never loaded is copied from the source directory (hard links where the filesystem allows)."""
        with atomic_directory(directory) as tmp:
            self.write_pipeline(tmp)
            (tmp / SETTINGS_FILE).write_text(json.dumps(self.settings.model_dump(mode="json"), indent=2))
        return Path(directory)

    def write_pipeline(self, directory: Path) -> None:
        """The diffusers pipeline's files into ``directory`` (loaded components saved, deferred ones copied)."""
        with _quiet():
            self.pipe.save_pretrained(directory, safe_serialization=True)
        if self.lazy:
            index = json.loads((directory / INDEX_FILE).read_text())
            source_index = json.loads((self.source / INDEX_FILE).read_text())
            for name in self.lazy:
                shutil.copytree(self.source / name, directory / name, copy_function=_link_or_copy)
                index[name] = source_index[name]
            (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
        if self.same_experts():
            _link_weights(directory / "transformer", directory / "transformer_2")

    def same_experts(self) -> bool:
        """Whether the experts are loaded and hold the same weights (a ``single`` student in both Wan 2.2 slots)."""
        if len(self.expert_slots) < 2 or "denoiser" not in self._modules:
            return False
        high, low = (expert.state_dict() for expert in self.denoiser.backbone.experts.values())
        return high.keys() == low.keys() and all(torch.equal(high[k], low[k]) for k in high)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None) -> "DiffusersVideoModel":
        directory = Path(directory)
        spec = pipeline_spec(directory)
        saved = {}
        if (directory / SETTINGS_FILE).is_file():
            saved = read_json(directory / SETTINGS_FILE, f"model {directory / SETTINGS_FILE}")
            if not isinstance(saved, dict):
                raise UserError(f"model {directory / SETTINGS_FILE} must hold a JSON object")
        import diffusers

        index = read_json(directory / INDEX_FILE, f"model {directory / INDEX_FILE}")
        lazy = {name: tuple(index[name]) for name in cls.LAZY
                if isinstance(index.get(name), list) and len(index[name]) == 2 and None not in index[name]}
        try:
            with _quiet():
                pipe = getattr(diffusers, spec.pipeline).from_pretrained(
                    directory, local_files_only=True, torch_dtype=dtype, **{name: None for name in lazy})
        except (OSError, ValueError, EnvironmentError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"model {directory}: the {spec.pipeline} could not be loaded ({first})") from None
        configs = [_stored_config(directory, name, lazy[name]) for name in ("transformer", "vae")]
        settings = parse_config(DiffusersSettings, {**spec.defaults, **spec.pipeline_defaults(*configs), **saved})
        return cls(pipe, spec, settings, directory, lazy, dtype).to(device).eval()


def _stored_config(directory: Path, name: str, entry: tuple[str, str]):
    """The config of component ``name`` (its ``model_index.json`` entry ``(library, class)``) read from its
    folder, with attribute access, without its weights."""
    library, class_name = entry
    if library == "diffusers":
        import diffusers
        from diffusers.configuration_utils import FrozenDict

        return FrozenDict(getattr(diffusers, class_name).load_config(directory, subfolder=name, local_files_only=True))
    import transformers

    return getattr(transformers, class_name).config_class.from_pretrained(directory / name)


@contextmanager
def _quiet():
    """No loading / writing progress bars or warnings on stderr (one-line output)."""
    import diffusers
    import transformers

    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()  # e.g. "self.vae=None cannot be saved": save copies it
    try:
        yield
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
        diffusers.utils.logging.enable_progress_bar()
        transformers.utils.logging.enable_progress_bar()


def _link_weights(source: Path, target: Path) -> None:
    """``target``'s weight files replaced by hard links to ``source``'s same-named ones (one copy on disk; diffusers
    reads each slot from its own folder, so both folders stay)."""
    for file in target.iterdir():
        if file.name != "config.json" and (source / file.name).is_file():
            file.unlink()
            _link_or_copy(source / file.name, file)


def _link_or_copy(src, dst):
    """Hard-link a file (same filesystem: instant, no space), else copy it."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


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


from .diffusers_i2v import i2v_specs  # noqa: E402  (the image-to-video classes: models/diffusers_i2v.py)

SPECS.update(i2v_specs())

DIFFUSERS = register_family(Family("diffusers", is_diffusers_model, DiffusersVideoModel,
                                   f"{INDEX_FILE} of a diffusers pipeline ({', '.join(SPECS)})"))
