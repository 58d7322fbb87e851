"""RGTD's objectives against independent computations (papers/000 Eq. 3–14):

* the Pseudo-Huber distance (Eq. 7) and its gradient against the formula, and its c → 0 limit;
* trajectory distribution matching (Eq. 5–9) on Gaussian toys with analytic scores: at every step the
  gradient reaching the student is ``−(s_real − s_fake)`` at the diffused landing state, scaled as
  Pseudo-Huber says, for both forms, both samplers and both gradient paths;
* the fake-score losses against hand computations of Eq. 8 and Eq. 10;
* the feature GAN's losses against Eq. 11–12, and where their gradients go;
* the spatial reward reads exactly the first, middle and last frames; the temporal one the whole
  clip; a reward's gradient reaches the student and no other role (nor the decoder).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from einops import rearrange
from torch import nn

from fewstep.diffusion.schedules import FlowMatching, LogitNormal, VPDiscrete
from fewstep.errors import UserError
from fewstep.models.backbones import Backbone
from fewstep.models.denoiser import Denoiser
from fewstep.models.features import extract_features
from fewstep.objectives.direct_reward import SpatialReward, TemporalReward
from fewstep.objectives.feature_gan import FeatureGANDiscriminator, FeatureGANGenerator, FeatureHeads
from fewstep.objectives.student import GeneratorConfig, StudentGenerator, student_sample
from fewstep.objectives.tdm import (TDM, TDMFakeScore, huber_c, pseudo_huber, pseudo_huber_surrogate,
                                    score_difference)
from fewstep.rewards.base import Reward, keyframe_indices
from helpers import F64, FakeRole, GaussianX0, make_batch, make_ctx, model_time, tiny_setup

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (2, 3, 2, 2)  # (C, T, H, W) of the Gaussian toys
TIMES = [1.0, 0.75, 0.5, 0.25]  # uniform4


def vector(seed, scale=1.0):
    return scale * torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ---------------------------------------------------------------------------------------------
# Analytic Gaussians: data N(m, s²·I), x_t = α·x0 + σ·ε
# ---------------------------------------------------------------------------------------------

def gauss_x0(x, alpha, sigma, m, s=1.0):
    """E[x0 | x_t] for x0 ~ N(m, s²·I)."""
    return m + alpha * s**2 / (alpha**2 * s**2 + sigma**2) * (x - alpha * m)


def gauss_score(x, alpha, sigma, m, s=1.0):
    """∇ log p_t(x) = −(x − α·m)/(α²·s² + σ²)."""
    return -(x - alpha * m) / (alpha**2 * s**2 + sigma**2)


def coef(schedule, t):
    t = torch.as_tensor(t, dtype=F64)
    return schedule.alpha(t).reshape(-1, 1, 1, 1, 1), schedule.sigma(t).reshape(-1, 1, 1, 1, 1)


class StepShift(Backbone):
    """x0 prediction ``x_t + b_k``: one learnable shift per student step ``k`` (found from the timestep)."""

    def __init__(self, schedule, times, init):
        super().__init__()
        self.schedule, self.times = schedule, torch.tensor(times, dtype=F64)
        self.b = nn.Parameter(init.clone())  # (K, C, T, H, W)

    def forward(self, x, timestep, cond):
        t = model_time(self.schedule, timestep).to(F64)
        k = (t[:, None] - self.times[None]).abs().argmin(1)  # (B,)
        return x + self.b[k]


# ---------------------------------------------------------------------------------------------
# Eq. 7: the Pseudo-Huber distance
# ---------------------------------------------------------------------------------------------

def test_pseudo_huber_value_gradient_and_limit():
    delta = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=F64)
    norm = delta.flatten(1).norm(dim=1)
    c = huber_c(delta[0].numel())
    assert c == pytest.approx(0.00054 * math.sqrt(24))
    torch.testing.assert_close(pseudo_huber(delta, c), (norm**2 + c**2).sqrt() - c)
    # c → 0: the L2 norm
    torch.testing.assert_close(pseudo_huber(delta, 1e-12), norm)
    # the surrogate: value d(Δ) at any x, gradient Δ/√(‖Δ‖² + c²) w.r.t. x
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=F64, requires_grad=True)
    for c in (0.3, 2.0, 1e-9):
        value = pseudo_huber_surrogate(x, delta, c)
        torch.testing.assert_close(value.detach(), pseudo_huber(delta, c))
        (g,) = torch.autograd.grad(value.sum(), x)
        want = delta / ((norm**2 + c**2).sqrt()).reshape(-1, 1, 1, 1, 1)
        torch.testing.assert_close(g, want)
    torch.testing.assert_close(g.flatten(1).norm(dim=1), torch.ones(3, dtype=F64))  # c → 0: unit push


@pytest.mark.parametrize("schedule", [FlowMatching(shift=3.0), VPDiscrete()], ids=["flow", "vp"])
def test_both_forms_point_along_the_score_difference(schedule):
    mu_r, mu_f = vector(1), vector(2)
    teacher = Denoiser(GaussianX0(schedule, mu_r), schedule, "x0")
    fake = Denoiser(GaussianX0(schedule, mu_f), schedule, "x0")
    t = torch.tensor([0.3, 0.6, 0.9], dtype=F64)
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(3), dtype=F64)
    cond = make_batch(x).cond
    real, fake_pred = teacher.predict(x, t, cond), fake.predict(x, t, cond)
    alpha, sigma = coef(schedule, t)
    s_real, s_fake = gauss_score(x, alpha, sigma, mu_r), gauss_score(x, alpha, sigma, mu_f)
    torch.testing.assert_close(score_difference(real, fake_pred, "score"), s_fake - s_real)
    # Eq. 9: σ·(v_real − v_fake) = (α + σ)·(x0_fake − x0_real) = σ²(α + σ)/α · (s_fake − s_real)
    flow = score_difference(real, fake_pred, "flow")
    x0_gap = gauss_x0(x, alpha, sigma, mu_f) - gauss_x0(x, alpha, sigma, mu_r)
    torch.testing.assert_close(flow, (alpha + sigma) * x0_gap)
    torch.testing.assert_close(flow, sigma**2 * (alpha + sigma) / alpha * (s_fake - s_real))
    # the surrogate's push is −(s_real − s_fake), per sample
    x_in = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(pseudo_huber_surrogate(x_in, s_fake - s_real, 0.01).sum(), x_in)
    cos = torch.nn.functional.cosine_similarity((-g).flatten(1), (s_real - s_fake).flatten(1), dim=1)
    torch.testing.assert_close(cos, torch.ones(3, dtype=F64))


@pytest.mark.parametrize("schedule", [FlowMatching(shift=3.0), VPDiscrete()], ids=["flow", "vp"])
def test_the_transition_kernel_lands_on_the_marginal(schedule):
    """q(x_t | x_s) applied to x_s = α_s·x0 + σ_s·ε gives α_t·x0 + σ_t·ε' in law; from s = 0 it is add_noise."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000, 1, 1, 1, 1), 0.7, dtype=F64)
    s, t = torch.tensor(0.3, dtype=F64), torch.tensor(0.8, dtype=F64)
    x_s = schedule.add_noise(x0, torch.randn(x0.shape, generator=g, dtype=F64), s)
    x_t = schedule.diffuse(x_s, s, t, torch.randn(x0.shape, generator=g, dtype=F64))
    a_t, s_t = coef(schedule, t)
    assert float(x_t.mean()) == pytest.approx(float(a_t) * 0.7, abs=0.01)
    assert float(x_t.std()) == pytest.approx(float(s_t), rel=0.01)
    eps = torch.randn(x0.shape, generator=g, dtype=F64)
    torch.testing.assert_close(schedule.diffuse(x0, 0.0, t, eps), schedule.add_noise(x0, eps, t))


