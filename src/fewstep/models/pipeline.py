"""A loadable text-to-video model: text encoder + denoiser + codec + default sampling.

This is what ``--model M`` names everywhere (``fewstep generate/eval/distill``): either a
shipped name (``toy-teacher``) or a directory written by :meth:`VideoPipeline.save` — a
teacher from ``fewstep pretrain`` or a student at ``RUN/student/``. A directory holds::

    model.json                 the resolved ToyPipelineConfig (architecture, schedule, sampling)
    backbone.safetensors       denoiser weights
    codec.safetensors          video autoencoder weights
    text_encoder.safetensors   caption encoder weights

Saving is atomic (write to a temporary sibling directory, fsync, rename), so a reader never
sees a half-written model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from safetensors.torch import save_file
from torch import Tensor, nn

from ..data.toyworld import to_uint8
from ..config import FlowMatchingConfig, ScheduleConfig, StrictModel, parse_config
from ..diffusion.samplers import SAMPLERS, SampleResult
from ..diffusion.schedules import sampling_grid
from ..errors import UserError
from ..utils.io import atomic_directory, load_weights, read_json
from .backbones import Conditioning
from .codec import ToyCodec, ToyCodecConfig, video_to_frames
from .denoiser import Denoiser
from .text_encoder import ToyTextEncoder, ToyTextEncoderConfig
from .toy_dit import ToyDiT, ToyDiTConfig

ASSETS = Path(__file__).resolve().parent.parent / "assets"
#: Models shipped inside the package, loadable by name.
SHIPPED = {"toy-teacher": ASSETS / "toy-teacher"}

_FILES = ("backbone", "codec", "text_encoder")


class SamplingConfig(StrictModel):
    """How this model samples by default (the CLI may override steps/cfg)."""

    sampler: Literal["euler", "ddim", "consistency"] = "euler"
    steps: int = Field(50, ge=1)
    times: list[float] | None = Field(
        None, description="explicit decreasing times ending at 0 (students); overrides steps")
    cfg_scale: float | None = Field(None, description="CFG scale w in uncond + w·(cond − uncond); None = no CFG")
    spacing: Literal["uniform", "diffusers"] = Field(
        "uniform", description="grid of an N-step sample without explicit times (diffusion/schedules.sampling_grid)")


class ToyPipelineConfig(StrictModel):
    kind: Literal["toy"] = "toy"
    backbone: ToyDiTConfig = Field(default_factory=ToyDiTConfig)
    schedule: ScheduleConfig = Field(default_factory=FlowMatchingConfig)
    prediction_type: Literal["eps", "x0", "v", "flow", "conjugate"] = "flow"
    codec: ToyCodecConfig = Field(default_factory=ToyCodecConfig)
    text_encoder: ToyTextEncoderConfig
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    frames: int = 16
    size: int = 32


class VideoPipeline(nn.Module):
    """Prompts → latents (by the denoiser's sampler) → frames (by the codec's decoder)."""

    def __init__(self, config: ToyPipelineConfig):
        super().__init__()
        self.config = config
        self.denoiser = Denoiser(ToyDiT(config.backbone), config.schedule.build(), config.prediction_type)
        self.codec = ToyCodec(config.codec)
        self.text_encoder = ToyTextEncoder(config.text_encoder)

    # ---------------------------------------------------------------------------- conditioning
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Caption tokens ``(B, L, D)`` and mask ``(B, L)``; ``""`` is the unconditional prompt."""
        tokens, mask = self.text_encoder.encode(list(prompts))
        return Conditioning(tokens, mask)

    def null_condition(self, batch: int) -> Conditioning:
        return self.encode_prompts([""] * batch)

    def latent_shape(self, batch: int) -> tuple[int, int, int, int, int]:
        """``(B, C, T', H', W')`` of this model's latents."""
        return self.codec.latent_shape((batch, 3, self.config.frames, self.config.size, self.config.size))

    def sampling_times(self, steps: int | None = None) -> Tensor:
        """Times the sampler visits: the model's explicit ``sampling.times`` (a student's own grid)
        when ``steps`` is None or equals that grid's step count, else ``sampling_grid`` with the
        model's spacing (:meth:`grid_name` says which)."""
        cfg = self.config.sampling
        if cfg.times is not None and steps in (None, len(cfg.times) - 1):
            return torch.tensor(cfg.times, dtype=torch.float64)
        return sampling_grid(self.denoiser.schedule, steps or cfg.steps, cfg.spacing)

    def grid_name(self, steps: int | None = None) -> str:
        """Which grid :meth:`sampling_times` uses: ``"model"`` (its own times) or the spacing."""
        cfg = self.config.sampling
        return "model" if cfg.times is not None and steps in (None, len(cfg.times) - 1) else cfg.spacing

    def default_steps(self) -> int:
        """The step count this model samples with when none is asked for."""
        return len(self.sampling_times(None)) - 1

    # ---------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample_latents(self, prompts: list[str], *, steps: int | None = None, cfg_scale: float | None = None,
                       sampler: str | None = None, seed: int | None = None, noise: Tensor | None = None,
                       return_trajectory: bool = False) -> SampleResult:
        """Sample latents for ``prompts``. ``cfg_scale`` defaults to the model's own; 1 or None = no CFG."""
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
        cond = self.encode_prompts(prompts)
        uncond = self.null_condition(len(prompts)) if cfg_scale not in (None, 1.0) else None
        kwargs = {"cfg_scale": cfg_scale if uncond is not None else None, "uncond": uncond,
                  "return_trajectory": return_trajectory}
        if sampler == "consistency":
            kwargs["generator"] = generator
        return SAMPLERS[sampler](self.denoiser, noise, self.sampling_times(steps), cond, **kwargs)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``(B, C, T', H', W')`` → frames ``(B, T, H, W, 3)`` float in [−1, 1]."""
        return video_to_frames(self.codec.decode(latents))

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

    def save(self, directory: str | Path) -> Path:
        """Write the model atomically to ``directory`` (replacing an older model there)."""
        with atomic_directory(directory) as tmp:
            for name, state in self.state_dicts().items():
                save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp / f"{name}.safetensors")
            (tmp / "model.json").write_text(json.dumps(self.config.model_dump(mode="json"), indent=2))
        return Path(directory)

    @classmethod
    def load(cls, name_or_dir: str | Path, device: str | torch.device = "cpu") -> "VideoPipeline":
        """Load a shipped model by name or a saved model directory."""
        directory = resolve_model(name_or_dir)
        meta = read_json(directory / "model.json", f"model {directory / 'model.json'}")
        if not isinstance(meta, dict):
            raise UserError(f"model {directory / 'model.json'} must hold a JSON object, got {type(meta).__name__}")
        config = parse_config(ToyPipelineConfig, meta)
        pipe = cls(config)
        for name, module in (("backbone", pipe.denoiser.backbone.module), ("codec", pipe.codec),
                             ("text_encoder", pipe.text_encoder)):
            load_weights(module, directory / f"{name}.safetensors", f"model {directory}", "model.json")
        return pipe.to(device).eval()


def resolve_model(name_or_dir: str | Path) -> Path:
    """A shipped model's directory, or ``name_or_dir`` itself if it holds a model."""
    if str(name_or_dir) in SHIPPED:
        directory = SHIPPED[str(name_or_dir)]
        if not (directory / "model.json").is_file():
            raise UserError(f"the shipped model {name_or_dir!r} is missing from this install "
                            f"(expected {directory}); run `fewstep pretrain` to build it")
        return directory
    directory = Path(name_or_dir)
    if not (directory / "model.json").is_file():
        known = ", ".join(SHIPPED)
        raise UserError(f"--model {name_or_dir}: not a shipped model ({known}) nor a directory with model.json")
    return directory

