"""Samplers. One signature for all (STYLE §2, after k-diffusion's ``sample_*``)::

    sample_xxx(denoiser, x, times, cond, *, cfg_scale=None, uncond=None, ...) -> SampleResult

``x`` is the starting state at ``times[0]`` (pure noise when ``times[0] == 1``) and ``times``
is any decreasing list of continuous times (DESIGN §2), e.g. from
:func:`~fewstep.diffusion.schedules.sampling_grid` or a named grid such as DOLLAR's
``[999, 749, 499, 249]`` followed by 0. Each sampler counts NFE (a CFG step counts 2) and can
keep its trajectory.

The three update rules, all written on the ``(x̂0, ε̂)`` of a
:class:`~fewstep.diffusion.parameterization.Prediction` at ``(x_t, t)`` with ``t → s < t``:

* **Euler / DDIM (η = 0)**: ``x_s = α_s·x̂0 + σ_s·ε̂``. For flow matching this *is* the Euler
  step in σ, ``x_s = x_t + (σ_s − σ_t)·û`` with ``û = ε̂ − x̂0`` (diffusers'
  ``FlowMatchEulerDiscreteScheduler``); for a VP schedule it is DDIM's deterministic step
  (Song et al. 2021 Eq. 12; DOLLAR Eq. 5 with σ_t = 0), itself the Euler step of the PF-ODE in
  the variables (x/α, σ/α).
* **DDIM with η > 0**: ``x_s = α_s·x̂0 + √(σ_s² − c²)·ε̂ + c·z`` with
  ``c = η·σ_s·√(1 − SNR(t)/SNR(s))``, ``SNR = α²/σ²`` — for VP exactly DDIM's
  ``σ_t(η) = η·√((1 − ᾱ_s)/(1 − ᾱ_t))·√(1 − ᾱ_t/ᾱ_s)``; η = 1 is the DDPM posterior
  (DOLLAR Eq. 27). The step's Gaussian log-density of ``x_s`` under ``N(mean, c²·I)`` is
  returned per sample, summed over all dimensions (DOLLAR Eq. 28 summed over pixels; DDPO's
  code averages instead, which only rescales the policy gradient).
* **Consistency (multistep) sampling** (Song et al. 2023, Alg. 1; DMD2/DOLLAR students):
  predict ``x̂0``, then re-noise to the next time with fresh noise: ``x_s = α_s·x̂0 + σ_s·z``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from .parameterization import Prediction
from .schedules import expand_like


@dataclass
class SampleResult:
    x: Tensor  # (B, C, T, H, W) final sample
    nfe: int  # network function evaluations used (a CFG step counts 2)
    trajectory: list[Tensor] = field(default_factory=list)  # states x at times[0], times[1], …
    x0_predictions: list[Tensor] = field(default_factory=list)  # x̂0 at each evaluated step
    log_probs: list[Tensor] = field(default_factory=list)  # (B,) per stochastic step (DDIM η > 0)
    log_prob_steps: list[int] = field(default_factory=list)  # which steps ``log_probs`` belong to
    times: Tensor | None = None


def _as_times(times: Sequence[float] | Tensor) -> Tensor:
    times = torch.as_tensor(times, dtype=torch.float64)
    if times.ndim != 1 or len(times) < 2:
        raise ValueError("a sampler needs at least two times (start and end)")
    if not bool((times[1:] < times[:-1]).all()):
        raise ValueError(f"sampler times must be strictly decreasing, got {times.tolist()}")
    return times


def _coef(denoiser, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    t = t.to(x.dtype).expand(x.shape[0])
    return expand_like(denoiser.schedule.alpha(t), x), expand_like(denoiser.schedule.sigma(t), x)


def euler_step(pred: Prediction, alpha_s: Tensor, sigma_s: Tensor) -> Tensor:
    """Deterministic first-order step to time ``s``: ``x_s = α_s·x̂0 + σ_s·ε̂``."""
    return alpha_s * pred.x0 + sigma_s * pred.eps


def ddim_noise_std(alpha_t: Tensor, sigma_t: Tensor, alpha_s: Tensor, sigma_s: Tensor, eta: float) -> Tensor:
    """DDIM's per-step noise level ``c = η·σ_s·√(1 − SNR(t)/SNR(s))`` (0 when ``s = 0``)."""
    ratio = (alpha_t * sigma_s) ** 2 / ((alpha_s * sigma_t) ** 2).clamp(min=1e-30)
    return eta * sigma_s * (1 - ratio).clamp(min=0).sqrt()


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``log N(x; mean, std²·I)`` per sample, summed over all non-batch dims (DOLLAR Eq. 28)."""
    std = std.expand_as(x)
    logp = -0.5 * ((x - mean) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return logp.flatten(1).sum(1)


def sample_euler(denoiser, x: Tensor, times, cond, *, cfg_scale: float | None = None, uncond=None,
                 return_trajectory: bool = False, grad_steps: Sequence[int] | None = None) -> SampleResult:
    """Euler ODE sampler (DDIM η = 0 for VP schedules) on any decreasing list of times."""
    return sample_ddim(denoiser, x, times, cond, eta=0.0, cfg_scale=cfg_scale, uncond=uncond,
                       return_trajectory=return_trajectory, grad_steps=grad_steps)


def sample_ddim(denoiser, x: Tensor, times, cond, *, eta: float = 0.0, cfg_scale: float | None = None,
                uncond=None, generator: torch.Generator | None = None, noises: Sequence[Tensor] | None = None,
                return_trajectory: bool = False, grad_steps: Sequence[int] | None = None) -> SampleResult:
    """DDIM with stochasticity ``eta`` (Song et al. 2021; DOLLAR Eq. 5, App. 7.4).

    With ``eta > 0`` each step draws ``z`` from ``generator`` (or takes ``noises[i]``) and the
    result carries the per-sample log-probability of each step's ``x_s`` (for DDPO,
    DOLLAR Eq. 26–28); a step with no noise (``s = 0``) has no density and is skipped
    (``log_prob_steps`` says which steps the entries belong to). ``grad_steps`` (indices into the steps) limits which network calls keep
    autograd graphs — DDPO's truncation to the last steps; ``None`` keeps the caller's mode.
    """
    times = _as_times(times)
    nfe0 = denoiser.nfe
    result = SampleResult(x=x, nfe=0, times=times)
    if return_trajectory:
        result.trajectory.append(x)
    n_steps = len(times) - 1
    for i in range(n_steps):
        t, s = times[i], times[i + 1]
        keep_grad = grad_steps is None or i in grad_steps or (i - n_steps) in grad_steps
        with torch.set_grad_enabled(torch.is_grad_enabled() and keep_grad):
            pred = denoiser.predict(x, t, cond, cfg_scale=cfg_scale, uncond=uncond)
        alpha_s, sigma_s = _coef(denoiser, s, x)
        if eta == 0:
            x = euler_step(pred, alpha_s, sigma_s)
        else:
            std = ddim_noise_std(pred.alpha, pred.sigma, alpha_s, sigma_s, eta)
            # 1. deterministic part: α_s·x̂0 + √(σ_s² − c²)·ε̂
            mean = alpha_s * pred.x0 + (sigma_s**2 - std**2).clamp(min=0).sqrt() * pred.eps
            # 2. fresh noise of scale c
            z = noises[i] if noises is not None else _fresh_noise(x, generator)
            x = mean + std * z
            if bool((std > 0).all()):
                result.log_probs.append(gaussian_log_prob(x.detach(), mean, std))
                result.log_prob_steps.append(i)
        result.x0_predictions.append(pred.x0)
        if return_trajectory:
            result.trajectory.append(x)
    result.x, result.nfe = x, denoiser.nfe - nfe0
    return result


def _fresh_noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """``N(0, I)`` shaped like ``x``, drawn on the generator's device and moved to ``x``'s.

    The pipelines seed CPU generators (the same numbers whichever device samples); a CPU generator
    cannot draw on CUDA directly.
    """
    device = x.device if generator is None else generator.device
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)


def sample_consistency(denoiser, x: Tensor, times, cond, *, cfg_scale: float | None = None, uncond=None,
                       generator: torch.Generator | None = None, noises: Sequence[Tensor] | None = None,
                       return_trajectory: bool = False, grad_steps: Sequence[int] | None = None) -> SampleResult:
    """Few-step consistency sampling: x̂0 at each time, re-noised to the next with fresh noise.

    ``times`` ends at 0, where the last x̂0 is returned (Song et al. 2023, Alg. 1). The noise of
    step ``i`` (re-noising to ``times[i + 1]``) is ``noises[i]`` when given, else drawn from
    ``generator``; ``grad_steps`` as in :func:`sample_ddim`.
    """
    times = _as_times(times)
    nfe0 = denoiser.nfe
    result = SampleResult(x=x, nfe=0, times=times)
    if return_trajectory:
        result.trajectory.append(x)
    n_steps = len(times) - 1
    for i in range(n_steps):
        keep_grad = grad_steps is None or i in grad_steps or (i - n_steps) in grad_steps
        with torch.set_grad_enabled(torch.is_grad_enabled() and keep_grad):
            pred = denoiser.predict(x, times[i], cond, cfg_scale=cfg_scale, uncond=uncond)
        alpha_s, sigma_s = _coef(denoiser, times[i + 1], x)
        z = noises[i] if noises is not None else _fresh_noise(x, generator)
        x = alpha_s * pred.x0 + sigma_s * z
        result.x0_predictions.append(pred.x0)
        if return_trajectory:
            result.trajectory.append(x)
    result.x, result.nfe = x, denoiser.nfe - nfe0
    return result


SAMPLERS = {"euler": sample_euler, "ddim": sample_ddim, "consistency": sample_consistency}