# ---------------------------------------------------------------------------------------------
# Eq. 3–9: the trajectory-matching gradient at every step
# ---------------------------------------------------------------------------------------------

def tdm_setup(schedule, sampler, b=8):
    mu_r, mu_f = vector(1), vector(2)
    init = torch.stack([vector(10 + k, 0.5) for k in range(len(TIMES))])  # (K, C, T, H, W)
    student = Denoiser(StepShift(schedule, TIMES, init), schedule, "x0")
    teacher = Denoiser(GaussianX0(schedule, mu_r), schedule, "x0")
    fake = Denoiser(GaussianX0(schedule, mu_f), schedule, "x0")
    roles = {"student": FakeRole("student", student), "teacher": FakeRole("teacher", teacher, trainable=False),
             "fake_score": FakeRole("fake_score", fake)}
    batch = make_batch(torch.zeros(b, *SHAPE, dtype=F64))
    return roles, batch, (mu_r, mu_f)


def by_hand(schedule, sampler, roles, batch, mus, form, role="student", prefix="tdm", tau_range=(0.02, 0.98)):
    """Per step k: (τ, x_s, s, x_τ, Δ_k) built from the same draws as the objectives, with analytic scores."""
    mu_r, mu_f = mus
    ctx = make_ctx(len(batch), role=role, times="uniform4", sampler=sampler, seed=5, step=3)
    as_student = make_ctx(len(batch), times="uniform4", sampler=sampler, seed=5, step=3)
    with torch.no_grad():
        sample = student_sample(roles["student"].module, batch, as_student)
    landed = [*sample.states[1:], sample.x0]
    out = []
    for k, t_k in enumerate(TIMES):
        s = TIMES[k + 1] if k + 1 < len(TIMES) else 0.0
        lo, hi = max(s, tau_range[0]), min(t_k, tau_range[1])
        tau = lo + ctx.rand(f"{prefix}/{k}/tau") * (hi - lo)
        z = ctx.randn(SHAPE, f"{prefix}/{k}/z", dtype=F64)
        a_s, s_s = coef(schedule, s)
        a_t, s_t = coef(schedule, tau)
        x_tau = a_t / a_s * landed[k] + (s_t**2 - (a_t * s_s / a_s) ** 2).sqrt() * z  # q(x_τ | x_s)
        if form == "score":
            delta = gauss_score(x_tau, a_t, s_t, mu_f) - gauss_score(x_tau, a_t, s_t, mu_r)
        else:
            delta = (a_t + s_t) * (gauss_x0(x_tau, a_t, s_t, mu_f) - gauss_x0(x_tau, a_t, s_t, mu_r))
        out.append({"tau": tau, "s": s, "x_tau": x_tau, "delta": delta, "sample": sample})
    return out


