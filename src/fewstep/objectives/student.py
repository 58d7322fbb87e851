"""The student's few-step generator ``x̂ = G_θ(ε)``, declared once and shared by everything that samples it.

DOLLAR (001) Eq. 11 and Eq. 15 differentiate through ``G_θ(ε)``, "the generation process by the
student network through iteratively denoising" on the student's step schedule, e.g.
``[999, 749, 499, 249]`` (DOLLAR §4.1, named grid ``dollar4``). A recipe's ``generator:`` block
(:class:`GeneratorConfig`: sampler, times, CFG) says how the student samples; the engine hands one
:class:`StudentGenerator` to every objective (``ctx.student``), and the recipe exports the student
with the same sampler and times, so training, periodic evaluation and the exported model cannot
disagree. The samplers themselves are :mod:`fewstep.diffusion.samplers` (one implementation):

* ``consistency`` (DMD2's backward simulation, LCM, DOLLAR's students): at each step time
  ``t_k`` the student predicts ``x̂0``, re-noised to the next time with fresh noise
  ``x_{t_k+1} = α(t_k+1)·x̂0_k + σ(t_k+1)·z_k+1`` (Song et al. 2023 Alg. 1); ``G_θ(ε) = x̂0_{K−1}``;
* ``euler`` (AccVideo's 5-step student): deterministic steps ``x_s = α_s·x̂0 + σ_s·ε̂`` through the
  times, ending at ``t = 0``.

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
from pydantic import AfterValidator, Field
from torch import Tensor

from ..config import StrictModel
from ..diffusion.samplers import SAMPLERS
from ..diffusion.schedules import FlowMatching, Schedule, grid_steps, named_grid
from ..errors import UserError
from .base import StepContext

Backprop = Literal["all", "last"]


def _check_steps(value: str | list[int]) -> str | list[int]:
    if isinstance(value, str):
        try:
            grid_steps(value)  # the one check of grid names (a ValueError for pydantic)
        except UserError as error:
            raise ValueError(str(error)) from None
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


_ANY_SCHEDULE = FlowMatching()  # grids have the same length on every schedule


class GeneratorConfig(StrictModel):
    """The ``generator:`` block: how the student samples (module doc)."""

    sampler: Literal["consistency", "euler"] = Field(
        "consistency", description="consistency (re-noise x̂0 with fresh noise) or euler (deterministic)")
    times: StepSchedule = Field("dollar4", description="the student's step times: a named grid (dollar4, "
                                                       "accvideo_keys, …) or integer timesteps [999, 749, …]")
    cfg_scale: float | None = Field(None, description="the student's own CFG w (null: none, as distilled students)")
    snap_to_data: bool = Field(False, description=(
        "move each time to the nearest one the data source stores (a trajectory store), as AccVideo's grids are "
        "'selected from our synthetic trajectories'; an error when none lies within 0.05"))


@dataclass
class StudentSample:
    x0: Tensor  # (B, C, T, H, W) G_θ(ε): the sample at t = 0 (for consistency sampling the last x̂0)
    states: list[Tensor]  # x_{t_k} fed to the network at each step, K × (B, C, T, H, W)
    x0_predictions: list[Tensor]  # x̂0_k at each step, K × (B, C, T, H, W)
    times: Tensor  # (K,) float64 step times


#: How far a stored time may lie from the wanted one (AccVideo's §5.2 uniform grid is off by up to 0.026).
TIME_TOLERANCE = 0.05


def select_times(stored: Tensor, wanted: Tensor) -> Tensor:
    """Indices into ``stored`` (K,) of the times nearest to each of ``wanted`` (n,).

    Each must lie within :data:`TIME_TOLERANCE` and all must be distinct; otherwise a one-line
    error lists what the store holds.
    """
    distance = (stored[None, :].double() - wanted[:, None].double().to(stored.device)).abs()  # (n, K)
    index = distance.argmin(dim=1)  # (n,)
    far = distance.gather(1, index[:, None])[:, 0] > TIME_TOLERANCE
    if bool(far.any()) or len(index.unique()) < len(index):
        bad = float(wanted[far][0]) if bool(far.any()) else float(wanted[-1])
        held = ", ".join(f"{t:.4g}" for t in stored.tolist()[:8]) + (", …" if len(stored) > 8 else "")
        raise UserError(f"no stored latent near t={bad:.4g}: the trajectory store holds t = {held} (synthesize it "
                        f"with --keep all for other grids)")
    return index


class StudentGenerator:
    """``G_θ(ε)`` as the ``generator:`` block declares it; the engine puts one in ``ctx.student``.

    ``stored_times``: the times the data source stores (float64, any order), which the step times
    snap to when ``snap_to_data`` is set (None: the data stores no times).
    """

    def __init__(self, config: GeneratorConfig | None = None, stored_times: Sequence[float] | Tensor | None = None):
        self.config = config or GeneratorConfig()
        self.stored = None
        if self.config.snap_to_data and stored_times is not None:
            self.stored = torch.as_tensor(stored_times, dtype=torch.float64)

    def step_times(self, schedule: Schedule) -> Tensor:
        """``(K,)`` float64 times of the K network calls (all > 0), snapped to the stored times if asked."""
        times = step_times(self.config.times, schedule)
        if self.stored is None:
            return times
        return self.stored[select_times(self.stored, times)]

    def sampling_times(self, schedule: Schedule) -> list[float]:
        """The times an exported model's sampler visits: the step times, then 0."""
        return [*self.step_times(schedule).tolist(), 0.0]

    @property
    def steps(self) -> int:
        """K, without a schedule (the grid's length is the same on every schedule)."""
        return len(step_times(self.config.times, _ANY_SCHEDULE))

    def sample(self, denoiser, batch, ctx: StepContext, *, role: str = "student",
               backprop: Backprop = "all") -> StudentSample:
        """``G_θ(ε)`` for a batch: its latent shape and captions, noise drawn as ``role`` (module doc).

        Gradients follow the caller's autograd mode; under ``torch.no_grad()`` no graph is built.
        """
        times = self.step_times(denoiser.schedule)
        x = batch.latents  # (B, C, T, H, W) only its shape and dtype are used
        noises = generator_noise(ctx, tuple(x.shape[1:]), len(times), role=role, dtype=x.dtype)
        # noises[0] = ε at the first time; noises[k] re-noises to time k (the step to t = 0 needs none)
        renoise = [*noises[1:], torch.zeros_like(noises[0])]
        kwargs = {"noises": renoise} if self.config.sampler == "consistency" else {}
        grad_steps = None if backprop == "all" else [-1]
        result = SAMPLERS[self.config.sampler](
            denoiser, noises[0], torch.cat([times, times.new_zeros(1)]), batch.cond, cfg_scale=self.config.cfg_scale,
            uncond=batch.uncond, return_trajectory=True, grad_steps=grad_steps, **kwargs)
        x0 = result.x0_predictions[-1] if self.config.sampler == "consistency" else result.x
        return StudentSample(x0=x0, states=result.trajectory[:-1], x0_predictions=result.x0_predictions, times=times)

    def step(self, denoiser, x: Tensor, k: int, batch, ctx: StepContext, *,
             role: str = "student") -> tuple[Tensor, Tensor]:
        """Step ``k`` of ``G_θ`` alone, from the state ``x`` (B, C, T, H, W) at the k-th time, with the sampler and
        noise of :meth:`sample`: ``(x̂0_k, x_{t_{k+1}})``, the state the step lands on (``x̂0_k`` after the last
        step). With ``x = sample(...).states[k]`` it repeats that step; gradients follow the caller's mode.
        """
        times = self.step_times(denoiser.schedule)
        noises = generator_noise(ctx, tuple(x.shape[1:]), len(times), role=role, dtype=x.dtype)
        renoise = [*noises[1:], torch.zeros_like(noises[0])]
        kwargs = {"noises": [renoise[k]]} if self.config.sampler == "consistency" else {}
        grid = torch.cat([times, times.new_zeros(1)])[k:k + 2]
        result = SAMPLERS[self.config.sampler](denoiser, x, grid, batch.cond, cfg_scale=self.config.cfg_scale,
                                               uncond=batch.uncond, **kwargs)
        return result.x0_predictions[0], result.x


def student_generator(ctx: StepContext) -> StudentGenerator:
    """The run's generator (``ctx.student``), or the default one where a caller built no engine."""
    return ctx.student if ctx.student is not None else StudentGenerator()


def student_sample(denoiser, batch, ctx: StepContext, *, role: str = "student",
                   backprop: Backprop = "all") -> StudentSample:
    """``G_θ(ε)`` of the run's generator for a batch (:meth:`StudentGenerator.sample`)."""
    return student_generator(ctx).sample(denoiser, batch, ctx, role=role, backprop=backprop)
