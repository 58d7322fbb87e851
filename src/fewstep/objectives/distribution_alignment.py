"""Distribution alignment: adversarial training on decoded one-step predictions (SwiftVideo (003) Eq. 10).

The discriminator follows StyleGAN-T / ADD: a *frozen* image feature network applied to every frame,
with light trainable heads on several of its feature levels — a spatial head per level on each frame
(:class:`~fewstep.objectives.gan.FrameHead`) and a temporal head per level across the frames
(:class:`TemporalHead`). Each head ``D_k`` gives one logit per sample. Eq. 10, with
``x̂0 = x_t − t·F_θ(x_t, t)`` (the flow student's ``Prediction.x0``; t the paper's σ) decoded to frames::

    L^G = λ_adv · Σ_k max(0, 1 − D_k(x̂0))                               (da_generator, role student)
    L^D = Σ_k [max(0, 1 − D_k(x0)) + max(0, 1 + D_k(sg(x̂0)))]           (da_discriminator, role discriminator)

λ_adv is the generator objective's ``weight`` (SwiftVideo: 0.01); the recipe switches DA on after
``N_warmup`` steps of CCD alone by putting both objectives in a later stage. The generator's hinge is
Eq. 10's clipped form (``generator_form: clipped``; ``linear`` is RGTD's ``−D_k``). The generator's
gradient flows through the frozen features and the frozen decoder into the student, not into the heads.

Feature networks (:class:`FeatureDiscriminatorConfig`, built by the recipe's ``feature_discriminator``
role builder):

* ``dinov2``: a transformers ``Dinov2Model`` from a local directory (the paper's choice); frames are
  scaled so the shorter side is ``size`` (both sides rounded to the patch size; DINOv2 interpolates its
  position embeddings), normalised as its image processor does, and the patch tokens of the chosen
  ``layers`` (``hidden_states`` indices) become ``(C, h, w)`` maps.
* ``toy_clip``: the toy world's stand-in — the frame encoder of the toy CLIP the project trains
  (``src/fewstep/assets/toy-clip``), its conv stages as the levels. Like DINOv2 it is a frozen,
  general-purpose per-frame image encoder trained without the student's objective; unlike the toy
  feature net it is not the network the evaluation's Fréchet distance uses, so the discriminator does
  not optimise the metric it is judged by (as DINOv2 is not FVD's I3D).
* ``denoiser``: a frozen copy of a denoiser (default the recipe's model, i.e. the teacher) read at t = 0 on
  the latents themselves, no decoding; the tokens of the chosen blocks laid on the token grid (AccVideo's
  clean-input features, objectives/adversarial.py; LADD's idea of discriminating in the generator's own
  feature space). A deviation from the paper's DINOv2 for the toy world, where the toy CLIP's heads never
  leave chance: offline, heads on the teacher's 2/3-depth block tell a CCD student's x̂0 from real clips
  (pair accuracy 0.88 after 300 steps at lr 1e-3) where the toy CLIP's stay at 0.62; in training it still
  does not improve the CCD student (λ_adv 0.01: no change; 0.1: worse; benchmarks/results/swiftvideo, round 3).
  It holds a second copy of the denoiser: for a real teacher use ``dinov2``.

Both objectives draw ``(t, ε)`` as the student role under the same names, so the discriminator sees the
same ``x_t`` the generator did, regenerating ``x̂0`` with the student as updated earlier in the step
(the project's rule for shared samples, :mod:`fewstep.objectives.student`).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..config import StrictModel
from ..diffusion.schedules import FlowMatching
from ..errors import UserError
from ..models.backbones import Conditioning
from ..models.features import clean_block, depth, extract_features, token_grid
from .base import (Batch, LogitNormalTimes, Objective, ObjectiveConfig, ObjectiveOutput, RoleName, Roles,
                   StepContext, TimestepsConfig, register_objective)
from .gan import hinge_discriminator_loss


# ---------------------------------------------------------------------------------------------
# Frozen image feature networks: images (N, 3, H, W) in [−1, 1] → [(N, C_k, h_k, w_k)]_k
# ---------------------------------------------------------------------------------------------

class Dinov2Frames(nn.Module):
    """A transformers ``Dinov2Model``'s patch tokens at ``layers`` as ``(N, C, h, w)`` maps (module doc)."""

    def __init__(self, model: nn.Module, layers: list[int], size: int, mean, std):
        super().__init__()
        n = model.config.num_hidden_layers
        bad = [i for i in layers if not 0 <= i <= n]
        if bad:
            raise UserError(f"DINOv2 feature layers {bad} are out of range for its {n} layers (hidden_states "
                            f"indices 0..{n})")
        self.model, self.layers, self.size = model, list(layers), size
        self.patch = model.config.patch_size
        self.channels = [model.config.hidden_size] * len(layers)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> list[Tensor]:
        h, w = images.shape[-2:]
        scale = self.size / min(h, w)  # shorter side → size, both sides multiples of the patch
        hw = (max(1, round(h * scale / self.patch)) * self.patch, max(1, round(w * scale / self.patch)) * self.patch)
        x = (images + 1) / 2  # [−1, 1] → [0, 1]
        if hw != (h, w):
            x = F.interpolate(x, size=hw, mode="bicubic", align_corners=False, antialias=hw[0] < h)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        hidden = self.model(pixel_values=x, output_hidden_states=True).hidden_states  # (depth + 1) × (N, 1 + h·w, C)
        gh, gw = hw[0] // self.patch, hw[1] // self.patch
        return [rearrange(hidden[i][:, 1:], "n (h w) c -> n c h w", h=gh, w=gw) for i in self.layers]