@pytest.mark.parametrize("sampler", ["consistency", "euler"])
@pytest.mark.parametrize("form", ["score", "flow"])
def test_tdm_pushes_every_step_along_the_score_difference(form, sampler):
    """backprop last (TDM): step k's shift b_k gets mean_b J_k·Δ_k/√(‖Δ_k‖² + c²), J_k = ∂x_τ/∂b_k > 0."""
    schedule = FlowMatching(shift=2.0)
    roles, batch, mus = tdm_setup(schedule, sampler)
    objective = TDM(TDM.Config(form=form, real_cfg_scale=None, backprop="last"), "traj")
    ctx = make_ctx(len(batch), times="uniform4", sampler=sampler, seed=5, step=3)
    out = objective(batch, roles, ctx)
    out.losses["traj"].mean().backward()
    grad = roles["student"].module.backbone.b.grad  # (K, C, T, H, W)

    c = huber_c(math.prod(SHAPE))
    for k, step in enumerate(by_hand(schedule, sampler, roles, batch, mus, form)):
        delta = step["delta"]
        push = delta / (delta.flatten(1).pow(2).sum(1) + c * c).sqrt().reshape(-1, 1, 1, 1, 1)
        a_t, _ = coef(schedule, step["tau"])
        a_s, s_s = coef(schedule, step["s"])
        if sampler == "consistency":  # x_s = α_s·(x_k + b_k) + σ_s·z: ∂x_τ/∂b_k = α_τ
            jacobian = a_t
        else:  # x_s = α_s·x̂0 + σ_s·ε̂, ε̂ = (x_k − α_k·x̂0)/σ_k: ∂x_s/∂b_k = α_s − σ_s·α_k/σ_k
            a_k, s_k = coef(schedule, TIMES[k])
            jacobian = a_t / a_s * (a_s - s_s * a_k / s_k)
        assert bool((jacobian > 0).all())
        torch.testing.assert_close(grad[k], (jacobian * push).mean(0), rtol=1e-6, atol=1e-9)
        # the loss value is d(Δ_k) summed over the steps; each step's is logged
        assert out.metrics[f"step{k}"] == pytest.approx(float(pseudo_huber(delta, c).mean()), rel=1e-6)


