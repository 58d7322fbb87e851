"""A small convolutional video autoencoder: the toy world's codec.

Plain deterministic autoencoder (no KL) built from Conv3d + GroupNorm + SiLU residual blocks,
in the style of the causal-free 3D VAEs of video LDMs (CogVideoX, Wan) but tiny (~0.37 M
parameters at default size). With the defaults a ``(B, 3, 16, 32, 32)`` clip in [−1, 1] maps
to ``(B, 4, 8, 8, 8)`` latents: ``spatial_factor = 4`` (two stride-2 stages) and
``temporal_factor = 2`` (the last stage also strides time).

Latents leave :meth:`ToyCodec.encode` already normalised, ``(z − shift_factor)·scaling_factor``
(the diffusers ``scaling_factor``/``shift_factor`` convention); set both after training so
latents have about zero mean and unit std. :meth:`ToyCodec.decode` inverts that.

Output range: the decoder ends in a plain linear conv (no tanh, so training never fights a
saturating output); ``decode(..., clamp=True)`` (the default) clamps to [−1, 1] for viewing,
metrics and saving. Reward gradients through the decoder may pass ``clamp=False`` so that
out-of-range pixels still receive gradient; :meth:`reconstruction_loss` trains the raw output.
"""

from __future__ import annotations

import math
from typing import Any

import pydantic
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from fewstep.errors import UserError
from fewstep.config import StrictModel, parse_config


