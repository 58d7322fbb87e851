"""Noise schedules and timestep distributions on the continuous time of DESIGN §2.

Every schedule defines the forward process on continuous time ``t ∈ [0, 1]`` (``t = 1`` is
pure noise)::

    x_t = alpha(t) · x0 + sigma(t) · eps,        eps ~ N(0, I)

and ``model_timestep(t)``, the number the backbone was trained to receive.

* :class:`FlowMatching` — rectified flow / flow matching (Wan, HunyuanVideo, the toy teacher):
  ``alpha = 1 − t'``, ``sigma = t'`` with the resolution shift ``t' = s·t / (1 + (s − 1)·t)``;
  the backbone sees ``1000 · t'`` (as diffusers' ``FlowMatchEulerDiscreteScheduler`` feeds it).
* :class:`VPDiscrete` — DDPM's discrete variance-preserving schedule (CogVideoX; DOLLAR Eq. 1):
  ``ᾱ_k = Π_{i ≤ k} (1 − β_i)`` for integer ``k ∈ {0..999}``, ``alpha = √ᾱ``, ``sigma = √(1 − ᾱ)``.
  Continuous time maps to the integer index by ``k = 1000·t − 1``: the grid point ``k`` sits at
  ``t = (k + 1)/1000``, so ``k = 999`` is ``t = 1`` and ``t = 0`` is the clean sample (ᾱ = 1,
  DDIM's ``final_alpha_cumprod`` with ``set_alpha_to_one``). Between grid points ᾱ is linearly
  interpolated, which keeps ``alpha(t)``/``sigma(t)`` differentiable in ``t`` for JVPs.
  CogVideoX's options (its diffusers schedulers ``CogVideoXDDIMScheduler``/``CogVideoXDPMScheduler``):
  the SNR shift ``ᾱ ← ᾱ / (s + (1 − s)·ᾱ)`` (SNR divided by ``s``, ``snr_shift_scale``) and then the
  zero-terminal-SNR rescale.

Named grids of integer timesteps (DOLLAR's ``[999, 749, 499, 249]``, the 50-step DDIM grid
``[999, 979, …, 19]``) are turned into continuous times by :meth:`Schedule.t_from_index`, the
inverse of ``model_timestep`` on the unshifted schedule (``(k + 1)/1000`` for VP, ``k/1000`` for
flow matching, as the DOLLAR issue specifies for flow teachers).
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from typing import Annotated, Any, Literal, Sequence, Union

import torch
from pydantic import Discriminator, Field, Tag
from torch import Tensor

from ..config import StrictModel
from ..errors import UserError

NUM_TRAIN_TIMESTEPS = 1000


def _as_tensor(t: Tensor | float | Sequence[float], like: Tensor | None = None) -> Tensor:
    """Continuous times as a float tensor (float64 for python numbers, else ``t``'s own dtype)."""
    if isinstance(t, Tensor):
        return t
    dtype = like.dtype if like is not None and like.is_floating_point() else torch.float64
    device = like.device if like is not None else None
    return torch.as_tensor(t, dtype=dtype, device=device)


def expand_like(coef: Tensor, x: Tensor) -> Tensor:
    """Broadcast a per-sample coefficient ``(B,)`` (or scalar) against ``x`` of shape ``(B, ...)``."""
    coef = coef.to(dtype=x.dtype, device=x.device)
    if coef.ndim == 0:
        return coef
    return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


class Schedule(ABC):
    """A forward process ``x_t = alpha(t)·x0 + sigma(t)·eps`` on ``t ∈ [0, 1]``."""

    name: str

    @abstractmethod
    def alpha(self, t: Tensor) -> Tensor:
        """Signal coefficient α(t), same shape as ``t``."""

    @abstractmethod
    def sigma(self, t: Tensor) -> Tensor:
        """Noise coefficient σ(t), same shape as ``t``."""

    @abstractmethod
    def model_timestep(self, t: Tensor) -> Tensor:
        """What the backbone receives for time ``t`` (shape of ``t``)."""

    @abstractmethod
    def t_from_index(self, k: Sequence[int] | Tensor) -> Tensor:
        """Continuous times of integer timesteps ``k`` (DOLLAR-style grids such as [999, 749, …])."""

    def coefficients(self, t: Tensor | float, like: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha, sigma)`` broadcast against ``like`` (a ``(B, C, T, H, W)`` tensor)."""
        t = _as_tensor(t, like)
        return expand_like(self.alpha(t), like), expand_like(self.sigma(t), like)

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
        """Forward diffusion ``x_t = α(t)·x0 + σ(t)·eps`` (DOLLAR Eq. 1; AccVideo Eq. 1)."""
        alpha, sigma = self.coefficients(t, x0)
        return alpha * x0 + sigma * eps

    def diffuse(self, x_s: Tensor, s: Tensor | float, t: Tensor | float, eps: Tensor) -> Tensor:
        """The forward transition ``q(x_t | x_s)`` from a state at time ``s`` to a later time ``t ≥ s``::

            x_t = (α_t/α_s)·x_s + √(σ_t² − (α_t·σ_s/α_s)²)·eps

        so that a sample ``x_s = α_s·x0 + σ_s·ε`` lands at ``α_t·x0 + σ_t·ε'`` in law (RGTD Eq. 3's
        ``q(x_τ | x_{t_i})``); at ``s = 0`` it is :meth:`add_noise`. ``s``, ``t``: scalars or ``(B,)``.
        """
        alpha_s, sigma_s = self.coefficients(s, x_s)
        alpha_t, sigma_t = self.coefficients(t, x_s)
        ratio = alpha_t / alpha_s
        return ratio * x_s + (sigma_t**2 - (ratio * sigma_s) ** 2).clamp(min=0).sqrt() * eps

    def is_variance_preserving(self) -> bool:
        return False

    def describe(self) -> dict:
        return {"name": self.name}


class FlowMatching(Schedule):
    """Flow matching with the usual resolution shift (Esser et al. 2024; Wan; HunyuanVideo).

    ``t' = s·t / (1 + (s − 1)·t)``,  ``alpha = 1 − t'``,  ``sigma = t'``,  model timestep ``1000·t'``.
    """

    name = "flow"

    def __init__(self, shift: float = 1.0):
        if not shift > 0:
            raise UserError(f"schedule.shift must be > 0, got {shift}")
        self.shift = float(shift)

    def shifted(self, t: Tensor) -> Tensor:
        """The shifted time ``t'`` (equals ``sigma(t)``)."""
        s = self.shift
        if s == 1.0:
            return t
        return s * t / (1 + (s - 1) * t)

    def alpha(self, t: Tensor) -> Tensor:
        return 1 - self.shifted(t)

    def sigma(self, t: Tensor) -> Tensor:
        return self.shifted(t)

    def model_timestep(self, t: Tensor) -> Tensor:
        return NUM_TRAIN_TIMESTEPS * self.shifted(t)

    def t_from_index(self, k: Sequence[int] | Tensor) -> Tensor:
        return torch.as_tensor(k, dtype=torch.float64) / NUM_TRAIN_TIMESTEPS

    def unshift(self, sigma: Tensor) -> Tensor:
        """Inverse of :meth:`shifted`: the ``t`` whose shifted time is ``sigma``."""
        s = self.shift
        return sigma / (s - (s - 1) * sigma)

    def describe(self) -> dict:
        return {"name": self.name, "shift": self.shift}