@pytest.mark.parametrize("sampler", ["consistency", "euler"])
def test_tdm_one_random_step_per_sample_is_k_times_that_steps_term(sampler):
    """steps: random — sample b trains at k_b ~ U{0..K−1} only: its loss is K·d(Δ_{k_b}) and step k's shift gets
    mean_b K·[k_b = k]·J_k·Δ_k/√(‖Δ_k‖² + c²), so the expectation over k_b is the 'all' objective's."""
    schedule = FlowMatching(shift=2.0)
    roles, batch, mus = tdm_setup(schedule, sampler, b=12)
    objective = TDM(TDM.Config(form="flow", real_cfg_scale=None, backprop="last", steps="random"), "traj")
    ctx = make_ctx(len(batch), times="uniform4", sampler=sampler, seed=5, step=3)
    out = objective(batch, roles, ctx)
    out.losses["traj"].mean().backward()
    grad = roles["student"].module.backbone.b.grad
    K, c = len(TIMES), huber_c(math.prod(SHAPE))
    chosen = (make_ctx(len(batch), role="student", seed=5, step=3).rand("tdm/step") * K).long()
    assert len(set(chosen.tolist())) > 1  # the draw mixes steps within the batch
    want_loss = torch.zeros(len(batch), dtype=F64)
    for k, step in enumerate(by_hand(schedule, sampler, roles, batch, mus, "flow")):
        rows = chosen == k
        delta = step["delta"]
        want_loss[rows] = K * pseudo_huber(delta, c)[rows]
        push = delta / (delta.flatten(1).pow(2).sum(1) + c * c).sqrt().reshape(-1, 1, 1, 1, 1)
        a_t, _ = coef(schedule, step["tau"])
        a_s, s_s = coef(schedule, step["s"])
        if sampler == "consistency":
            jacobian = a_t
        else:
            a_k, s_k = coef(schedule, TIMES[k])
            jacobian = a_t / a_s * (a_s - s_s * a_k / s_k)
        weight = (K * rows.to(F64)).reshape(-1, 1, 1, 1, 1)
        torch.testing.assert_close(grad[k], (weight * jacobian * push).mean(0), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(out.losses["traj"], want_loss, rtol=1e-6, atol=1e-9)


def test_tdm_backprop_all_reaches_the_earlier_steps():
    """consistency sampling, backprop all: ∂x_τ_m/∂b_j = α_τm · Π_{i=j+1..m} α(t_i) for every j ≤ m."""
    schedule = FlowMatching()
    roles, batch, mus = tdm_setup(schedule, "consistency")
    objective = TDM(TDM.Config(form="flow", real_cfg_scale=None, backprop="all"), "traj")
    objective(batch, roles, make_ctx(len(batch), times="uniform4", seed=5, step=3)).losses["traj"].mean().backward()
    grad = roles["student"].module.backbone.b.grad
    steps = by_hand(schedule, "consistency", roles, batch, mus, "flow")
    c = huber_c(math.prod(SHAPE))
    alphas = [1 - t for t in TIMES]  # α(t_i) of the states
    for j in range(len(TIMES)):
        want = torch.zeros(SHAPE, dtype=F64)
        for m in range(j, len(TIMES)):
            delta = steps[m]["delta"]
            push = delta / (delta.flatten(1).pow(2).sum(1) + c * c).sqrt().reshape(-1, 1, 1, 1, 1)
            chain = math.prod(alphas[j + 1:m + 1])
            want += (coef(schedule, steps[m]["tau"])[0] * chain * push).mean(0)
        torch.testing.assert_close(grad[j], want, rtol=1e-6, atol=1e-9)


def test_tdm_sgd_moves_a_shift_student_to_the_real_mean():
    """With the exact fake score of the current 1-step student G(ε) = ε + b ~ N(b, I), descending L_traj drives b to
    the real mean μ_r and the loss (‖Δ‖ through Pseudo-Huber) to ~0."""
    schedule = FlowMatching(shift=2.0)
    mu_r = vector(3, scale=1.5)
    student = Denoiser(Shift(SHAPE), schedule, "x0")
    b = student.backbone.b
    fake = Denoiser(GaussianX0(schedule, lambda: b.detach()), schedule, "x0")
    roles = {"student": FakeRole("student", student),
             "teacher": FakeRole("teacher", Denoiser(GaussianX0(schedule, mu_r), schedule, "x0"), trainable=False),
             "fake_score": FakeRole("fake_score", fake)}
    objective = TDM(TDM.Config(real_cfg_scale=None), "traj")
    batch = make_batch(torch.zeros(16, *SHAPE, dtype=F64))
    optim = torch.optim.SGD([b], lr=1.0)
    values = []
    for step in range(80):
        for group in optim.param_groups:
            group["lr"] = 3.0 * 0.93**step  # the push has norm ≤ 1 (Pseudo-Huber), so decay the step
        optim.zero_grad()
        loss = objective(batch, roles, make_ctx(16, step=step, times=[999])).losses["traj"].mean()
        loss.backward()
        optim.step()
        values.append(float(loss.detach()))
    start = float(mu_r.norm())
    assert float((b.detach() - mu_r).norm()) < 0.02 * start
    assert values[-1] < 0.02 * values[0]


def test_tdm_uses_the_real_score_with_cfg_and_refuses_empty_intervals():
    schedule = FlowMatching()
    roles, batch, _ = tdm_setup(schedule, "euler", b=2)
    teacher = roles["teacher"].module
    teacher.reset_nfe()
    TDM(TDM.Config(real_cfg_scale=3.0), "traj")(batch, roles, make_ctx(2, times="uniform4", sampler="euler"))
    assert teacher.nfe == 2 * len(TIMES)  # one guided call per step
    with pytest.raises(UserError, match="no τ"):
        TDM(TDM.Config(tau_min=0.3), "traj")(batch, roles, make_ctx(2, times="uniform4", sampler="euler"))


# ---------------------------------------------------------------------------------------------
# Eq. 8 and Eq. 10: the fake score's losses
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["score", "flow"])
def test_fake_score_losses_are_eq8_and_eq10(form):
    schedule = FlowMatching(shift=2.0)
    roles, batch, mus = tdm_setup(schedule, "euler")
    objective = TDMFakeScore(TDMFakeScore.Config(form=form), "fake")
    ctx = make_ctx(len(batch), role="fake_score", times="uniform4", sampler="euler", seed=5, step=3)
    out = objective(batch, roles, ctx)

    want = torch.zeros(len(batch), dtype=F64)
    for k, step in enumerate(by_hand(schedule, "euler", roles, batch, mus, form, role="fake_score",
                                     prefix="tdm_fake")):
        x_tau, (a, s) = step["x_tau"], coef(schedule, step["tau"])
        x0_hat = step["sample"].x0_predictions[k]  # the step's clean prediction
        mu = gauss_x0(x_tau, a, s, mus[1])  # μ_ψ(x_τ, τ): the fake model (analytic)
        if form == "score":  # Eq. 8: ω_τ‖μ_ψ − x0‖², ω_τ = min(SNR, 5)
            omega = torch.minimum((a / s).flatten() ** 2, torch.tensor(5.0, dtype=F64))
            want += omega * (mu - x0_hat).pow(2).flatten(1).mean(1)
        else:  # Eq. 10: ‖ε − x0 − v_ψ(σ·ε + (1 − σ)·x0)‖², x0 = x̂0_k, ε the noise x_τ carries around it
            eps = (x_tau - a * x0_hat) / s
            assert torch.allclose(s * eps + (1 - s) * x0_hat, x_tau)
            v_psi = (x_tau - a * mu) / s - mu
            want += (eps - x0_hat - v_psi).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(out.losses["mse"], want)


