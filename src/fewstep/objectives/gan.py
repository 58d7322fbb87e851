"""GAN losses and plain discriminator heads, shared by the adversarial objectives.

Losses, per sample from discriminator logits ``d = D(·)`` (B,), with ``D = sigmoid(d)`` where a
probability is meant:

* **hinge** (RGTD (000) Eq. 11–12; SwiftVideo (003) Eq. 10)::

      L_D = E[max(0, 1 − d_real)] + E[max(0, 1 + d_fake)]        (Eq. 12)
      L_G = −E[d_fake]                                            (Eq. 11)

  (SwiftVideo's Eq. 10 writes the generator's term as ``max(0, 1 − d_fake)``, the hinge clipped
  at the margin; the functions here are RGTD's plain ``−d_fake``.)
* **non-saturating** (Goodfellow et al. 2014; AccVideo (002) Eq. 7 with ``D = sigmoid(d)``)::

      L_D = −log D(real) − log(1 − D(fake)) = softplus(−d_real) + softplus(d_fake)
      L_G = −log D(fake) = softplus(−d_fake)

* **minimax**: the same ``L_D``; ``L_G = log(1 − D(fake)) = −softplus(d_fake)``, Eq. 7 literally.

Heads: :class:`FrameHead` is one small 2-D CNN applied to every frame of a feature grid
``(B, D, T', H', W')``, averaged to one logit per sample; :class:`MultiHeads` is one FrameHead per
feature map (RGTD §3.3's multi-head discriminator on several teacher layers, or SwiftVideo's heads
on several feature levels), each head giving its own logit. AccVideo's timestep-aware heads
(:class:`fewstep.objectives.adversarial.TimestepHeads`) are FrameHeads chosen by timestep.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

GANLoss = Literal["non_saturating", "minimax", "hinge"]


# ---------------------------------------------------------------------------------------------
# Losses (per sample)
# ---------------------------------------------------------------------------------------------

def hinge_discriminator_loss(d_real: Tensor, d_fake: Tensor) -> Tensor:
    """RGTD Eq. 12: ``max(0, 1 − d_real) + max(0, 1 + d_fake)`` per sample (B,)."""
    return F.relu(1 - d_real) + F.relu(1 + d_fake)


def hinge_generator_loss(d_fake: Tensor) -> Tensor:
    """RGTD Eq. 11: ``−d_fake`` per sample (B,)."""
    return -d_fake


def non_saturating_discriminator_loss(d_real: Tensor, d_fake: Tensor) -> Tensor:
    """AccVideo Eq. 7 for D: ``−log D(real) − log(1 − D(fake)) = softplus(−d_real) + softplus(d_fake)`` (B,)."""
    return F.softplus(-d_real) + F.softplus(d_fake)


def non_saturating_generator_loss(d_fake: Tensor) -> Tensor:
    """Goodfellow et al.'s generator loss for Eq. 7: ``−log D(fake) = softplus(−d_fake)`` (B,)."""
    return F.softplus(-d_fake)


def minimax_generator_loss(d_fake: Tensor) -> Tensor:
    """AccVideo Eq. 7 for G literally: ``log(1 − D(fake)) = −softplus(d_fake)`` (B,)."""
    return -F.softplus(d_fake)


def discriminator_loss(kind: GANLoss, d_real: Tensor, d_fake: Tensor) -> Tensor:
    """The discriminator's loss of the GAN form ``kind`` from logits (B,) (module doc)."""
    if kind == "hinge":
        return hinge_discriminator_loss(d_real, d_fake)
    return non_saturating_discriminator_loss(d_real, d_fake)  # minimax and non-saturating share L_D


def generator_loss(kind: GANLoss, d_fake: Tensor) -> Tensor:
    """The generator's loss of the GAN form ``kind`` from logits (B,) (module doc)."""
    if kind == "hinge":
        return hinge_generator_loss(d_fake)
    if kind == "minimax":
        return minimax_generator_loss(d_fake)
    return non_saturating_generator_loss(d_fake)


# ---------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------

class FrameHead(nn.Sequential):
    """conv3×3 → GroupNorm → SiLU → conv1×1 on every frame: ``(B, D, T', H', W') -> (B,)``.

    One logit per position of every frame, averaged over frames and positions. As a
    ``Sequential`` its layers are ``head[0] … head[3]`` (applied to one frame ``(N, D, H', W')``
    by :meth:`frames`).
    """

    def __init__(self, channels: int, width: int = 64):
        super().__init__(nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(math.gcd(32, width), width),
                         nn.SiLU(), nn.Conv2d(width, 1, 1))

    def frames(self, x: Tensor) -> Tensor:
        """The layers on frames ``(N, D, H', W') -> (N, 1, H', W')``."""
        return super().forward(x)

    def forward(self, features: Tensor) -> Tensor:
        b = features.shape[0]
        x = rearrange(features, "b d t h w -> (b t) d h w")  # every frame through the 2D head
        out = rearrange(self.frames(x), "(b t) 1 h w -> b (t h w)", b=b)
        return out.mean(dim=1)  # (B,)


class MultiHeads(nn.Module):
    """One :class:`FrameHead` per feature map: ``[(B, D_i, T', H', W')]_i -> (B, n_heads)`` logits.

    RGTD §3.3's multi-head discriminator; the losses above apply to each head's column and a
    caller averages (or sums, SwiftVideo Eq. 10's ``Σ_k``) over heads.
    """

    def __init__(self, channels: Sequence[int], width: int = 64):
        super().__init__()
        self.heads = nn.ModuleList([FrameHead(c, width) for c in channels])

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        if len(features) != len(self.heads):
            raise ValueError(f"{len(self.heads)} heads need {len(self.heads)} feature maps, got {len(features)}")
        return torch.stack([head(f) for head, f in zip(self.heads, features)], dim=1)  # (B, n_heads)
