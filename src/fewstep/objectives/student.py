"""The student's few-step generator ``x̂ = G_θ(ε)``, shared by the objectives that need a sample.

DOLLAR (001) Eq. 11 and Eq. 15 differentiate through ``G_θ(ε)``, "the generation process by the
student network through iteratively denoising" on the student's step schedule, e.g.
``[999, 749, 499, 249]`` (DOLLAR §4.1, named grid ``dollar4``). The few-step generator is
consistency (multistep) sampling, as in DMD2's backward simulation and LCM: at each step time
``t_k`` the student predicts ``x̂0``, which is re-noised to the next step time with fresh noise::

    x_{t_0} = ε                                   (pure noise at the first step time)
    x̂0_k    = student.predict(x_{t_k}, t_k, c).x0
    x_{t_k+1} = α(t_k+1)·x̂0_k + σ(t_k+1)·z_k+1    (Schedule.add_noise; Song et al. 2023 Alg. 1)
    G_θ(ε)  = x̂0_{K−1}

(the same update as :func:`fewstep.diffusion.samplers.sample_consistency`, with the noises given
explicitly so that every objective can draw them from the step context). The student runs
without CFG (DOLLAR §4.1: "distilled student inference do not employ CFG").

Shared noise: :func:`generator_noise` draws ``ε, z_1, …`` *as the generator's role* (normally
``student``) under fixed names, so every objective of a step — VSD and LRM fine-tuning on the
student, the fake-score loss on the ``fake_score`` role, whichever role is being updated — sees
the same ``ε`` for a sample. Objectives regenerate the sample rather than share it through a
cache: with the same ``ε`` and the same weights they get the same ``x̂`` (the fake-score update
of a step sees the student's weights as they are when it runs).

Gradient paths (``backprop``): ``"all"`` backpropagates through every step of the chain
(``∇_θ G_θ(ε)`` of DOLLAR Eq. 12 taken literally); ``"last"`` keeps only the last network call
in the graph (earlier steps run without gradients, DMD2's backward simulation with the step fixed
at the last one) — cheaper in memory for large students.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Annotated, Literal, Sequence, Union

import torch
from pydantic import AfterValidator
from torch import Tensor

from ..diffusion.schedules import INDEX_GRIDS, TIME_GRIDS, Schedule, named_grid
from ..errors import UserError
from ..models.backbones import Conditioning
from .base import StepContext

Backprop = Literal["all", "last"]


def _check_steps(value: str | list[int]) -> str | list[int]:
    if isinstance(value, str):
        if value not in INDEX_GRIDS and value not in TIME_GRIDS:
            known = ", ".join(sorted([*INDEX_GRIDS, *TIME_GRIDS]))
            raise ValueError(f"unknown timestep grid {value!r}; known grids: {known}")
        return value
    if not value:
        raise ValueError("needs at least one integer timestep, e.g. [999, 749, 499, 249]")
    if any(not 0 <= k <= 999 for k in value) or any(b >= a for a, b in zip(value, value[1:])):
        raise ValueError(f"integer timesteps must be strictly decreasing in 0..999, got {value}")
    return value


#: A step schedule in a config: a named grid (``dollar4``, ``ddim50``, …) or integer timesteps
#: ``[999, 749, 499, 249]`` (mapped to continuous time by ``Schedule.t_from_index``).
StepSchedule = Annotated[Union[str, list[int]], AfterValidator(_check_steps)]


def step_times(spec: str | Sequence[int], schedule: Schedule) -> Tensor:
    """Continuous times (float64, strictly decreasing, all > 0) of a step schedule.

    A named grid that ends at 0 (``accvideo_keys``) loses its final 0: the generator evaluates the
    network only at positive times and returns its last ``x̂0``.
    """
    times = named_grid(spec, schedule) if isinstance(spec, str) else schedule.t_from_index(list(spec))
    times = times[times > 0]
    if len(times) == 0:
        raise UserError(f"step schedule {spec!r} has no time > 0")
    return times


def generator_noise(ctx: StepContext, shape: tuple[int, ...], steps: int, *, role: str = "student",
                    dtype: torch.dtype = torch.float32) -> list[Tensor]:
    """``[ε, z_1, …, z_{steps−1}]``, each ``(B, *shape)``, drawn per sample as ``role`` (see module doc)."""
    as_role = replace(ctx, role=role)
    return [as_role.randn(shape, f"generator/{i}", dtype=dtype) for i in range(steps)]


@dataclass
class StudentSample:
    x0: Tensor  # (B, C, T, H, W) G_θ(ε), the last x̂0
    states: list[Tensor]  # x_{t_k} fed to the network at each step, K × (B, C, T, H, W)
    x0_predictions: list[Tensor]  # x̂0_k at each step, K × (B, C, T, H, W)
    times: Tensor  # (K,) float64 step times


def generate(denoiser, noises: Sequence[Tensor], times: Tensor, cond: Conditioning, *,
             backprop: Backprop = "all") -> StudentSample:
    """``G_θ(ε)`` by consistency sampling on ``times`` (module doc); ``noises`` from :func:`generator_noise`.

    Gradients follow the caller's autograd mode; under ``torch.no_grad()`` no graph is built.
    """
    if len(noises) != len(times):
        raise ValueError(f"generate: {len(times)} step times need {len(times)} noises, got {len(noises)}")
    grad = torch.is_grad_enabled()
    x = noises[0]  # (B, C, T, H, W) ε at the first step time
    states, x0_predictions = [], []
    for k, t in enumerate(times):
        if k > 0:  # re-noise the previous x̂0 to this step time with fresh noise z_k
            x = denoiser.schedule.add_noise(x0_predictions[-1], noises[k], t.to(x.dtype))
        with torch.set_grad_enabled(grad and (backprop == "all" or k == len(times) - 1)):
            x0_hat = denoiser.predict(x, t, cond).x0  # (B, C, T, H, W)
        states.append(x)
        x0_predictions.append(x0_hat)
    return StudentSample(x0=x0_predictions[-1], states=states, x0_predictions=x0_predictions, times=times)


def student_sample(denoiser, batch, ctx: StepContext, times: Tensor, *, role: str = "student",
                   backprop: Backprop = "all") -> StudentSample:
    """``G_θ(ε)`` for a batch: the batch's latent shape and captions, noise drawn as ``role``."""
    x = batch.latents  # (B, C, T, H, W) only its shape and dtype are used
    noises = generator_noise(ctx, tuple(x.shape[1:]), len(times), role=role, dtype=x.dtype)
    return generate(denoiser, noises, times, batch.cond, backprop=backprop)