def test_fake_score_trains_the_fake_only():
    pipe, batch = tiny_setup(2)
    student, fake = copy.deepcopy(pipe.denoiser), copy.deepcopy(pipe.denoiser)
    roles = {"student": FakeRole("student", student.requires_grad_(True)),
             "fake_score": FakeRole("fake_score", fake.requires_grad_(True))}
    out = TDMFakeScore(TDMFakeScore.Config(), "fake")(batch, roles, make_ctx(2, role="fake_score", times="uniform2"))
    out.losses["mse"].mean().backward()
    assert all(p.grad is None for p in student.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in fake.parameters())


# ---------------------------------------------------------------------------------------------
# Eq. 11–12: the GAN on teacher features
# ---------------------------------------------------------------------------------------------

def gan_setup():
    pipe, batch = tiny_setup(2)
    teacher = copy.deepcopy(pipe.denoiser).requires_grad_(True)  # requires_grad on purpose: it must stay untouched
    student = copy.deepcopy(pipe.denoiser).requires_grad_(True)
    torch.manual_seed(0)
    heads = FeatureHeads(channels=32, blocks=[0, -1], width=8)
    roles = {"student": FakeRole("student", student), "teacher": FakeRole("teacher", teacher, trainable=False),
             "discriminator": FakeRole("discriminator", heads)}
    return roles, batch


