"""One type for every prediction parameterisation (DESIGN §2).

For ``x_t = α·x0 + σ·ε`` a network may predict any of

==============  ==============================  =========================================
``kind``        network output                  recovered (x0, ε)
==============  ==============================  =========================================
``eps``         ε                               x0 = (x_t − σ·ε)/α
``x0``          x0                              ε = (x_t − α·x0)/σ
``v``           v = α·ε − σ·x0                  x0 = (α·x_t − σ·v)/(α² + σ²),
                (Salimans & Ho 2022)            ε  = (σ·x_t + α·v)/(α² + σ²)
``flow``        u = ε − x0                      x0 = (x_t − σ·u)/(α + σ),
                (rectified flow; Wan)           ε  = (x_t + α·u)/(α + σ)
``conjugate``   c = x0 − ε                      x0 = (x_t + σ·c)/(α + σ)   (DOLLAR Eq. 8)
                (DOLLAR Eq. 4)                  ε  = (x_t − α·c)/(α + σ)
==============  ==============================  =========================================

and the score is ``s(x_t) = −ε/σ = −(x_t − α·x0)/σ²`` (DOLLAR Eq. 13).

The ``v`` inverse is written for a general (α, σ); under a VP schedule α² + σ² = 1 and it
reduces to the familiar ``x0 = α·x_t − σ·v``. ``eps`` cannot give x0 where α = 0 and ``x0``
cannot give ε where σ = 0; the other three are well defined on all of ``t ∈ [0, 1]``.

A :class:`Prediction` stores the pair ``(x0, eps)``; every other quantity is derived, so
objectives never convert by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from ..errors import UserError

PredictionType = Literal["eps", "x0", "v", "flow", "conjugate"]
PREDICTION_TYPES: tuple[str, ...] = ("eps", "x0", "v", "flow", "conjugate")


def check_prediction_type(kind: str) -> str:
    if kind not in PREDICTION_TYPES:
        raise UserError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}; got {kind!r}")
    return kind


def to_x0_eps(kind: str, output: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """Recover ``(x0, eps)`` from a network ``output`` of parameterisation ``kind`` (table above)."""
    if kind == "eps":
        return (x_t - sigma * output) / alpha, output
    if kind == "x0":
        return output, (x_t - alpha * output) / sigma
    if kind == "v":
        norm = alpha**2 + sigma**2
        return (alpha * x_t - sigma * output) / norm, (sigma * x_t + alpha * output) / norm
    if kind == "flow":
        norm = alpha + sigma
        return (x_t - sigma * output) / norm, (x_t + alpha * output) / norm
    if kind == "conjugate":  # DOLLAR Eq. 8 for x0
        norm = alpha + sigma
        return (x_t + sigma * output) / norm, (x_t - alpha * output) / norm
    raise UserError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}; got {kind!r}")


def from_x0_eps(kind: str, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The network target of parameterisation ``kind`` for a given ``(x0, eps)``."""
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "v":
        return alpha * eps - sigma * x0
    if kind == "flow":
        return eps - x0
    if kind == "conjugate":  # DOLLAR Eq. 4 target
        return x0 - eps
    raise UserError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}; got {kind!r}")


@dataclass(frozen=True)
class Prediction:
    """A denoiser's prediction at ``(x_t, t)``: the pair ``(x0, eps)`` plus the coefficients.

    ``alpha`` and ``sigma`` are broadcastable against ``x_t`` (``(B, 1, 1, 1, 1)`` or scalars).
    """

    x_t: Tensor  # (B, C, T, H, W)
    alpha: Tensor
    sigma: Tensor
    x0: Tensor  # (B, C, T, H, W)
    eps: Tensor  # (B, C, T, H, W)

    @classmethod
    def from_output(cls, kind: str, output: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> "Prediction":
        x0, eps = to_x0_eps(kind, output, x_t, alpha, sigma)
        return cls(x_t=x_t, alpha=alpha, sigma=sigma, x0=x0, eps=eps)

    def to(self, kind: str) -> Tensor:
        """This prediction in parameterisation ``kind`` (e.g. to compare with a network output)."""
        return from_x0_eps(kind, self.x0, self.eps, self.alpha, self.sigma)

    @property
    def v(self) -> Tensor:
        """v = α·ε − σ·x0."""
        return self.alpha * self.eps - self.sigma * self.x0

    @property
    def flow(self) -> Tensor:
        """u = ε − x0: the flow-matching velocity dx_t/dσ along the straight path."""
        return self.eps - self.x0

    velocity = flow

    @property
    def conjugate(self) -> Tensor:
        """DOLLAR's conjugate velocity x0 − ε (Eq. 4)."""
        return self.x0 - self.eps

    @property
    def score(self) -> Tensor:
        """s(x_t) = −ε/σ = −(x_t − α·x0)/σ² (DOLLAR Eq. 13)."""
        return -self.eps / self.sigma

    def guided(self, uncond: "Prediction", scale: float | Tensor) -> "Prediction":
        """Classifier-free guidance ``uncond + w·(cond − uncond)`` with ``self`` as ``cond``.

        DESIGN §2's single CFG formula (w = 1 is the conditional prediction). Every
        parameterisation is an affine function of ``(x0, eps)`` with the same ``x_t``, and the
        weights ``(1 − w, w)`` sum to one, so guiding ``(x0, eps)`` equals guiding the raw
        output of any parameterisation — eps-, v- and flow-space CFG all agree.
        """
        x0 = uncond.x0 + scale * (self.x0 - uncond.x0)
        eps = uncond.eps + scale * (self.eps - uncond.eps)
        return Prediction(x_t=self.x_t, alpha=self.alpha, sigma=self.sigma, x0=x0, eps=eps)