def make_betas(kind: str, num_steps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = 1e-4,
               beta_end: float = 0.02) -> Tensor:
    """DDPM betas: ``linear`` (Ho et al. 2020) or ``scaled_linear`` (LDM / Stable Diffusion)."""
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
    raise UserError(f"schedule.betas must be 'linear' or 'scaled_linear', got {kind!r}")


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2024 ("Common diffusion noise schedules are flawed"), Algorithm 1.

    Shift and scale √ᾱ so that √ᾱ_last = 0 (SNR 0 at ``t = 1``) while √ᾱ_0 is unchanged.
    """
    sqrt_abar = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def shift_snr(betas: Tensor, scale: float) -> Tensor:
    """CogVideoX's SNR shift (its SAT code's ``ZeroSNRDDPMDiscretization``; diffusers' CogVideoX schedulers).

    ``ᾱ' = ᾱ / (s + (1 − s)·ᾱ)``, i.e. ``SNR' = ᾱ'/(1 − ᾱ') = SNR / s`` at every step; returns the betas
    of ``ᾱ'``.
    """
    abar = torch.cumprod(1 - betas, dim=0)
    abar = abar / (scale + (1 - scale) * abar)
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


class VPDiscrete(Schedule):
    """DDPM's discrete VP schedule (DOLLAR Eq. 1) on continuous time, ``k = 1000·t − 1``.

    ``snr_shift_scale`` ``s ≠ 1`` divides every SNR by ``s`` (:func:`shift_snr`, CogVideoX) before the
    optional zero-terminal-SNR rescale, in the order of diffusers' CogVideoX schedulers.
    """

    name = "vp"

    def __init__(self, betas: str = "scaled_linear", beta_start: float = 0.00085, beta_end: float = 0.012,
                 zero_terminal_snr: bool = False, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
                 snr_shift_scale: float = 1.0, trained_betas: Sequence[float] | None = None):
        """``trained_betas``: the N betas themselves (a scheduler's ``trained_betas``; shift and rescale
        are then already in them and must be left at their defaults)."""
        if not snr_shift_scale > 0:
            raise UserError(f"schedule.snr_shift_scale must be > 0, got {snr_shift_scale}")
        self.betas_kind, self.beta_start, self.beta_end = betas, beta_start, beta_end
        self.zero_terminal_snr = zero_terminal_snr
        self.num_train_timesteps = num_train_timesteps
        self.snr_shift_scale = float(snr_shift_scale)
        if trained_betas is not None:
            if len(trained_betas) != num_train_timesteps or zero_terminal_snr or snr_shift_scale != 1.0:
                raise UserError(f"schedule: {len(trained_betas)} trained betas for {num_train_timesteps} timesteps "
                                f"(with no SNR shift or rescale of their own)")
            betas = "trained"
        b = (torch.as_tensor(trained_betas, dtype=torch.float64) if trained_betas is not None
             else make_betas(betas, num_train_timesteps, beta_start, beta_end))
        if snr_shift_scale != 1.0:
            b = shift_snr(b, self.snr_shift_scale)
        if zero_terminal_snr:
            b = rescale_zero_terminal_snr(b)
        self.betas = b  # (N,) float64
        # ᾱ on the grid k = -1, 0, …, N-1 (k = -1 is t = 0, the clean sample with ᾱ = 1)
        self._abar = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - b, dim=0)])

    @property
    def alphas_cumprod(self) -> Tensor:
        """ᾱ_k for k = 0..N-1, as diffusers' ``DDPMScheduler.alphas_cumprod``."""
        return self._abar[1:]

    def alpha_bar(self, t: Tensor) -> Tensor:
        """ᾱ(t), linear interpolation between grid points ``t = (k + 1)/N``."""
        n = self.num_train_timesteps
        pos = (t * n).clamp(0, n)  # position on the extended grid k + 1 ∈ [0, N]
        lo = pos.detach().floor().clamp(max=n - 1)
        frac = pos - lo
        abar = self._abar.to(device=t.device, dtype=t.dtype if t.is_floating_point() else torch.float64)
        lo_i = lo.long()
        return abar[lo_i] * (1 - frac) + abar[lo_i + 1] * frac

    def alpha(self, t: Tensor) -> Tensor:
        return self.alpha_bar(t).clamp(min=0).sqrt()

    def sigma(self, t: Tensor) -> Tensor:
        return (1 - self.alpha_bar(t)).clamp(min=0).sqrt()

    def model_timestep(self, t: Tensor) -> Tensor:
        return t * self.num_train_timesteps - 1

    def t_from_index(self, k: Sequence[int] | Tensor) -> Tensor:
        return (torch.as_tensor(k, dtype=torch.float64) + 1) / self.num_train_timesteps

    def is_variance_preserving(self) -> bool:
        return True

    def describe(self) -> dict:
        return {"name": self.name, "betas": self.betas_kind, "beta_start": self.beta_start,
                "beta_end": self.beta_end, "zero_terminal_snr": self.zero_terminal_snr,
                "snr_shift_scale": self.snr_shift_scale}