def logits_by_hand(roles, x0, tau, eps, cond):
    teacher, heads = roles["teacher"].module, roles["discriminator"].module
    alpha, sigma = coef(teacher.schedule, tau)
    x_tau = alpha.float() * x0 + sigma.float() * eps
    feats = extract_features(teacher, x_tau, tau.float(), cond, [0, 1])  # (B, N, D) on the 4 × 2 × 2 token grid
    maps = [rearrange(f, "b (t h w) d -> b d t h w", t=4, h=2, w=2) for f in feats]
    return torch.stack([head(m) for head, m in zip(heads.heads, maps)], dim=1)  # (B, 2)


def test_feature_gan_losses_are_eq11_and_eq12():
    roles, batch = gan_setup()
    shape = tuple(batch.latents.shape[1:])
    # discriminator: relu(1 − D(real)) + relu(1 + D(fake)), per head, averaged
    ctx = make_ctx(2, role="discriminator", times="uniform4", sampler="euler")
    out = FeatureGANDiscriminator(FeatureGANDiscriminator.Config(), "disc")(batch, roles, ctx)
    with torch.no_grad():
        x_hat = student_sample(roles["student"].module, batch, make_ctx(2, times="uniform4", sampler="euler")).x0
        tau = ctx.times(LogitNormal(0.0, 1.0), "gan/tau")
        d_real = logits_by_hand(roles, batch.latents, tau, ctx.randn(shape, "gan/real"), batch.cond)
        d_fake = logits_by_hand(roles, x_hat, tau, ctx.randn(shape, "gan/fake"), batch.cond)
    torch.testing.assert_close(out.losses["disc"], (torch.relu(1 - d_real) + torch.relu(1 + d_fake)).mean(1))
    out.losses["disc"].mean().backward()
    assert any(p.grad is not None for p in roles["discriminator"].module.parameters())
    assert all(p.grad is None for name in ("student", "teacher") for p in roles[name].module.parameters())

    # generator: −D(fake), per head, averaged; gradient to the student only
    roles["discriminator"].module.zero_grad(set_to_none=True)
    ctx = make_ctx(2, role="student", times="uniform4", sampler="euler")
    out = FeatureGANGenerator(FeatureGANGenerator.Config(), "gen")(batch, roles, ctx)
    with torch.no_grad():
        tau = ctx.times(LogitNormal(0.0, 1.0), "gan/tau")
        d_fake = logits_by_hand(roles, x_hat, tau, ctx.randn(shape, "gan/fake"), batch.cond)
    torch.testing.assert_close(out.losses["gen"].detach(), -d_fake.mean(1))
    out.losses["gen"].mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in roles["student"].module.parameters())
    assert all(p.grad is None for name in ("teacher", "discriminator") for p in roles[name].module.parameters())


