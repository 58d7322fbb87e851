"""Latent reward models ``R^l_φ(x[, c])`` (DOLLAR (001) §3.4, App. 7.2, Tables 12–13): rewards scored on
latents ``x`` (B, C, T, H, W) directly, so that fine-tuning needs neither the decoder nor the pixel
reward in the graph. The losses that fit them and fine-tune with them (Eq. 14–15) are in
:mod:`fewstep.objectives.reward`; this module holds only the networks, which a recipe builds as its
``lrm`` role with :func:`build_lrm` (a reward model, like the pixel rewards beside it).

* :class:`ImageLRM` — App. 7.2 Table 12 on one latent frame ``(B, C, H, W)``: conv (k×k, stride
  s, padding 1) + GroupNorm + SiLU → conv (3×3, stride 2) + GroupNorm + SiLU → global average
  pool → 1×1 conv → linear (189,441 parameters for 12 latent channels, as in Table 12). The
  paper's stem is k = s = 4 for 24×40 latents; small latents use e.g. k = 3, s = 1 (config
  ``kernel_size``, ``stride``).
* :class:`TextImageLRM` — Table 13: the same image features ``e_x`` (B, W), a text projection
  (linear D → W + SiLU) of the caption tokens ``e_c`` (B, L, W) of the batch's
  :class:`Conditioning`, cross-attention
  ``Softmax(Q(e_x)·K(e_c)ᵀ/√W)·V(e_c)`` (App. 7.2) and a linear head on ``e_x + attention``.
  Table 13 averages the text tokens before the attention, which leaves one key — a softmax over
  one element is 1 and the image would not interact with the text — so here the image query
  attends over the (masked) text tokens, and a residual keeps the image features.
* :class:`VideoLRM` — a video reward from a frame model: the average of the frame rewards over
  latent frames (App. 7.2 (1), what DOLLAR uses), or ``temporal: conv3d``, the same network with
  3-D convolutions (temporal kernel 3, temporal stride 1) over the whole latent video (App. 7.2 (2)).

**Standardised rewards** (deviation, see :mod:`fewstep.objectives.reward`). A :class:`VideoLRM` keeps
running statistics ``μ, σ`` of the rewards it is fitted to (:meth:`VideoLRM.update_statistics`,
DDPO's reward normalisation with an EMA instead of per-batch statistics); its network predicts
``z = (R − μ)/σ`` (:meth:`VideoLRM.standardized`) and it answers in reward units, ``μ + σ·z``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.distributed as dist
from einops import rearrange
from pydantic import Field
from torch import Tensor, nn

from ..config import StrictModel
from ..errors import UserError
from ..models.backbones import Conditioning


class LatentFeatures(nn.Module):
    """Table 12 up to the flatten: ``(B, C, H, W)`` (or ``(B, C, T, H, W)`` with ``dims=3``) → ``(B, W)``."""

    def __init__(self, in_channels: int, width: int = 128, groups: int = 32, kernel_size: int = 4,
                 stride: int = 4, dims: Literal[2, 3] = 2):
        super().__init__()
        if width % groups:
            raise UserError(f"latent reward model: width={width} is not divisible by groups={groups}")
        if dims == 2:
            conv, pool = nn.Conv2d, nn.AdaptiveAvgPool2d
            stem = {"kernel_size": kernel_size, "stride": stride, "padding": 1}
            down = {"kernel_size": 3, "stride": 2, "padding": 1}
        else:  # temporal kernel 3, temporal stride 1
            conv, pool = nn.Conv3d, nn.AdaptiveAvgPool3d
            stem = {"kernel_size": (3, kernel_size, kernel_size), "stride": (1, stride, stride), "padding": 1}
            down = {"kernel_size": 3, "stride": (1, 2, 2), "padding": 1}
        self.net = nn.Sequential(
            conv(in_channels, width, **stem), nn.GroupNorm(groups, width), nn.SiLU(),  # (B, W, H/s, W/s)
            conv(width, width, **down), nn.GroupNorm(groups, width), nn.SiLU(),  # (B, W, H/2s, W/2s)
            pool(1),  # (B, W, 1, 1)
            conv(width, width, kernel_size=1),  # (B, W, 1, 1)
            nn.Flatten(),  # (B, W)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ImageLRM(nn.Module):
    """Image latent reward model, DOLLAR App. 7.2 Table 12: ``(B, C, H, W) -> (B,)`` (the caption is ignored)."""

    def __init__(self, in_channels: int, width: int = 128, groups: int = 32, kernel_size: int = 4,
                 stride: int = 4, dims: Literal[2, 3] = 2):
        super().__init__()
        self.features = LatentFeatures(in_channels, width, groups, kernel_size, stride, dims)
        self.head = nn.Linear(width, 1)

    def forward(self, x: Tensor, cond: Conditioning | None = None) -> Tensor:
        return self.head(self.features(x)).squeeze(-1)  # (B,)


class TextImageLRM(nn.Module):
    """Text-image latent reward model, DOLLAR App. 7.2 Table 13 (see module doc): ``(B, C, H, W), c -> (B,)``."""

    def __init__(self, in_channels: int, text_dim: int, width: int = 128, groups: int = 32, kernel_size: int = 4,
                 stride: int = 4, dims: Literal[2, 3] = 2):
        super().__init__()
        self.features = LatentFeatures(in_channels, width, groups, kernel_size, stride, dims)
        self.text_mlp = nn.Sequential(nn.Linear(text_dim, width), nn.SiLU())  # Table 13: one D → 128 projection
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.head = nn.Linear(width, 1)

    def forward(self, x: Tensor, cond: Conditioning | None = None) -> Tensor:
        if cond is None:
            raise UserError("a text-image latent reward model needs the captions (the batch's cond)")
        e_x = self.features(x)  # (B, W)
        e_c = self.text_mlp(cond.context.to(e_x.dtype))  # (B, L, W)
        logits = torch.einsum("bw,blw->bl", self.q(e_x), self.k(e_c)) / math.sqrt(e_x.shape[-1])  # (B, L)
        if cond.mask is not None:
            logits = logits.masked_fill(~cond.mask, float("-inf"))
        attention = torch.einsum("bl,blw->bw", logits.softmax(-1), self.v(e_c))  # (B, W)
        return self.head(e_x + attention).squeeze(-1)  # (B,)


class VideoLRM(nn.Module):
    """Video latent reward model (DOLLAR App. 7.2): ``(B, C, T, H, W), c -> (B,)``.

    ``temporal="average"``: the mean over latent frames of ``frame_model`` (a 2-D LRM);
    ``temporal="conv3d"``: ``frame_model`` is a 3-D LRM (``dims=3``) applied to the whole video.

    The network predicts the reward in standard units, ``z(x)``, and ``forward`` returns it in the
    reward's own units, ``μ + σ·z(x)``, with ``μ, σ`` running statistics of the fitted rewards held
    as buffers (``reward_mean``, ``reward_var``; updated by :meth:`update_statistics`, see the module
    doc). Until the first update ``μ = 0, σ = 1``.
    """

    def __init__(self, frame_model: nn.Module, temporal: Literal["average", "conv3d"] = "average"):
        super().__init__()
        self.frame_model, self.temporal = frame_model, temporal
        self.register_buffer("reward_mean", torch.zeros(()))
        self.register_buffer("reward_var", torch.ones(()))
        self.register_buffer("reward_updates", torch.zeros((), dtype=torch.long))

    @property
    def reward_std(self) -> Tensor:
        return self.reward_var.clamp_min(1e-12).sqrt()

    def standardized(self, x: Tensor, cond: Conditioning | None = None) -> Tensor:
        """``z(x) = (R^l(x) − μ)/σ``, (B,)."""
        if self.temporal == "conv3d":
            return self.frame_model(x, cond)
        frames = x.shape[2]
        flat = rearrange(x, "b c t h w -> (b t) c h w")  # (B·T, C, H, W)
        per_frame = self.frame_model(flat, None if cond is None else cond.repeat(frames))  # (B·T,)
        return rearrange(per_frame, "(b t) -> b t", t=frames).mean(1)  # (B,)

    def to_reward(self, z: Tensor) -> Tensor:
        """Standard units → the reward's own: ``μ + σ·z``."""
        return self.reward_mean.to(z.dtype) + self.reward_std.to(z.dtype) * z

    def forward(self, x: Tensor, cond: Conditioning | None = None) -> Tensor:
        return self.to_reward(self.standardized(x, cond))  # (B,) R^l(x)

    @torch.no_grad()
    def update_statistics(self, rewards: Tensor, momentum: float) -> None:
        """Fold a batch of target rewards (N,) into ``μ, σ²``: set on the first call, then an EMA.

        ``δ = mean(r) − μ;  μ ← μ + (1 − m)·δ;  σ² ← m·(σ² + (1 − m)·δ²) + (1 − m)·var(r)`` — the
        exponentially weighted mean and variance (West 1979). The batch moments are sums of
        ``r − μ`` (in float64), which keeps ``var(r) = E[(r − μ)²] − δ²`` free of cancellation for
        rewards far from zero (JPEG: −0.3 ± 0.05 kB).
        """
        d = rewards.detach().double().flatten() - self.reward_mean.double()  # (N,) r − μ
        sums = torch.stack([torch.tensor(float(d.numel()), dtype=torch.float64, device=d.device), d.sum(),
                            d.pow(2).sum()])
        if dist.is_available() and dist.is_initialized():  # every rank folds in the same global batch
            dist.all_reduce(sums)
        n, total, squares = (float(v) for v in sums)
        delta = total / n  # mean(r) − μ
        batch_var = max(squares / n - delta**2, 0.0)
        if int(self.reward_updates) == 0:
            self.reward_mean.add_(delta)
            self.reward_var.fill_(batch_var if batch_var > 0 else 1.0)
        else:
            self.reward_mean.add_((1 - momentum) * delta)
            self.reward_var.copy_(momentum * (self.reward_var + (1 - momentum) * delta**2)
                                  + (1 - momentum) * batch_var)
        self.reward_updates.add_(1)