# --------------------------------------------------------------------------------------------
# Timestep grids (for samplers and consistency targets) and distributions (for training)
# --------------------------------------------------------------------------------------------

#: Named grids of integer timesteps, largest first (``t_from_index`` maps them to continuous t).
INDEX_GRIDS: dict[str, list[int]] = {
    # DOLLAR §4.1: the teacher's 50-step DDIM grid t_n ∈ [19, 39, …, 999] ("trailing" spacing)
    "ddim50": list(range(999, 0, -20)),
    # DOLLAR §4.5: 1-, 2- and 4-step students
    "dollar1": [999],
    "dollar2": [999, 499],
    "dollar4": [999, 749, 499, 249],
}

#: Named grids already in continuous time (largest first, ending at 0 where the paper does).
TIME_GRIDS: dict[str, list[float]] = {
    # AccVideo §3.3: key diffusion timesteps t'_5 … t'_0
    "accvideo_keys": [1.0, 0.9651, 0.9130, 0.8235, 0.6363, 0.0],
    # AccVideo §5.2, Tab. 4: the uniform grid of its timestep ablation
    "accvideo_uniform": [1.0, 0.8, 0.6, 0.4, 0.2, 0.0],
    # N equal steps from t = 1: on a flow teacher the grids a stock diffusers scheduler visits exactly
    # (fewstep export); dollarN's 999 starts at t = 0.999 there (σ off by ~3e-4)
    "uniform1": [1.0, 0.0],
    "uniform2": [1.0, 0.5, 0.0],
    "uniform4": [1.0, 0.75, 0.5, 0.25, 0.0],
}