class DenoiserFeatures(nn.Module):
    """A frozen denoiser's hidden tokens on clean latents as ``(B, D, T', H', W')`` grids, one per ``blocks``.

    ``forward(latents (B, C, T, H, W), cond) -> [(B, D, T', H', W')]`` at t = 0 (AccVideo's clean-input
    features, :func:`~fewstep.models.features.extract_features`); the grid is the backbone's token grid. It
    reads latents, so the alignment objectives skip the decoder (``space = "latent"``).
    """

    space = "latent"

    def __init__(self, denoiser: nn.Module, blocks: list[int], width: int):
        super().__init__()
        n = depth(denoiser)
        bad = [b for b in blocks if not -n <= b < n]
        if bad:
            raise UserError(f"denoiser feature layers {bad} are out of range for its {n} blocks")
        self.denoiser, self.blocks = denoiser.eval().requires_grad_(False), list(blocks)
        self.channels = [width] * len(blocks)  # the model's hidden width

    def forward(self, latents: Tensor, cond: Conditioning) -> list[Tensor]:
        t = latents.new_zeros(latents.shape[0])
        tokens = extract_features(self.denoiser, latents, t, cond, self.blocks)  # [(B, N, D)]
        gt, gh, gw = token_grid(self.denoiser, latents.shape, tokens[0].shape[1])
        return [rearrange(x, "b (t h w) d -> b d t h w", t=gt, h=gh, w=gw) for x in tokens]


# ---------------------------------------------------------------------------------------------
# Heads and the discriminator
# ---------------------------------------------------------------------------------------------

