"""The toy family of the pipeline seam (:mod:`fewstep.models.family`): text encoder + toy DiT + codec.

A toy model directory — the shipped ``toy-teacher``, a teacher from ``fewstep pretrain``, a student
at ``RUN/student`` of a toy teacher — holds::

    model.json                 the resolved ToyPipelineConfig ("kind": "toy"; architecture, schedule, sampling)
    backbone.safetensors       denoiser weights
    codec.safetensors          video autoencoder weights
    text_encoder.safetensors   caption encoder weights

and is recognised by its ``model.json``. ``"conditioning": "image"`` makes an image-to-video model (the
shipped ``toy-teacher-i2v``): its DiT takes ``[x_t, image_mask, image_latent]`` on channels
(``backbone.condition_channels`` = 1 + the codec's latent channels) and :meth:`VideoPipeline.encode_images`
builds them from the condition image as Wan's I2V pipeline does — the first frame's latent, normalised like
every latent, zero on the later latent frames, and a 1-channel mask, 1 on the first latent frame. Wan encodes
the clip ``[image, 0, …, 0]``, whose first latent frame is the image's alone because its VAE is causal; the
toy codec is not (its GroupNorms pool statistics over all frames), so that clip's first latent frame is off
the codec's distribution and decodes to noise. The toy model therefore takes the first latent frame of the
*still* clip ``[image, …, image]``: the latent the codec gives the image as a frame of a clip (it decodes
back to the image), which is what Wan's causal encoder gives its first frame.

Saving is atomic (write to a temporary sibling directory, fsync, rename), so a reader never sees a
half-written model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import pydantic
from pydantic import Field
from safetensors.torch import save_file
from torch import Tensor, nn

from ..config import StrictModel, parse_config
from ..diffusion.samplers import SAMPLERS, SampleResult
from ..diffusion.schedules import FlowMatchingConfig, ScheduleConfig
from ..errors import UserError
from ..utils.frames import to_uint8
from ..utils.io import atomic_directory, load_weights, read_json
from .backbones import Conditioning
from .codec import ToyCodec, ToyCodecConfig, frames_to_video, video_to_frames
from .denoiser import Denoiser, cfg_active
from .family import (ASSETS, SHIPPED, Family, Geometry,  # noqa: F401 (ASSETS, SHIPPED: re-exported)
                     SamplingConfig, SamplingMixin, check_images, no_image_input, register_family, resolve_model)
from .text_encoder import ToyTextEncoder, ToyTextEncoderConfig
from .toy_dit import ToyDiT, ToyDiTConfig

_FILES = ("backbone", "codec", "text_encoder")


class ToyPipelineConfig(StrictModel):
    """``model.json`` of a toy model directory."""

    kind: Literal["toy"] = "toy"
    backbone: ToyDiTConfig = Field(default_factory=ToyDiTConfig)
    schedule: ScheduleConfig = Field(default_factory=FlowMatchingConfig)
    prediction_type: Literal["eps", "x0", "v", "flow", "conjugate"] = "flow"
    codec: ToyCodecConfig = Field(default_factory=ToyCodecConfig)
    text_encoder: ToyTextEncoderConfig
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    frames: int = 16
    size: int = 32
    conditioning: Literal["text", "image"] = Field(
        "text", description="text: text-to-video; image: image-to-video on the first frame (module doc)")

    @pydantic.model_validator(mode="after")
    def _check_conditioning(self) -> "ToyPipelineConfig":
        want = 1 + self.codec.latent_channels if self.conditioning == "image" else 0
        if self.backbone.condition_channels != want:
            raise ValueError(f"conditioning {self.conditioning!r} needs backbone.condition_channels = {want} "
                             f"(image_mask + image_latent channels); got {self.backbone.condition_channels}")
        return self


class VideoPipeline(SamplingMixin, nn.Module):
    """The toy :class:`~fewstep.models.family.VideoModel`: prompts → latents (by the denoiser's
    sampler) → frames (by the codec's decoder)."""

    prompt_grammar = "toy"  # captions follow the toy world's grammar (eval/runner.check_prompts)

    def __init__(self, config: ToyPipelineConfig):
        super().__init__()
        self.config = config
        self.denoiser = Denoiser(ToyDiT(config.backbone), config.schedule.build(), config.prediction_type)
        self.codec = ToyCodec(config.codec)
        self.text_encoder = ToyTextEncoder(config.text_encoder)

    # ---------------------------------------------------------------------------- what the seam exposes
    @property
    def sampling(self) -> SamplingConfig:
        return self.config.sampling

    @sampling.setter
    def sampling(self, sampling: SamplingConfig) -> None:
        self.config = self.config.model_copy(update={"sampling": sampling})

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.config.frames, self.config.size, self.config.size)

    def set_geometry(self, frames: int | None = None, height: int | None = None, width: int | None = None) -> None:
        """A toy model renders one clip size only: any other is a one-line error."""
        own = self.geometry
        asked = Geometry(frames or own.frames, height or own.height, width or own.width)
        if asked != own:
            raise UserError(f"this toy model makes {own.frames}×{own.height}×{own.width} clips (frames × height × "
                            f"width) only; got {asked.frames}×{asked.height}×{asked.width}")

    @property
    def text_dim(self) -> int:
        return self.config.text_encoder.dim

    @property
    def hidden_dim(self) -> int:
        return self.config.backbone.hidden_dim

    def denoisers(self) -> dict[str, Denoiser]:
        return {"denoiser": self.denoiser}

    # ---------------------------------------------------------------------------- conditioning
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Caption tokens ``(B, L, D)`` and mask ``(B, L)``; ``""`` is the unconditional prompt."""
        tokens, mask = self.text_encoder.encode(list(prompts))
        return Conditioning(tokens, mask)

    def null_condition(self, batch: int) -> Conditioning:
        return self.encode_prompts([""] * batch)

    @property
    def image_conditioned(self) -> bool:
        return self.config.conditioning == "image"

    def encode_images(self, images: Tensor) -> dict[str, Tensor]:
        """Condition images ``(B, H, W, 3)`` in [−1, 1] → ``image_latent`` ``(B, C, T', H', W')`` (the first
        latent frame of the still clip ``[image, …, image]`` through the codec, zero on the later frames: module
        doc) and ``image_mask`` ``(B, 1, T', H', W')`` (1 on the first latent frame), in ``images``' dtype. A
        text-to-video model: a one-line error."""
        if not self.image_conditioned:
            raise no_image_input(self)
        _, height, width = self.geometry
        if images.ndim != 4 or tuple(images.shape[1:]) != (height, width, 3):
            raise UserError(f"--image: condition images have shape {tuple(images.shape)}; expected (B, {height}, "
                            f"{width}, 3)")
        still = images[:, None].expand(-1, self.config.frames, -1, -1, -1)  # (B, T, H, W, 3)
        latent = self.encode(still)  # (B, C, T', H', W')
        image_mask = torch.zeros_like(latent[:, :1])  # (B, 1, T', H', W')
        image_mask[:, :, 0] = 1.0
        return {"image_mask": image_mask, "image_latent": latent * image_mask}

    def latent_shape(self, batch: int) -> tuple[int, int, int, int, int]:
        """``(B, C, T', H', W')`` of this model's latents."""
        return self.codec.latent_shape((batch, 3, self.config.frames, self.config.size, self.config.size))

    # ---------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample_latents(self, prompts: list[str], *, steps: int | None = None, cfg_scale: float | None = None,
                       sampler: str | None = None, seed: int | None = None, noise: Tensor | None = None,
                       return_trajectory: bool = False, negative_prompt: str | None = None,
                       images: Tensor | None = None) -> SampleResult:
        """Sample latents for ``prompts``. ``cfg_scale`` defaults to the model's own; 1 or None = no CFG;
        ``negative_prompt`` replaces the empty caption of CFG's unconditional branch; ``images``
        ``(B, H, W, 3)`` in [−1, 1] condition an image-to-video model (kept in CFG's unconditional branch)."""
        sampling = self.config.sampling
        sampler = sampler or sampling.sampler
        if sampler not in SAMPLERS:
            raise UserError(f"sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}")
        cfg_scale = sampling.cfg_scale if cfg_scale is None else cfg_scale
        device = next(self.parameters()).device
        generator = torch.Generator(device="cpu").manual_seed(0 if seed is None else seed)
        if noise is None:
            noise = torch.randn(self.latent_shape(len(prompts)), generator=generator)
        noise = noise.to(device)
        images = check_images(self, images, len(prompts))
        cond = self.encode_prompts(prompts)
        if images is not None:
            cond = cond.with_extra(self.encode_images(images.to(device)))
        uncond = None
        if cfg_active(cfg_scale):  # only when it is used
            uncond = self.encode_prompts([negative_prompt or ""] * len(prompts))
        kwargs = {"cfg_scale": cfg_scale, "uncond": uncond,
                  "return_trajectory": return_trajectory}
        if sampler == "consistency":
            kwargs["generator"] = generator
        return SAMPLERS[sampler](self.denoiser, noise, self.sampling_times(steps), cond, **kwargs)

    def encode(self, frames: Tensor) -> Tensor:
        """Frames ``(B, T, H, W, 3)`` float in [−1, 1] → latents ``(B, C, T', H', W')``."""
        dtype = next(self.codec.parameters()).dtype  # the codec in its own dtype, latents in the caller's
        return self.codec.encode(frames_to_video(frames).to(dtype)).to(frames.dtype)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``(B, C, T', H', W')`` → frames ``(B, T, H, W, 3)`` float in [−1, 1]."""
        dtype = next(self.codec.parameters()).dtype
        return video_to_frames(self.codec.decode(latents.to(dtype)).to(latents.dtype))

    @torch.no_grad()
    def generate(self, prompts: list[str], **kwargs) -> tuple[np.ndarray, SampleResult]:
        """Frames as uint8 ``(B, T, H, W, 3)`` and the sampler's result."""
        result = self.sample_latents(prompts, **kwargs)
        frames = self.decode(result.x)
        return to_uint8(frames).cpu().numpy(), result

    # ---------------------------------------------------------------------------- persistence
    def state_dicts(self) -> dict[str, dict[str, Tensor]]:
        return {"backbone": self.denoiser.backbone.module.state_dict(), "codec": self.codec.state_dict(),
                "text_encoder": self.text_encoder.state_dict()}

    def save(self, directory: str | Path, card: str | None = None) -> Path:
        """Write the model atomically to ``directory`` (replacing an older model there); ``card``: its README.md."""
        with atomic_directory(directory) as tmp:
            if card is not None:
                (tmp / "README.md").write_text(card)
            for name, state in self.state_dicts().items():
                save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp / f"{name}.safetensors")
            (tmp / "model.json").write_text(json.dumps(self.config.model_dump(mode="json"), indent=2))
        return Path(directory)

    @classmethod
    def load(cls, name_or_dir: str | Path, device: str | torch.device = "cpu") -> "VideoPipeline":
        """Load a shipped toy model by name or a saved toy model directory."""
        directory = resolve_model(name_or_dir)
        meta = _read_meta(directory)
        if meta is None:
            raise UserError(f"--model {name_or_dir}: not a toy model directory (expected {TOY.expects})")
        config = parse_config(ToyPipelineConfig, meta)
        pipe = cls(config)
        for name, module in (("backbone", pipe.denoiser.backbone.module), ("codec", pipe.codec),
                             ("text_encoder", pipe.text_encoder)):
            load_weights(module, directory / f"{name}.safetensors", f"model {directory}", "model.json")
        return pipe.to(device).eval()


def _read_meta(directory: Path) -> dict | None:
    """``model.json`` as a mapping, or None when absent; unreadable or not an object: a one-line error."""
    path = directory / "model.json"
    if not path.is_file():
        return None
    meta = read_json(path, f"model {path}")
    if not isinstance(meta, dict):
        raise UserError(f"model {path} must hold a JSON object, got {type(meta).__name__}")
    return meta


def is_toy_model(directory: Path) -> bool:
    """The toy family's ``detect``: ``model.json`` with ``"kind": "toy"``."""
    meta = _read_meta(directory)
    return meta is not None and meta.get("kind") == "toy"


TOY = register_family(Family("toy", is_toy_model, VideoPipeline, 'model.json with "kind": "toy"'))


def image_to_video(pipe: VideoPipeline) -> VideoPipeline:
    """An image-to-video copy of the text-to-video toy ``pipe`` (``"conditioning": "image"``): same codec, caption
    encoder, schedule and sampling; the DiT gains the ``[image_mask, image_latent]`` input channels with zero
    patch-embedding weights (:func:`~fewstep.models.toy_dit.add_condition_channels`), so before any
    fine-tuning it predicts exactly what ``pipe`` does. ``fewstep pretrain --stage i2v`` starts here."""
    from .toy_dit import add_condition_channels

    if pipe.image_conditioned:
        raise UserError("the model is already image-to-video")
    dit = add_condition_channels(pipe.denoiser.backbone.module, 1 + pipe.config.codec.latent_channels)
    config = pipe.config.model_copy(update={"conditioning": "image", "backbone": dit.config})
    out = VideoPipeline(config)
    out.denoiser.backbone.module.load_state_dict(dit.state_dict())
    out.codec.load_state_dict(pipe.codec.state_dict())
    out.text_encoder.load_state_dict(pipe.text_encoder.state_dict())
    device = next(pipe.parameters()).device
    return out.to(device).train(pipe.training)