#: ``uniformN``: N equal steps of t from 1 to 0 (any N; uniform1/2/4 are listed above). ``uniformN_shiftS``:
#: the same N steps of u, each shifted ``t = S·u / (1 + (S − 1)·u)`` — the flow-matching time shift (SD3,
#: Wan's ``sample_shift``) applied to the sampling grid alone, on top of the schedule's own; e.g.
#: ``uniform4_shift3`` = [1, 0.9, 0.75, 0.5, 0]: more of the steps at high noise.
SHIFTED_GRID = re.compile(r"uniform([1-9][0-9]*)(?:_shift([0-9]+(?:\.[0-9]+)?))?")


def time_grid(name: str) -> list[float] | None:
    """The continuous times of a grid name of :data:`TIME_GRIDS` or :data:`SHIFTED_GRID`; None if neither."""
    if name in TIME_GRIDS:
        return TIME_GRIDS[name]
    match = SHIFTED_GRID.fullmatch(name)
    if match is None or float(match[2] or 1) <= 0:
        return None
    n, shift = int(match[1]), float(match[2] or 1)
    return [shift * u / (1 + (shift - 1) * u) for u in (1 - i / n for i in range(n + 1))]


def unknown_grid(name: str) -> UserError:
    """The error for a grid name that is none of the known ones (listed in the message)."""
    listed = ", ".join(sorted([*INDEX_GRIDS, *TIME_GRIDS]))
    return UserError(f"unknown timestep grid {name!r}; known grids: {listed}, uniformN, uniformN_shiftS "
                     f"(e.g. uniform8, uniform4_shift3)")


def named_grid(name: str, schedule: Schedule) -> Tensor:
    """Continuous times (float64, decreasing) of a named grid for ``schedule``."""
    if name in INDEX_GRIDS:
        return schedule.t_from_index(INDEX_GRIDS[name])
    if (times := time_grid(name)) is not None:
        return torch.tensor(times, dtype=torch.float64)
    raise unknown_grid(name)


def grid_steps(name: str) -> int:
    """How many network calls a named grid takes (its times > 0); an unknown name is a :class:`UserError`."""
    if name in INDEX_GRIDS:
        return len(INDEX_GRIDS[name])
    if (times := time_grid(name)) is None:
        raise unknown_grid(name)
    return sum(1 for t in times if t > 0)


def grid_times(name: str, schedule: Schedule) -> list[float]:
    """The times a sampler visits on a named grid: the grid's times > 0 on ``schedule``, then 0."""
    times = named_grid(name, schedule)
    return [*times[times > 0].tolist(), 0.0]


#: How an N-step sampler spreads its steps when the model has no explicit times of its own.
GRID_SPACINGS = ("uniform", "diffusers")


def sampling_grid(schedule: Schedule, num_steps: int, spacing: str = "uniform") -> Tensor:
    """The ``num_steps + 1`` times an N-step sampler visits, from ``t = 1`` down to ``t = 0``.

    * ``"uniform"`` (the default): N equal intervals of t, ``t_i = 1 − i/N``, so every step
      covers 1/N of the time axis (of σ before the flow-matching shift) and all N steps do
      work. For VP this is DDIM's "trailing" spacing ``k = 999, 999 − 1000/N, …`` then ``t = 0``.
    * ``"diffusers"``: reproduces the diffusers scheduler's own grid (for comparisons with
      diffusers only). Flow matching follows ``FlowMatchEulerDiscreteScheduler.set_timesteps``:
      N sigmas linearly spaced from 1 to the shifted σ of ``t = 1/1000`` (``sigma_min``),
      shifted once more, then 0. That grid wastes a step at small N: its last interval runs
      from σ ≈ 0.001 to 0, so a 2-step sample visits [1, 0.001, 0] and is a 1-step result.
      VP: DDIM's trailing spacing, identical to ``"uniform"``.
    """
    if num_steps < 1:
        raise UserError(f"steps must be >= 1, got {num_steps}")
    if spacing not in GRID_SPACINGS:
        raise UserError(f"grid spacing must be one of {', '.join(GRID_SPACINGS)}; got {spacing!r}")
    if isinstance(schedule, VPDiscrete):
        n = schedule.num_train_timesteps
        k = torch.round(torch.arange(n, 0, -n / num_steps, dtype=torch.float64)) - 1
        t = schedule.t_from_index(k[:num_steps])
    elif isinstance(schedule, FlowMatching) and spacing == "diffusers":
        t_min = float(schedule.shifted(torch.tensor(1.0 / NUM_TRAIN_TIMESTEPS, dtype=torch.float64)))
        # our unshifted t is the scheduler's pre-shift sigma; sigma(t) = shifted(t) is its sigma
        t = torch.linspace(1.0, t_min, num_steps, dtype=torch.float64)
    else:
        t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


