"""SwiftVideo's continuous-time consistency distillation (papers/003, Alg. 1, Eq. 5–9, 14), checked against
independent computations: the tangent against central differences, Eq. 9 at r = 0, the normalisation, the
JVP methods against each other, and a 1-D Gaussian teacher whose consistency map is known in closed form."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fewstep.diffusion.schedules import FlowMatching, VPDiscrete
from fewstep.engine.ema import EMA
from fewstep.errors import UserError
from fewstep.models.backbones import Backbone
from fewstep.models.denoiser import Denoiser
from fewstep.objectives.continuous_consistency import (ContinuousConsistency, ContinuousConsistencyConfig,
                                                       normalize_tangent, tangent_warmup)
from helpers import F64, FakeRole, GaussianX0, make_batch, make_ctx, perturb, tiny_setup

pytestmark = pytest.mark.usefixtures("one_thread")


def ccd(**config) -> ContinuousConsistency:
    return ContinuousConsistency(ContinuousConsistencyConfig(**config), "ccd")


def toy_roles(shift=3.0, dtype=F64):
    """A tiny toy-DiT teacher (flow schedule with ``shift``), the student and its EMA as perturbed copies."""
    import copy

    pipe, batch = tiny_setup(batch_size=2)
    teacher = pipe.denoiser.to(dtype)
    teacher.schedule = FlowMatching(shift=shift)
    student = perturb(copy.deepcopy(teacher), scale=0.01, seed=1)
    ema = perturb(copy.deepcopy(student), scale=0.01, seed=2).eval()
    batch.latents = batch.latents.to(dtype)
    batch.cond, batch.uncond = batch.cond.to(dtype), batch.uncond.to(dtype)
    return {"student": FakeRole("student", student, ema), "teacher": FakeRole("teacher", teacher, trainable=False)}, \
        batch


# ----------------------------------------------------------------------------------- the pieces
def test_tangent_normalisation_is_g_over_norm_plus_c():
    g = torch.randn(3, 4, 2, 3, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    g[1] *= 1e-3  # a sample whose norm is below c
    got, got_rms = normalize_tangent(g, "norm", 0.1), normalize_tangent(g, "rms", 0.1)
    for b in range(3):
        norm = float(torch.sqrt((g[b] ** 2).sum()))  # ‖g‖₂ of one sample over (C, T, H, W)
        torch.testing.assert_close(got[b], g[b] / (norm + 0.1))
        rms = float(torch.sqrt((g[b] ** 2).mean()))  # the same norm over √(C·T·H·W) = √72
        torch.testing.assert_close(got_rms[b], g[b] / (rms + 0.1))
    # rms: a tangent far above c becomes one of unit root mean square, whatever the latent's size
    big = 50 * torch.randn(2, 4, 8, 6, 6, generator=torch.Generator().manual_seed(1), dtype=F64)
    unit = normalize_tangent(big, "rms", 0.1).pow(2).flatten(1).mean(1).sqrt()
    torch.testing.assert_close(unit, torch.ones(2, dtype=F64), rtol=5e-3, atol=0)
    torch.testing.assert_close(normalize_tangent(3 * g, "clip"), (3 * g).clamp(-1, 1))
    assert torch.equal(normalize_tangent(g, "none"), g)


def test_tangent_warmup_is_linear_to_one():
    assert [tangent_warmup(s, 4) for s in (0, 1, 2, 4, 9)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert tangent_warmup(0, 0) == 1.0


def test_r_zero_is_eq9_flow_matching_form():
    """r = 0: g = dx/dt − F⁻, so the target is the teacher's velocity and the loss is ‖F_θ − F_teacher‖²."""
    roles, batch = toy_roles()
    obj = ccd(normalization="none", warmup_steps=10, cfg_scale=2.0)
    ctx = make_ctx(2, step=0)
    draw = obj.draw(batch, roles, ctx)
    assert draw.r == 0.0 and draw.df_minus is None
    teacher = roles["teacher"].module
    v = teacher.predict(draw.x_t, draw.t, batch.cond, cfg_scale=2.0, uncond=batch.uncond).flow
    torch.testing.assert_close(draw.target, v)
    student = roles["student"].module
    fm = (student.predict(draw.x_t, draw.t, batch.cond).flow - v).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(obj(batch, roles, ctx).losses["ccd"], fm)
    # with normalisation the target is F⁻ + (v − F⁻)/(‖v − F⁻‖ + c)
    normed = ccd(warmup_steps=10, cfg_scale=2.0).draw(batch, roles, ctx)
    torch.testing.assert_close(normed.target, draw.f_minus + normalize_tangent(v - draw.f_minus, "rms", 0.1))


