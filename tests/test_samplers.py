"""Samplers against diffusers' schedulers, an analytic Gaussian and independent densities."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from scipy.stats import norm

from fewstep.diffusion.samplers import sample_consistency, sample_ddim, sample_euler
from fewstep.diffusion.schedules import FlowMatching, VPDiscrete, sampling_grid
from fewstep.models.backbones import Backbone, Conditioning
from fewstep.models.denoiser import Denoiser

SHAPE = (2, 3, 2, 4, 4)


class FixedOutput(Backbone):
    """Returns a fixed tensor whatever the input (to compare one step with a scheduler)."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x, timestep, cond):
        return self.out.expand(x.shape[0], *self.out.shape[1:]) if self.out.shape[0] == 1 else self.out


class GaussianPosterior(Backbone):
    """Exact E[x0 | x_t] for data x0 ~ N(m, s²) (elementwise), predicted as ``x0``.

    With x_t = α·x0 + σ·ε: E[x0|x_t] = m + α·s²/(α²s² + σ²)·(x_t − α·m). The conditioning's
    first token shifts the mean (so CFG and conditioning have an analytic effect).
    """

    def __init__(self, schedule, m=1.5, s=0.5):
        super().__init__()
        self.schedule, self.m, self.s = schedule, m, s

    def forward(self, x, timestep, cond):
        t = self._t(timestep).to(x.dtype)
        a = self.schedule.alpha(t).reshape(-1, 1, 1, 1, 1)
        sig = self.schedule.sigma(t).reshape(-1, 1, 1, 1, 1)
        m = self.m + cond.context[:, 0, 0].reshape(-1, 1, 1, 1, 1)
        return m + a * self.s**2 / (a**2 * self.s**2 + sig**2) * (x - a * m)

    def _t(self, timestep):
        if isinstance(self.schedule, VPDiscrete):
            return (timestep + 1) / 1000
        return self.schedule.unshift(timestep / 1000)


def _cond(b, value=0.0, dtype=torch.float64):
    return Conditioning(torch.full((b, 1, 1), value, dtype=dtype))


@pytest.mark.parametrize("eta", [0.0, 0.7, 0.95])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_one_ddim_step_equals_diffusers(eta, zero_snr):
    # (η = 1 at the zero-SNR end makes diffusers take the float32 square root of a rounding
    # residue 1 − ᾱ_s − c² ≈ 1e-7; η = 1 is checked against DOLLAR Eq. 27 further down.)
    ref = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        prediction_type="v_prediction", timestep_spacing="trailing", set_alpha_to_one=True,
                        rescale_betas_zero_snr=zero_snr, clip_sample=False)
    ref.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    sample, out, z = (torch.randn(SHAPE, generator=g) for _ in range(3))
    sched = VPDiscrete(zero_terminal_snr=zero_snr)
    den = Denoiser(FixedOutput(out), sched, "v")
    for k in (999, 519, 19):
        expected = ref.step(out, k, sample, eta=eta, variance_noise=z).prev_sample
        times = sched.t_from_index([k, k - 20]) if k > 19 else torch.tensor([0.02, 0.0], dtype=torch.float64)
        got = sample_ddim(den, sample, times, _cond(2, dtype=torch.float32), eta=eta, noises=[z]).x
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_equals_diffusers_scheduler(shift):
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(8)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SHAPE, generator=g)
    outs = [torch.randn(SHAPE, generator=g) for _ in range(8)]

    class Scripted(Backbone):
        def __init__(self):
            super().__init__()
            self.i = 0

        def forward(self, x, timestep, cond):
            self.i += 1
            return outs[self.i - 1]

    expected = x.clone()
    for i, ts in enumerate(ref.timesteps):
        expected = ref.step(outs[i], ts, expected).prev_sample
    sched = FlowMatching(shift=shift)
    got = sample_euler(Denoiser(Scripted(), sched, "flow"), x, sampling_grid(sched, 8, "diffusers"), _cond(2, dtype=torch.float32))
    torch.testing.assert_close(got.x, expected, atol=1e-5, rtol=1e-5)
    assert got.nfe == 8


