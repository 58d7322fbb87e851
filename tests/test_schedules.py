"""Schedules and timestep grids against diffusers' schedulers (independent implementations)."""

import math

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from fewstep.diffusion.schedules import (
    FlowMatching, LogitNormal, Uniform, DiscreteGrid, VPDiscrete, logit_normal_density, named_grid,
    sampling_grid, grid_steps, time_grid,
)
from fewstep.errors import UserError


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
@pytest.mark.parametrize("steps", [4, 50])
def test_diffusers_flow_grid_matches_flow_match_euler_scheduler(shift, steps):
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(steps)
    sched = FlowMatching(shift=shift)
    t = sampling_grid(sched, steps, "diffusers")
    # sigmas (incl. the trailing 0) and the model timesteps the backbone receives
    torch.testing.assert_close(sched.sigma(t).float(), ref.sigmas, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sched.model_timestep(t[:-1]).float(), ref.timesteps, atol=1e-3, rtol=1e-6)


@pytest.mark.parametrize("schedule", [FlowMatching(), FlowMatching(shift=5.0), VPDiscrete(),
                                      VPDiscrete(zero_terminal_snr=True)], ids=["flow", "flow-shift5", "vp", "vp-zsnr"])
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 8, 50, 1000])
def test_default_grid_takes_n_useful_steps(schedule, steps):
    """Every one of the N steps moves σ by a real amount: the default grid is N equal intervals of t
    from 1 to 0 (diffusers' flow grid instead spends a step on σ ≈ 0.001 → 0)."""
    t = sampling_grid(schedule, steps)
    assert len(t) == steps + 1 and float(t[0]) == 1.0 and float(t[-1]) == 0.0
    torch.testing.assert_close(t, torch.linspace(1, 0, steps + 1, dtype=torch.float64), atol=1e-3, rtol=0)
    # every step moves the state's coefficients (α up, σ down) by a fair share of the whole way
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    move = (alpha[1:] - alpha[:-1]) + (sigma[:-1] - sigma[1:])
    assert float(move.min()) >= 0.05 / steps


@pytest.mark.parametrize("steps", [2, 4])
def test_diffusers_flow_grid_wastes_its_last_step(steps):
    """Why it is not the default: its last interval is σ ≈ 0.001 → 0."""
    t = sampling_grid(FlowMatching(), steps, "diffusers")
    assert float(t[-2]) == pytest.approx(1e-3)


def test_flow_shift_formula_and_inverse():
    sched = FlowMatching(shift=3.0)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    expected = 3 * t / (1 + 2 * t)
    torch.testing.assert_close(sched.sigma(t), expected)
    torch.testing.assert_close(sched.alpha(t), 1 - expected)
    torch.testing.assert_close(sched.unshift(sched.shifted(t)), t)


@pytest.mark.parametrize("betas,start,end", [("linear", 1e-4, 0.02), ("scaled_linear", 0.00085, 0.012)])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_vp_alpha_bar_matches_ddpm_scheduler(betas, start, end, zero_snr):
    ref = DDPMScheduler(beta_schedule=betas, beta_start=start, beta_end=end, rescale_betas_zero_snr=zero_snr)
    sched = VPDiscrete(betas=betas, beta_start=start, beta_end=end, zero_terminal_snr=zero_snr)
    # grid point k sits at t = (k + 1)/1000
    t = sched.t_from_index(torch.arange(1000))
    abar = sched.alpha(t) ** 2
    torch.testing.assert_close(abar.float(), ref.alphas_cumprod, atol=2e-7, rtol=1e-5)
    # diffusers rescales in float32, so its zero-SNR betas carry float32 cumprod error
    torch.testing.assert_close(sched.betas.float(), ref.betas, atol=1e-8, rtol=1e-3 if zero_snr else 1e-5)
    torch.testing.assert_close(sched.model_timestep(t), torch.arange(1000, dtype=torch.float64))
    if zero_snr:
        assert float(sched.alpha(torch.tensor(1.0, dtype=torch.float64))) == pytest.approx(0.0, abs=1e-12)
    # the variance-preserving identity and the clean end point
    torch.testing.assert_close(sched.alpha(t) ** 2 + sched.sigma(t) ** 2, torch.ones_like(t))
    assert float(sched.alpha(torch.tensor(0.0, dtype=torch.float64))) == 1.0


def test_vp_continuous_time_interpolates_between_grid_points():
    sched = VPDiscrete()
    k = 500
    t0, t1 = sched.t_from_index([k, k + 1])
    mid = (t0 + t1) / 2
    abar = sched.alpha_bar(torch.stack([t0, mid, t1]))
    assert float(abar[1]) == pytest.approx(float(abar[0] + abar[2]) / 2)
    assert bool(abar[0] > abar[1] > abar[2])  # monotone: more noise at larger t