def test_x_t_follows_the_papers_time():
    """t ~ logit-normal is the paper's t = σ: x_t = (1 − σ)·x0 + σ·ε on a shifted schedule too."""
    roles, batch = toy_roles(shift=3.0)
    ctx = make_ctx(2, step=5)
    draw = ccd(warmup_steps=0).draw(batch, roles, ctx)
    sigma = ctx.times(ccd().distribution, "ccd/t")
    eps = ctx.randn(tuple(batch.latents.shape[1:]), "ccd/eps", dtype=F64)
    s = sigma.reshape(-1, 1, 1, 1, 1)
    torch.testing.assert_close(draw.sigma, sigma)
    torch.testing.assert_close(draw.x_t, (1 - s) * batch.latents + s * eps)
    torch.testing.assert_close(FlowMatching(3.0).sigma(draw.t), sigma)


@pytest.mark.parametrize("method", ["blockwise", "autograd"])
def test_tangent_is_dF_dt_along_the_teacher_ode(method):
    """g = dx/dt − F⁻ − r·t·dF⁻/dt (Eq. 9) with dF⁻/dt the central difference of F⁻ along (dx/dt, 1) in σ."""
    roles, batch = toy_roles(shift=3.0)
    obj = ccd(normalization="none", warmup_steps=8, jvp=method, cfg_scale=2.0)
    draw = obj.draw(batch, roles, make_ctx(2, step=4))  # r = 0.5
    assert draw.r == 0.5
    ema, schedule, h = roles["student"].ema_module, FlowMatching(3.0), 1e-6

    def F(x, sigma):
        return ema.predict(x, schedule.unshift(sigma), batch.cond).flow

    with torch.no_grad():
        fd = (F(draw.x_t + h * draw.velocity, draw.sigma + h) - F(draw.x_t - h * draw.velocity, draw.sigma - h)) / (2 * h)
    rel = float((draw.df_minus - fd).norm() / fd.norm())
    assert rel < 1e-6, rel
    s = draw.sigma.reshape(-1, 1, 1, 1, 1)
    torch.testing.assert_close(draw.tangent_raw, draw.velocity - draw.f_minus - 0.5 * s * fd, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(draw.target, draw.f_minus + draw.tangent_raw)


def test_jvp_methods_agree():
    roles, batch = toy_roles(shift=1.0)
    targets = {m: ccd(warmup_steps=0, jvp=m, fd_step=1e-6, normalization="none")
               .draw(batch, roles, make_ctx(2, step=3)).target for m in ("blockwise", "autograd", "finite_difference")}
    torch.testing.assert_close(targets["blockwise"], targets["autograd"], rtol=0, atol=1e-12)
    torch.testing.assert_close(targets["finite_difference"], targets["autograd"], rtol=1e-6, atol=1e-8)


def test_gradient_reaches_only_the_student():
    roles, batch = toy_roles(dtype=torch.float32)
    loss = ccd(warmup_steps=0).__call__(batch, roles, make_ctx(2, step=1)).losses["ccd"]
    loss.mean().backward()
    assert any(p.grad is not None for p in roles["student"].module.parameters())
    assert all(p.grad is None for p in roles["student"].ema_module.parameters())
    assert all(p.grad is None for p in roles["teacher"].module.parameters())


def test_a_vp_teacher_is_refused():
    roles, batch = toy_roles()
    roles["teacher"].module.schedule = VPDiscrete()
    with pytest.raises(UserError, match="flow-matching teacher"):
        ccd().draw(batch, roles, make_ctx(2))


# ----------------------------------------------------------------------------------- 1-D Gaussian
M, S = 1.0, 0.5  # data x0 ~ N(M, S²) elementwise


class MLP(Backbone):
    """F_θ(x, t) for scalar data: an MLP on (x, σ) per element."""

    def __init__(self, width=64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, x, timestep, cond):
        t = (timestep / 1000).reshape(-1, *[1] * (x.ndim - 1)).expand_as(x)
        return self.net(torch.stack([x, t], -1)).squeeze(-1)


def exact_consistency_map(x, sigma):
    """The PF-ODE endpoint for x0 ~ N(M, S²): x_σ = (1 − σ)·M + √((1 − σ)²S² + σ²)·z along a path, so
    f(x, σ) = M + S·(x − (1 − σ)·M) / √((1 − σ)²S² + σ²)."""
    return M + S * (x - (1 - sigma) * M) / torch.sqrt((1 - sigma) ** 2 * S**2 + sigma**2)


def test_ccd_learns_the_exact_consistency_map_of_a_gaussian_teacher():
    """Alg. 1 (logit-normal (−0.6, 1.4), r warm-up, g/(‖g‖₂ + 0.1), EMA 0.95) drives a small student's
    f = x_t − t·F_θ to the ODE's endpoint; the teacher's one Euler step x_t − t·v is far from it. ‖·‖ is the L2
    norm here: over a sample's 16 elements that is the rms reading with c = 0.025 (‖g‖₂ = 4·RMS(g)); with
    c = 0.1 on this scalar problem, whose tangents are small, the map comes out ~4× less exact (0.04–0.05)."""
    schedule = FlowMatching()
    teacher = Denoiser(GaussianX0(schedule, torch.full((1, 1, 1, 1), M), S), schedule, "x0")
    torch.manual_seed(0)
    student = Denoiser(MLP(), schedule, "flow")
    ema = EMA(student, 0.95)
    obj = ccd(warmup_steps=200, jvp="autograd", normalization="norm")
    roles = {"student": FakeRole("student", student, ema.module), "teacher": FakeRole("teacher", teacher, trainable=False)}
    opt = torch.optim.Adam(student.parameters(), lr=2e-3)
    g, B = torch.Generator().manual_seed(1), 64
    for step in range(600):
        batch = make_batch(M + S * torch.randn(B, 1, 1, 1, 16, generator=g))  # (B, C, T, H, W) of scalars
        batch.sample_ids = torch.arange(step * B, (step + 1) * B)
        ctx = make_ctx(B, step=step)
        ctx.sample_ids = batch.sample_ids
        loss = obj(batch, roles, ctx).losses["ccd"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(student)

    # on the marginal of x_σ: z in [−2, 2] standard deviations, σ in [0.05, 0.95]
    z, sigma = torch.meshgrid(torch.linspace(-2, 2, 21, dtype=F64), torch.linspace(0.05, 0.95, 19, dtype=F64),
                              indexing="ij")
    x = ((1 - sigma) * M + torch.sqrt((1 - sigma) ** 2 * S**2 + sigma**2) * z).reshape(-1, 1, 1, 1, 1)
    sigma = sigma.reshape(-1)
    cond = make_batch(x).cond
    with torch.no_grad():
        f = x - sigma.reshape(-1, 1, 1, 1, 1) * ema.module.double().predict(x, sigma, cond).flow
        euler = x - sigma.reshape(-1, 1, 1, 1, 1) * teacher.predict(x, sigma, cond).flow
    want = exact_consistency_map(x, sigma.reshape(-1, 1, 1, 1, 1))
    rms, rms_euler = float((f - want).pow(2).mean().sqrt()), float((euler - want).pow(2).mean().sqrt())
    assert rms < 0.04 and rms < 0.1 * rms_euler, (rms, rms_euler)  # ~0.01 against ~0.37