class TimestepDistribution(ABC):
    """Draws training times ``t ∈ [0, 1]``; always pass an explicit ``torch.Generator``."""

    @abstractmethod
    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor: ...


class Uniform(TimestepDistribution):
    """``t ~ U[a, b]`` (DOLLAR §3.3 samples VSD times in [0.02, 0.98])."""

    def __init__(self, a: float = 0.0, b: float = 1.0):
        if not 0.0 <= a < b <= 1.0:
            raise UserError(f"uniform timestep bounds must satisfy 0 <= a < b <= 1, got ({a}, {b})")
        self.a, self.b = a, b

    def sample(self, n, generator=None, device=None):
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=device)
        return self.a + (self.b - self.a) * u


class LogitNormal(TimestepDistribution):
    """``t = sigmoid(m + s·z)``, ``z ~ N(0, 1)`` (Esser et al. 2024; SwiftVideo's logit-normal t)."""

    def __init__(self, mean: float = 0.0, std: float = 1.0):
        if not std > 0:
            raise UserError(f"logit-normal std must be > 0, got {std}")
        self.mean, self.std = mean, std

    def sample(self, n, generator=None, device=None):
        z = torch.randn(n, generator=generator, dtype=torch.float64, device=device)
        return torch.sigmoid(self.mean + self.std * z)


class DiscreteGrid(TimestepDistribution):
    """Uniform over the times of a grid (e.g. the 50-step DDIM grid for consistency distillation)."""

    def __init__(self, times: Tensor | Sequence[float]):
        self.times = torch.as_tensor(times, dtype=torch.float64)
        if self.times.numel() == 0:
            raise UserError("discrete timestep grid is empty")

    def sample(self, n, generator=None, device=None):
        idx = torch.randint(len(self.times), (n,), generator=generator, device=device)
        return self.times.to(device)[idx]


def logit_normal_density(t: Tensor, mean: float, std: float) -> Tensor:
    """Density of :class:`LogitNormal` at ``t`` (for tests and importance weights)."""
    logit = torch.log(t) - torch.log1p(-t)
    return torch.exp(-0.5 * ((logit - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi) * t * (1 - t))


# ---------------------------------------------------------------------------------------------
# Schedule configs (a model's ``schedule:`` key)
# ---------------------------------------------------------------------------------------------

class FlowMatchingConfig(StrictModel):
    kind: Literal["flow"] = "flow"
    shift: float = Field(1.0, gt=0, description="resolution shift s in t' = s·t/(1 + (s−1)·t)")

    def build(self) -> FlowMatching:
        return FlowMatching(shift=self.shift)


class VPConfig(StrictModel):
    kind: Literal["vp"] = "vp"
    betas: Literal["linear", "scaled_linear"] = "scaled_linear"
    beta_start: float = Field(0.00085, gt=0, lt=1)
    beta_end: float = Field(0.012, gt=0, lt=1)
    zero_terminal_snr: bool = False
    snr_shift_scale: float = Field(1.0, gt=0, description="CogVideoX's SNR shift: every SNR divided by this")

    def build(self) -> VPDiscrete:
        return VPDiscrete(betas=self.betas, beta_start=self.beta_start, beta_end=self.beta_end,
                          zero_terminal_snr=self.zero_terminal_snr, snr_shift_scale=self.snr_shift_scale)


def _schedule_kind(value: Any) -> str:
    """The ``kind`` tag of a schedule config; flow matching when omitted."""
    if isinstance(value, dict):
        return value.get("kind", "flow")
    return getattr(value, "kind", "flow")


ScheduleConfig = Annotated[
    Union[Annotated[FlowMatchingConfig, Tag("flow")], Annotated[VPConfig, Tag("vp")]],
    Discriminator(_schedule_kind),
]