class ToyCodecConfig(StrictModel):
    """Shape and size of the toy codec."""


    in_channels: int = 3
    latent_channels: int = 4
    base_channels: int = 32  # channels below full resolution; the full-resolution stage uses half
    spatial_factor: int = 4  # power of two: one stride-2 stage per factor 2
    temporal_factor: int = 2  # power of two, at most spatial_factor; the last stages also stride time
    temporal_kernel: int = 3  # odd; 1 makes every conv per-frame (a 2D autoencoder applied to each frame)
    num_groups: int = 8  # GroupNorm groups
    scaling_factor: float = 1.0  # latents = (z - shift_factor) * scaling_factor
    shift_factor: float = 0.0
    latent_l2_weight: float = 1e-4  # tiny L2 penalty on raw latents in reconstruction_loss

    @pydantic.model_validator(mode="after")
    def _check(self) -> ToyCodecConfig:
        for name in ("spatial_factor", "temporal_factor"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two, got {value}")
        if self.temporal_kernel < 1 or self.temporal_kernel % 2 == 0:
            raise ValueError(f"temporal_kernel must be odd and >= 1, got {self.temporal_kernel}")
        if self.temporal_kernel == 1 and self.temporal_factor > 1:
            raise ValueError("temporal_factor > 1 needs temporal_kernel >= 3 (a 1-frame kernel would drop frames)")
        if self.temporal_factor > self.spatial_factor:
            raise ValueError(f"temporal_factor {self.temporal_factor} must not exceed spatial_factor {self.spatial_factor}")
        for ch in (self.base_channels // 2, self.base_channels):
            if ch < 1 or ch % self.num_groups:
                raise ValueError(f"base_channels {self.base_channels} and its half must be divisible by num_groups {self.num_groups}")
        return self


# ----------------------------------------------------------------------------- helpers


def frames_to_video(frames: torch.Tensor) -> torch.Tensor:
    """``(B, T, H, W, 3)`` frames → ``(B, 3, T, H, W)`` video (layout only, values unchanged)."""
    return rearrange(frames, "b t h w c -> b c t h w")


def video_to_frames(video: torch.Tensor) -> torch.Tensor:
    """``(B, 3, T, H, W)`` video → ``(B, T, H, W, 3)`` frames (layout only, values unchanged)."""
    return rearrange(video, "b c t h w -> b t h w c")


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample PSNR in dB of videos in [−1, 1] (peak-to-peak 2): ``(B, ...)`` × 2 → ``(B,)``."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(dim=1)  # (B,)
    return 10.0 * torch.log10(4.0 / mse.clamp(min=1e-12))


def conv3d(c_in: int, c_out: int, kt: int, stride: int | tuple[int, int, int] = 1) -> nn.Conv3d:
    """A ``(kt, 3, 3)`` convolution with "same" padding."""
    return nn.Conv3d(c_in, c_out, (kt, 3, 3), stride=stride, padding=(kt // 2, 1, 1))


class ResBlock3d(nn.Module):
    """GroupNorm → SiLU → Conv3d(kt×3×3) twice, plus the identity (second conv zero-initialised)."""

    def __init__(self, channels: int, num_groups: int, kt: int = 3) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, channels)
        self.conv1 = conv3d(channels, channels, kt)
        self.norm2 = nn.GroupNorm(num_groups, channels)
        self.conv2 = conv3d(channels, channels, kt)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, T, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return x + h


def _stage_plan(config: ToyCodecConfig) -> list[tuple[int, int, tuple[int, int, int]]]:
    """Downsampling stages, full resolution first: ``[(c_in, c_out, stride (st, 2, 2)), ...]``."""
    n_spatial = int(math.log2(config.spatial_factor))
    n_temporal = int(math.log2(config.temporal_factor))
    widths = [config.base_channels // 2] + [config.base_channels] * n_spatial  # channels per level
    plan = []
    for k in range(n_spatial):
        st = 2 if k >= n_spatial - n_temporal else 1  # time strides in the last (coarsest) stages
        plan.append((widths[k], widths[k + 1], (st, 2, 2)))
    return plan


# ----------------------------------------------------------------------------- model


class ToyCodec(nn.Module):
    """Deterministic video autoencoder ``(B, 3, T, H, W)`` ↔ ``(B, C_lat, T/ft, H/fs, W/fs)``."""

    def __init__(self, config: ToyCodecConfig | None = None) -> None:
        super().__init__()
        self.config = config = config if config is not None else ToyCodecConfig()
        plan = _stage_plan(config)
        g = config.num_groups
        top = config.base_channels // 2 if not plan else plan[-1][1]  # channels at latent resolution

        kt = config.temporal_kernel
        # Encoder: conv_in at full res → [strided conv + ResBlock] per stage → ResBlock → conv_out
        enc: list[nn.Module] = [conv3d(config.in_channels, config.base_channels // 2, kt)]
        for c_in, c_out, stride in plan:
            enc += [conv3d(c_in, c_out, kt, stride=stride), ResBlock3d(c_out, g, kt)]
        enc += [ResBlock3d(top, g, kt), nn.GroupNorm(g, top), nn.SiLU(), conv3d(top, config.latent_channels, kt)]
        self.encoder = nn.Sequential(*enc)

        # Decoder: conv_in → 2 ResBlocks → per stage [nearest upsample + conv (+ ResBlock below full res)] → conv_out
        dec: list[nn.Module] = [conv3d(config.latent_channels, top, kt), ResBlock3d(top, g, kt), ResBlock3d(top, g, kt)]
        for level, (c_in, c_out, stride) in reversed(list(enumerate(plan))):
            dec += [nn.Upsample(scale_factor=stride, mode="nearest"), conv3d(c_out, c_in, kt)]
            if level > 0:
                dec.append(ResBlock3d(c_in, g, kt))
        bottom = config.base_channels // 2
        dec += [nn.GroupNorm(g, bottom), nn.SiLU(), conv3d(bottom, config.in_channels, kt)]
        self.decoder = nn.Sequential(*dec)

    @classmethod
    def from_config(cls, config: dict[str, Any] | ToyCodecConfig) -> ToyCodec:
        if isinstance(config, ToyCodecConfig):
            return cls(config)
        return cls(parse_config(ToyCodecConfig, config))

    def latent_shape(self, video_shape: tuple[int, ...]) -> tuple[int, int, int, int, int]:
        """``(B, 3, T, H, W)`` → the shape :meth:`encode` returns."""
        b, _, t, h, w = video_shape
        cfg = self.config
        return (b, cfg.latent_channels, t // cfg.temporal_factor, h // cfg.spatial_factor, w // cfg.spatial_factor)

    def _check_video(self, video: torch.Tensor) -> None:
        cfg = self.config
        if video.ndim != 5 or video.shape[1] != cfg.in_channels:
            raise UserError(f"ToyCodec: video has shape {tuple(video.shape)}; expected (B, {cfg.in_channels}, T, H, W)")
        t, h, w = video.shape[2:]
        if t % cfg.temporal_factor or h % cfg.spatial_factor or w % cfg.spatial_factor:
            raise UserError(
                f"ToyCodec: video size (T, H, W) = {(t, h, w)} must be divisible by "
                f"({cfg.temporal_factor}, {cfg.spatial_factor}, {cfg.spatial_factor})"
            )

    def encode_raw(self, video: torch.Tensor) -> torch.Tensor:
        """``(B, 3, T, H, W)`` in [−1, 1] → un-normalised latents ``z``."""
        self._check_video(video)
        return self.encoder(video)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``(B, 3, T, H, W)`` in [−1, 1] → normalised latents ``(z − shift)·scaling``, ``(B, C, T/ft, H/fs, W/fs)``."""
        return (self.encode_raw(video) - self.config.shift_factor) * self.config.scaling_factor

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """Un-normalised latents → unclamped video ``(B, 3, T, H, W)``."""
        if z.ndim != 5 or z.shape[1] != self.config.latent_channels:
            raise UserError(
                f"ToyCodec: latents have shape {tuple(z.shape)}; expected (B, {self.config.latent_channels}, T, H, W)"
            )
        return self.decoder(z)

    def decode(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Normalised latents ``(B, C, t, h, w)`` → video ``(B, 3, t·ft, h·fs, w·fs)``, clamped to [−1, 1] unless ``clamp=False``."""
        z = latents / self.config.scaling_factor + self.config.shift_factor
        video = self.decode_raw(z)
        return video.clamp(-1.0, 1.0) if clamp else video

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``decode(encode(video))`` (clamped)."""
        return self.decode(self.encode(video))

    def reconstruction_loss(self, video: torch.Tensor, weight: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Autoencoder training loss, unreduced: ``L1 + MSE + λ·mean(z²)`` per sample → ``(B,)``.

        ``weight`` (broadcastable to the video, e.g. ``(B, 1, T, H, W)``) re-weights pixels in
        the L1 and MSE terms (the toy pretraining up-weights the subject so the codec does not
        linger on the "background plus blob" plateau). Trains the raw (unclamped) decoder
        output. Metrics are detached batch means: ``l1``, ``mse``, ``psnr`` (of the clamped
        reconstruction, unweighted), ``latent_std`` (raw ``z``).
        """
        z = self.encode_raw(video)  # (B, C, t, h, w)
        recon = self.decode_raw(z)  # (B, 3, T, H, W)
        w = 1.0 if weight is None else weight
        l1 = (w * (recon - video).abs()).flatten(1).mean(dim=1)  # (B,)
        mse = (w * (recon - video).pow(2)).flatten(1).mean(dim=1)  # (B,)
        latent_l2 = z.pow(2).flatten(1).mean(dim=1)  # (B,)
        loss = l1 + mse + self.config.latent_l2_weight * latent_l2
        metrics = {
            "l1": l1.detach().mean(),
            "mse": mse.detach().mean(),
            "psnr": psnr(recon.detach().clamp(-1.0, 1.0), video).mean(),
            "latent_std": z.detach().std(),
        }
        return loss, metrics