# ---------------------------------------------------------------------------------------------
# Eq. 13–14: rewards through the decoder
# ---------------------------------------------------------------------------------------------

class Recorder(Reward):
    """Mean of colour channel 0 times a learnable scale; remembers what it was given."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0, dtype=F64))
        self.seen = []

    def reward(self, frames, prompts=None):
        self.seen.append((frames.detach().clone(), list(prompts)))
        return self.scale * frames[..., 0].flatten(1).mean(1)


class Decoder(nn.Module):
    """A frozen-by-config decoder with parameters: latent channels 0–2 as RGB, frame t from latent frame t."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(1.0, dtype=F64))

    def forward(self, latents):
        return rearrange(self.gain * latents[:, :3], "b c t h w -> b t h w c")


class Shift(Backbone):
    def __init__(self, shape):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(shape, dtype=F64))

    def forward(self, x, timestep, cond):
        return x + self.b


def reward_setup(T=5):
    schedule = FlowMatching()
    shape = (4, T, 2, 2)
    student = Denoiser(Shift(shape), schedule, "x0")
    teacher = Denoiser(Shift(shape), schedule, "x0")
    roles = {"student": FakeRole("student", student), "teacher": FakeRole("teacher", teacher, trainable=False),
             "reward_image_text": FakeRole("reward_image_text", Recorder(), trainable=False),
             "reward_image_quality": FakeRole("reward_image_quality", Recorder(), trainable=False),
             "reward_video_text": FakeRole("reward_video_text", Recorder(), trainable=False)}
    batch = make_batch(torch.zeros(2, *shape, dtype=F64), prompts=["a red circle moves left", "a blue square moves up"])
    return roles, batch