def test_add_noise_is_alpha_x0_plus_sigma_eps():
    sched = FlowMatching(shift=2.0)
    x0, eps = torch.randn(3, 2, 2, 4, 4), torch.randn(3, 2, 2, 4, 4)
    t = torch.tensor([0.1, 0.5, 0.9])
    x_t = sched.add_noise(x0, eps, t)
    s = 2 * t / (1 + t)
    torch.testing.assert_close(x_t, (1 - s)[:, None, None, None, None] * x0 + s[:, None, None, None, None] * eps)


def test_vp_ddim_grid_is_trailing_spacing():
    sched = VPDiscrete()
    t = sampling_grid(sched, 50)
    torch.testing.assert_close(sched.model_timestep(t[:-1]), torch.arange(999, 0, -20, dtype=torch.float64))
    assert float(t[-1]) == 0.0
    torch.testing.assert_close(named_grid("ddim50", sched), t[:-1])


def test_named_grids():
    vp, flow = VPDiscrete(), FlowMatching()
    torch.testing.assert_close(named_grid("dollar4", vp), torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64))
    torch.testing.assert_close(named_grid("dollar2", flow), torch.tensor([0.999, 0.499], dtype=torch.float64))
    assert named_grid("accvideo_keys", flow).tolist() == [1.0, 0.9651, 0.9130, 0.8235, 0.6363, 0.0]
    with pytest.raises(UserError, match="known grids"):
        named_grid("dollar3", vp)


def test_shifted_uniform_grids_are_the_flow_shift_of_uniform_ones():
    """uniformN_shiftS: t = S·u/(1 + (S − 1)·u) of u = 1, 1 − 1/N, …, 0; S = 1 is uniformN; shifts compose."""
    flow = FlowMatching()
    torch.testing.assert_close(named_grid("uniform4_shift3", flow),
                               torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(named_grid("uniform2_shift1", flow), named_grid("uniform2", flow))
    # uniformN for any N: N equal steps, the listed uniform4 among them
    torch.testing.assert_close(named_grid("uniform8", flow), torch.linspace(1, 0, 9, dtype=torch.float64))
    assert time_grid("uniform4") == time_grid("uniform4_shift1") and grid_steps("uniform8") == 8
    # the grid's times, then the schedule's shift 2: σ of a shift-6 grid (shift_a ∘ shift_b = shift_ab)
    sigma = FlowMatching(shift=2.0).shifted(named_grid("uniform4_shift3", flow))
    torch.testing.assert_close(sigma, named_grid("uniform4_shift6", flow))
    for bad in ("uniform0_shift3", "uniform4_shift0", "uniform4_shift-1", "uniform4shift3"):
        with pytest.raises(UserError, match="uniformN_shiftS"):
            named_grid(bad, flow)


def test_timestep_distributions():
    g = torch.Generator().manual_seed(0)
    u = Uniform(0.02, 0.98).sample(20000, g)
    assert float(u.min()) >= 0.02 and float(u.max()) <= 0.98
    assert float(u.mean()) == pytest.approx(0.5, abs=0.01)
    ln = LogitNormal(-0.4, 1.2).sample(20000, g)
    logit = torch.log(ln / (1 - ln))
    assert float(logit.mean()) == pytest.approx(-0.4, abs=0.03)
    assert float(logit.std()) == pytest.approx(1.2, abs=0.03)
    # the density integrates to one
    t = torch.linspace(1e-6, 1 - 1e-6, 200001, dtype=torch.float64)
    assert float(torch.trapezoid(logit_normal_density(t, -0.4, 1.2), t)) == pytest.approx(1.0, abs=1e-4)
    grid = DiscreteGrid([0.25, 0.5, 0.75]).sample(3000, g)
    assert set(grid.tolist()) == {0.25, 0.5, 0.75}
    # explicit generators make draws reproducible
    a = Uniform().sample(5, torch.Generator().manual_seed(3))
    b = Uniform().sample(5, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(UserError):
        Uniform(0.5, 0.2)


def test_bad_schedule_values_are_user_errors():
    with pytest.raises(UserError, match="shift"):
        FlowMatching(shift=0)
    with pytest.raises(UserError, match="betas"):
        VPDiscrete(betas="cosine")
    with pytest.raises(UserError, match="steps"):
        sampling_grid(FlowMatching(), 0)
    assert math.isfinite(float(FlowMatching(shift=5).model_timestep(torch.tensor(0.5))))