class SpatialHead(nn.Sequential):
    """conv3×3 → LeakyReLU(0.2) → conv1×1 on every frame: ``(B, C, T, h, w) -> (B,)`` (mean of positions)."""

    def __init__(self, channels: int, width: int = 64):
        super().__init__(nn.Conv2d(channels, width, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(width, 1, 1))

    def forward(self, features: Tensor) -> Tensor:
        b = features.shape[0]
        frames = rearrange(features, "b c t h w -> (b t) c h w")  # every frame through the 2D head
        return rearrange(super().forward(frames), "(b t) 1 h w -> b (t h w)", b=b).mean(dim=1)  # (B,)


class TemporalHead(nn.Sequential):
    """conv3×3×3 across frames → LeakyReLU(0.2) → conv1×1×1: ``(B, C, T, h, w) -> (B,)`` (mean of positions)."""

    def __init__(self, channels: int, width: int = 64):
        super().__init__(nn.Conv3d(channels, width, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv3d(width, 1, 1))

    def forward(self, features: Tensor) -> Tensor:
        return super().forward(features).flatten(1).mean(dim=1)  # (B,)


class FeatureDiscriminator(nn.Module):
    """Frozen features + a spatial and/or a temporal head per feature level: ``(x, cond) → (B, K)`` logits.

    ``x``: frames (B, T, H, W, 3) in [−1, 1] for an image feature network (``space`` "pixel"; ``cond``
    unused), whose ``num_frames`` picks that many frames evenly in time first (None: all); latents
    (B, C, T, H, W) for :class:`DenoiserFeatures` (``space`` "latent"). The columns are the spatial heads of
    every level, then the temporal ones. The feature network stays in eval mode and frozen whatever
    ``train()`` is called with.
    """

    def __init__(self, features: nn.Module, width: int = 64, spatial: bool = True, temporal: bool = True,
                 num_frames: int | None = None):
        super().__init__()
        if not (spatial or temporal):
            raise UserError("the discriminator needs spatial or temporal heads (or both)")
        self.features = features.eval().requires_grad_(False)
        channels = features.channels
        self.spatial = nn.ModuleList([SpatialHead(c, width) for c in channels] if spatial else [])
        self.temporal = nn.ModuleList([TemporalHead(c, width) for c in channels] if temporal else [])
        self.num_frames = num_frames

    def train(self, mode: bool = True) -> "FeatureDiscriminator":
        super().train(mode)
        self.features.eval()
        return self

    @property
    def space(self) -> str:
        """What the discriminator reads: "pixel" (decoded frames) or "latent" (the model's latents)."""
        return getattr(self.features, "space", "pixel")

    def forward(self, x: Tensor, cond: Conditioning | None = None) -> Tensor:
        if self.space == "latent":
            grids = self.features(x, cond)  # [(B, C_k, T', h_k, w_k)]
        else:
            b, t = x.shape[:2]
            if self.num_frames is not None and self.num_frames < t:
                x = x[:, torch.linspace(0, t - 1, self.num_frames, device=x.device).round().long()]
                t = self.num_frames
            maps = self.features(rearrange(x, "b t h w c -> (b t) c h w"))  # [(B·T, C_k, h_k, w_k)]
            grids = [rearrange(m, "(b t) c h w -> b c t h w", b=b, t=t) for m in maps]  # [(B, C_k, T, h_k, w_k)]
        logits = [head(g) for head, g in zip(self.spatial, grids)] + [head(g) for head, g in zip(self.temporal, grids)]
        return torch.stack(logits, dim=1)  # (B, K)


class FeatureDiscriminatorConfig(StrictModel):
    """The discriminator of SwiftVideo's distribution alignment (module doc); a role builder's keys."""

    features: Literal["toy_clip", "dinov2", "denoiser"] = Field("toy_clip", description=(
        "frozen feature network: toy_clip (frames; the toy world's image encoder), dinov2 (frames; a local "
        "Dinov2Model) or denoiser (latents; a frozen denoiser's clean-input tokens)"))
    path: str | None = Field(None, description=(
        "toy_clip: a shipped name or directory (null: the shipped toy-clip); dinov2: its local directory; "
        "denoiser: a shipped model name or directory (null: a frozen copy of the recipe's model)"))
    layers: list[int] | None = Field(None, min_length=1, description=(
        "feature levels with heads: toy_clip conv stages (null: all); dinov2 hidden_states indices "
        "(null: 4 evenly spaced, as StyleGAN-T's [2, 5, 8, 11] of 12); denoiser blocks (null: the block at 2/3 "
        "of the depth, AccVideo's clean-feature block)"))
    size: int | None = Field(None, ge=8, description="dinov2: shorter image side fed to it (null: its crop size, "
                                                     "else its config's image_size)")
    width: int = Field(64, ge=1, description="channels of each head's hidden conv")
    spatial: bool = Field(True, description="spatial heads: a 2D head on every frame per level")
    temporal: bool = Field(True, description="temporal heads: a 3D head across the frames per level")
    frames: int | None = Field(None, ge=1, description="frames picked evenly from each clip (null: all)")

    @model_validator(mode="after")
    def _dinov2_path(self) -> "FeatureDiscriminatorConfig":
        if self.features == "dinov2" and self.path is None:
            raise ValueError("features: dinov2 needs path: a local Dinov2Model directory (nothing is downloaded)")
        return self


def build_feature_discriminator(config: FeatureDiscriminatorConfig, model=None) -> FeatureDiscriminator:
    """Load the frozen feature network and attach fresh heads; ``model``: the recipe's (``features: denoiser``
    without ``path`` copies its denoiser)."""
    if config.features == "denoiser":
        if config.path is not None:
            from ..models.family import load_model

            source = load_model(config.path)
            denoiser = source.denoiser
        elif model is None:
            raise UserError("features: denoiser needs path: a model name or directory (no recipe model here)")
        else:
            source, denoiser = model, copy.deepcopy(model.denoiser)
        features = DenoiserFeatures(denoiser, config.layers or [clean_block(denoiser)], source.hidden_dim)
    elif config.features != "dinov2":  # a frame encoder registered with the rewards (the toy world's stand-in)
        from ..rewards import FRAME_FEATURES

        features = FRAME_FEATURES[config.features](config.path, config.layers)
    else:
        from ..eval.generic import VisionFeatures

        loaded = VisionFeatures.load(Path(config.path), what="discriminator features")
        if loaded.name != "Dinov2Model":
            raise UserError(f"discriminator features {config.path}: a {loaded.name}; features: dinov2 needs a "
                            f"Dinov2Model directory")
        n = loaded.model.config.num_hidden_layers
        layers = config.layers or sorted({max(1, round(n * (i + 1) / 4)) for i in range(4)})
        features = Dinov2Frames(loaded.model, layers, config.size or loaded.size, loaded.mean.flatten().tolist(),
                                loaded.std.flatten().tolist())
    return FeatureDiscriminator(features, config.width, config.spatial, config.temporal, config.frames)


# ---------------------------------------------------------------------------------------------
# Eq. 10
# ---------------------------------------------------------------------------------------------

def hinge_generator_loss_eq10(d_fake: Tensor) -> Tensor:
    """SwiftVideo Eq. 10 for G: ``Σ_k max(0, 1 − D_k(x̂0))`` per sample; d_fake (B, K) → (B,)."""
    return F.relu(1 - d_fake).sum(dim=1)


def hinge_discriminator_loss_eq10(d_real: Tensor, d_fake: Tensor) -> Tensor:
    """SwiftVideo Eq. 10 for D: ``Σ_k [max(0, 1 − D_k(x0)) + max(0, 1 + D_k(x̂0))]``; (B, K) each → (B,)."""
    return hinge_discriminator_loss(d_real, d_fake).sum(dim=1)


class AlignmentConfig(ObjectiveConfig):
    """Keys both DA objectives have."""

    timesteps: TimestepsConfig = Field(default_factory=lambda: LogitNormalTimes(mean=-0.6, std=1.4), description=(
        "distribution of the paper's t = σ for x_t (as CCD's)"))
    decoder: str | None = Field(None, description="model (shipped name or directory) whose codec decodes latents; "
                                                  "null: the recipe's model")


class AlignmentGeneratorConfig(AlignmentConfig):
    kind: Literal["da_generator"] = "da_generator"
    discriminator: RoleName = Field("discriminator", description="the role holding the feature discriminator")
    generator_form: Literal["clipped", "linear"] = Field(
        "clipped", description="clipped: Eq. 10's max(0, 1 − D_k); linear: −D_k (RGTD Eq. 11)")

    @property
    def student(self) -> str:
        return self.role

    def reads(self) -> set[str]:
        return {self.discriminator}


class AlignmentDiscriminatorConfig(AlignmentConfig):
    kind: Literal["da_discriminator"] = "da_discriminator"
    role: RoleName = Field("discriminator", description="the role holding the feature discriminator")
    generator: RoleName = Field("student", description="the role whose one-step predictions are the fakes")

    @property
    def student(self) -> str:
        return self.generator

    def reads(self) -> set[str]:
        return {self.generator}


class _Alignment(Objective):
    """Shared: the frozen decoder (assigned by the recipe) and the one-step prediction x̂0 of Eq. 10."""

    def __init__(self, config, name: str):
        super().__init__(config, name)
        self.decoder = None  # latents (B, C, T', H', W') → frames (B, T, H, W, 3) in [−1, 1]; the recipe assigns it

    def view(self, latents: Tensor, disc: nn.Module) -> Tensor:
        """What ``disc`` reads of ``latents``: decoded frames, or the latents themselves (``space`` "latent")."""
        return latents if getattr(disc, "space", "pixel") == "latent" else self.decode(latents)

    def decode(self, latents: Tensor) -> Tensor:
        if self.decoder is None:
            raise UserError(f"objective {self.name!r} ({self.config.kind}) has no decoder: set its 'decoder' key to a "
                            f"model name or directory (the recipe assigns that model's decoder)")
        return self.decoder(latents)  # (B, T, H, W, 3) in [−1, 1]

    def one_step(self, batch: Batch, roles: Roles, ctx: StepContext) -> Tensor:
        """``x̂0 = x_t − t·F_θ(x_t, t)`` (B, C, T, H, W), drawn as the student role (module doc). On a flow
        schedule the drawn time is the paper's t = σ; on another it is the model time and x̂0 the student's x0."""
        student = roles[self.config.student].module
        as_student = replace(ctx, role=self.config.student)
        x0 = batch.latents
        drawn = as_student.times(self.distribution, "da/t").to(x0.dtype)  # (B,)
        t = student.schedule.unshift(drawn) if isinstance(student.schedule, FlowMatching) else drawn
        eps = as_student.randn(tuple(x0.shape[1:]), "da/eps", dtype=x0.dtype)
        x_t = student.schedule.add_noise(x0, eps, t)
        return student.predict(x_t, t, batch.cond).x0  # flow: (x_t − σ·F)/(α + σ) = x_t − σ·F


@register_objective
class AlignmentGenerator(_Alignment):
    """SwiftVideo Eq. 10, L^G's adversarial term for the student (module doc)."""

    kind = "da_generator"
    Config = AlignmentGeneratorConfig

    def __call__(self, batch: Batch, roles: Roles, ctx: StepContext) -> ObjectiveOutput:
        disc = roles[self.config.discriminator].module
        fake = self.view(self.one_step(batch, roles, ctx), disc)  # frames (B, T, H, W, 3) or latents
        params = {n: p.detach() for n, p in disc.named_parameters()}  # D as a fixed function: no gradient to it
        d_fake = torch.func.functional_call(disc, params, (fake, batch.cond))  # (B, K)
        loss = hinge_generator_loss_eq10(d_fake) if self.config.generator_form == "clipped" else -d_fake.sum(dim=1)
        return self.output({"adv": loss}, {"d_fake": float(d_fake.detach().mean())})


@register_objective
class AlignmentDiscriminator(_Alignment):
    """SwiftVideo Eq. 10, L^D: real decoded latents against decoded one-step predictions (module doc)."""

    kind = "da_discriminator"
    Config = AlignmentDiscriminatorConfig

    def __call__(self, batch: Batch, roles: Roles, ctx: StepContext) -> ObjectiveOutput:
        disc = roles[self.role].module
        with torch.no_grad():
            real = self.view(batch.latents, disc)  # frames (B, T, H, W, 3) or latents
            fake = self.view(self.one_step(batch, roles, ctx), disc)
        d_real, d_fake = disc(real, batch.cond), disc(fake, batch.cond)  # (B, K) each
        loss = hinge_discriminator_loss_eq10(d_real, d_fake)
        return self.output({"adv": loss}, {"d_real": float(d_real.detach().mean()),
                                           "d_fake": float(d_fake.detach().mean())})