def test_spatial_reward_reads_the_first_middle_and_last_frames_and_trains_the_student_only():
    roles, batch = reward_setup(T=5)
    decoder = Decoder()
    objective = SpatialReward(SpatialReward.Config(backprop="last"), "spatial")
    objective.decoder = decoder
    ctx = make_ctx(2, times="uniform4", sampler="euler")
    out = objective(batch, roles, ctx)
    with torch.no_grad():
        frames = decoder(student_sample(roles["student"].module, batch, ctx).x0)  # (B, T, H, W, 3)
    assert keyframe_indices(5) == [0, 2, 4]
    for name in ("reward_image_text", "reward_image_quality"):
        (images, prompts), = roles[name].module.seen
        # every key frame is scored as a one-frame image, with its caption
        torch.testing.assert_close(images, rearrange(frames[:, [0, 2, 4]], "b m h w c -> (b m) 1 h w c"))
        assert prompts == [p for p in batch.prompts for _ in range(3)]
    want = -2 * frames[:, [0, 2, 4], ..., 0].flatten(1).mean(1)  # −(R_it + R_iq), each the mean of channel 0
    torch.testing.assert_close(out.losses["spatial"].detach(), want)
    assert {"image_text", "image_quality"} <= set(out.metrics)

    out.losses["spatial"].mean().backward()
    g = roles["student"].module.backbone.b.grad  # ∂loss/∂x̂0 (the last step's x̂0 = x + b): (C, T, H, W)
    assert bool((g[0, [0, 2, 4]] != 0).all()) and bool((g[:, [1, 3]] == 0).all()) and bool((g[1:] == 0).all())
    assert decoder.gain.grad is None  # neither the decoder …
    assert all(roles[n].module.scale.grad is None for n in ("reward_image_text", "reward_image_quality", "teacher")
               if hasattr(roles[n].module, "scale"))  # … nor a reward model
    assert all(p.grad is None for p in roles["teacher"].module.parameters())


def test_temporal_reward_reads_the_whole_clip():
    roles, batch = reward_setup(T=5)
    objective = TemporalReward(TemporalReward.Config(), "temporal")
    objective.decoder = Decoder()
    out = objective(batch, roles, make_ctx(2, times="uniform4", sampler="euler"))
    (frames, prompts), = roles["reward_video_text"].module.seen
    assert frames.shape == (2, 5, 2, 2, 3) and prompts == batch.prompts
    torch.testing.assert_close(out.losses["temporal"].detach(), -frames[..., 0].flatten(1).mean(1))
    out.losses["temporal"].mean().backward()  # backprop all: every step's shift learns
    assert bool((roles["student"].module.backbone.b.grad[0] != 0).all())
    assert roles["reward_video_text"].module.scale.grad is None and objective.decoder.gain.grad is None


def test_a_reward_objective_without_a_decoder_says_so():
    roles, batch = reward_setup()
    with pytest.raises(UserError, match="no decoder"):
        SpatialReward(SpatialReward.Config(), "spatial")(batch, roles, make_ctx(2, times="uniform4"))


def test_generator_step_repeats_the_sampler():
    """StudentGenerator.step from a sample's state k lands where the sample's step k did (both samplers)."""
    pipe, batch = tiny_setup(2)
    for sampler in ("consistency", "euler"):
        gen = StudentGenerator(GeneratorConfig(times="uniform4", sampler=sampler))
        ctx = make_ctx(2, times="uniform4", sampler=sampler)
        with torch.no_grad():
            sample = gen.sample(pipe.denoiser, batch, ctx)
            landed = [*sample.states[1:], sample.x0]
            for k in range(4):
                x0_k, x_next = gen.step(pipe.denoiser, sample.states[k], k, batch, ctx)
                torch.testing.assert_close(x0_k, sample.x0_predictions[k])
                torch.testing.assert_close(x_next, landed[k])


def test_multi_head_discriminators_are_wrapped_where_they_are_called():
    """DDP/FSDP wrap a role's compute root; for heads in a ModuleList that is the heads module itself (the list
    is never called, so hooks on it would never run and the heads would not synchronise across processes)."""
    from fewstep.engine.distributed import compute_root
    from fewstep.objectives.adversarial import TimestepHeads

    for heads in (FeatureHeads(32, [0, 1], width=8), FeatureHeads(32, [1], width=8), TimestepHeads(32, 5, width=8)):
        assert compute_root(heads) is heads
    pipe, _ = tiny_setup(1)
    assert compute_root(pipe.denoiser) is pipe.denoiser.backbone.module  # a denoiser: its network, as before