class LatentRewardModelConfig(StrictModel):
    """Architecture of a latent reward model (DOLLAR App. 7.2); for a recipe's ``lrm`` role."""

    text: bool = Field(False, description="condition on the caption (Table 13) for text-image/text-video rewards")
    temporal: Literal["average", "conv3d"] = Field("average", description="frame average of a 2-D LRM, or 3-D conv")
    width: int = Field(128, ge=1, description="feature channels (Tables 12–13: 128)")
    groups: int = Field(32, ge=1, description="GroupNorm groups")
    kernel_size: int = Field(4, ge=1, description="stem conv kernel (Table 12: 4; e.g. 3 for tiny latents)")
    stride: int = Field(4, ge=1, description="stem conv stride (Table 12: 4; e.g. 1 for tiny latents)")


def build_lrm(config: LatentRewardModelConfig, in_channels: int, text_dim: int | None = None) -> VideoLRM:
    """The video LRM of ``config`` for latents with ``in_channels`` channels (and captions of ``text_dim``)."""
    dims = 3 if config.temporal == "conv3d" else 2
    common = {"width": config.width, "groups": config.groups, "kernel_size": config.kernel_size,
              "stride": config.stride, "dims": dims}
    if config.text:
        if text_dim is None:
            raise UserError("a text-conditioned latent reward model needs the text encoder's width (text_dim)")
        frame = TextImageLRM(in_channels, text_dim, **common)
    else:
        frame = ImageLRM(in_channels, **common)
    return VideoLRM(frame, config.temporal)