@pytest.mark.parametrize("schedule", [FlowMatching(shift=2.0), VPDiscrete(zero_terminal_snr=True)], ids=["flow", "vp"])
def test_euler_transports_noise_to_the_data_gaussian(schedule):
    """The PF-ODE with the exact denoiser maps N(0, 1) to the data law N(m, s²)."""
    den = Denoiser(GaussianPosterior(schedule), schedule, "x0")
    x = torch.randn(4096, 1, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sample_euler(den, x, sampling_grid(schedule, 200), _cond(4096)).x
    assert float(out.mean()) == pytest.approx(1.5, abs=0.02)
    assert float(out.std()) == pytest.approx(0.5, abs=0.02)


def test_ddim_log_prob_equals_independent_gaussian_density():
    """η = 1 DDIM is the DDPM posterior (DOLLAR Eq. 27); its density is checked with scipy."""
    sched = VPDiscrete()
    den = Denoiser(GaussianPosterior(sched), sched, "x0")
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    k_t, k_s = 499, 249
    times = sched.t_from_index([k_t, k_s])
    res = sample_ddim(den, x, times, _cond(2), eta=1.0, generator=torch.Generator().manual_seed(3))
    x_s = res.x
    # Eq. 27 written for a jump t -> s: beta = 1 - abar_t/abar_s
    abar = sched.alphas_cumprod.double()
    a_t, a_s = abar[k_t], abar[k_s]
    beta = 1 - a_t / a_s
    x0_hat = res.x0_predictions[0]
    mean = (a_s.sqrt() * beta / (1 - a_t)) * x0_hat + ((a_t / a_s).sqrt() * (1 - a_s) / (1 - a_t)) * x
    std = float((beta * (1 - a_s) / (1 - a_t)).sqrt())
    expected = norm.logpdf(x_s.numpy(), loc=mean.numpy(), scale=std).reshape(2, -1).sum(1)
    assert res.log_prob_steps == [0]
    np.testing.assert_allclose(res.log_probs[0].numpy(), expected, rtol=1e-10)


def test_nfe_counts_cfg_as_two_and_cfg_scale_one_is_conditional():
    sched = FlowMatching()
    den = Denoiser(GaussianPosterior(sched), sched, "x0")
    x = torch.randn(SHAPE, dtype=torch.float64)
    cond, uncond = _cond(2, 1.0), _cond(2, 0.0)
    plain = sample_euler(den, x, sampling_grid(sched, 4), cond)
    # the sampler passes scale and uncond through; the Denoiser decides that w = 1 is unguided
    one = sample_euler(den, x, sampling_grid(sched, 4), cond, cfg_scale=1.0, uncond=uncond)
    assert plain.nfe == 4 and one.nfe == 4
    assert torch.equal(plain.x, one.x)
    strong = sample_euler(den, x, sampling_grid(sched, 4), cond, cfg_scale=3.0, uncond=uncond)
    assert strong.nfe == 8  # a CFG step counts 2
    # guidance extrapolates the mean shift: m + w·(cond − uncond) at the end of sampling
    assert float(strong.x.mean()) > float(plain.x.mean()) + 0.5


def test_consistency_sampler_renoises_with_fresh_noise():
    sched = FlowMatching()
    den = Denoiser(GaussianPosterior(sched), sched, "x0")
    x = torch.randn(SHAPE, dtype=torch.float64)
    times = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64)
    res = sample_consistency(den, x, times, _cond(2), generator=torch.Generator().manual_seed(5),
                             return_trajectory=True)
    assert res.nfe == 4 and len(res.trajectory) == 5 and len(res.x0_predictions) == 4
    # replay: x_{i+1} = α(s)·x̂0_i + σ(s)·z_i with the same generator stream
    g = torch.Generator().manual_seed(5)
    for i in range(4):
        z = torch.randn(SHAPE, generator=g, dtype=torch.float64)
        s = times[i + 1]
        expected = (1 - s) * res.x0_predictions[i] + s * z
        torch.testing.assert_close(res.trajectory[i + 1], expected)
    torch.testing.assert_close(res.x, res.x0_predictions[-1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("sampler", ["consistency", "ddim"])
def test_cpu_generator_samples_on_cuda_like_on_cpu(sampler):
    # the pipelines seed CPU generators; a sampler on CUDA draws its fresh noise from them
    sched = FlowMatching()
    times = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    x = torch.randn(SHAPE, dtype=torch.float64)
    results = []
    for device in ("cpu", "cuda"):
        den = Denoiser(GaussianPosterior(sched), sched, "x0").to(device)
        gen = torch.Generator().manual_seed(3)
        if sampler == "consistency":
            res = sample_consistency(den, x.to(device), times, _cond(2).to(device), generator=gen)
        else:
            res = sample_ddim(den, x.to(device), times, _cond(2).to(device), eta=0.5, generator=gen)
        results.append(res.x.cpu())
    torch.testing.assert_close(results[0], results[1])


def test_trajectory_and_time_validation():
    sched = FlowMatching()
    den = Denoiser(GaussianPosterior(sched), sched, "x0")
    x = torch.randn(SHAPE, dtype=torch.float64)
    res = sample_euler(den, x, [1.0, 0.5, 0.0], _cond(2), return_trajectory=True)
    assert len(res.trajectory) == 3 and res.trajectory[0] is x
    with pytest.raises(ValueError, match="decreasing"):
        sample_euler(den, x, [0.5, 1.0], _cond(2))
    assert math.isfinite(float(res.x.sum()))
