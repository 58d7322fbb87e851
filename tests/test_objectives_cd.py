"""Consistency distillation with the m-step teacher solver Denoise^m (DOLLAR Eq. 6–9)."""

from __future__ import annotations

import copy

import pytest
import torch

from fewstep.diffusion.samplers import euler_step
from fewstep.diffusion.schedules import FlowMatching, VPDiscrete
from fewstep.models.backbones import Backbone
from fewstep.models.denoiser import Denoiser
from fewstep.objectives.consistency import ConsistencyDistillation
from helpers import F64, FakeRole, GaussianX0, const_cond, engine_config, make_batch, make_ctx, model_time, tiny_setup

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 1, 2, 2)  # (C, T, H, W)
M_DATA, S_DATA = 0.7, 0.6  # teacher data law N(M_DATA + c, S_DATA²)


def cd(**kwargs) -> ConsistencyDistillation:
    return ConsistencyDistillation(ConsistencyDistillation.Config(**kwargs), "cd")


def latents(b, seed=0):
    return torch.randn(b, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=F64)


class DiscreteSolverX0(Backbone):
    """x0 prediction = the teacher's deterministic solve along the grid from (x, t) down to t = 0.

    The consistency function of the teacher's *discretised* ODE: f(x_{t_{n+m}}) equals
    f(Denoise^m(x_{t_{n+m}})) exactly, so the CD loss of this student is zero.
    """

    def __init__(self, teacher, grid, cfg_scale):
        super().__init__()
        self.teacher, self.grid, self.cfg_scale = teacher, grid, cfg_scale

    def forward(self, x, timestep, cond):
        t = model_time(self.teacher.schedule, timestep)
        out = []
        for b in range(x.shape[0]):
            xb, cb = x[b:b + 1], cond.index(slice(b, b + 1))
            start = int((self.grid - t[b]).abs().argmin())
            for j in range(start, len(self.grid) - 1):
                pred = self.teacher.predict(xb, self.grid[j], cb, cfg_scale=self.cfg_scale, uncond=const_cond(1))
                xb = euler_step(pred, *self.teacher.schedule.coefficients(self.grid[j + 1], xb))
            out.append(xb)
        return torch.cat(out)


class Fixed(Backbone):
    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x, timestep, cond):
        return self.out.expand_as(x)


# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("grid, m", [("ddim50", 1), ("ddim50", 5), ([999, 666, 333], 2)])
def test_cd_target_equals_a_hand_computed_m_step_ddim_solve(grid, m):
    """VP teacher (DOLLAR's), CFG w = 2.5 (ours), EMA target ≠ live student; the grid + t = 0."""
    sched = VPDiscrete()
    teacher = Denoiser(GaussianX0(sched, M_DATA, S_DATA), sched, "x0")
    ema = Denoiser(GaussianX0(sched, -0.3, 1.2), sched, "x0")
    student = Denoiser(GaussianX0(sched, 0.1, 0.9), sched, "x0")
    roles = {"student": FakeRole("student", student, ema=ema), "teacher": FakeRole("teacher", teacher, False)}
    w, c, b = 2.5, 0.4, 16
    batch = make_batch(latents(b), cond_value=c)
    ctx = make_ctx(b)
    objective = cd(grid=grid, m=m, cfg_scale=w)
    draw = objective.target(batch, roles, ctx)
    indices = (list(range(999, 0, -20)) if grid == "ddim50" else grid) + [-1]  # DDPM indices; −1 is t = 0

    abar = sched.alphas_cumprod.double()

    def coef(k):  # (α, σ) at DDPM index k; k = −1 is t = 0
        return (1.0, 0.0) if k < 0 else (float(abar[k].sqrt()), float((1 - abar[k]).sqrt()))

    def posterior_x0(x, a, s, mean, std):
        return mean + a * std**2 / (a**2 * std**2 + s**2) * (x - a * mean)

    eps = ctx.randn(SHAPE, "cd/eps", dtype=F64)
    assert int(draw.start_index.max()) <= len(indices) - 1 - m
    for i in range(b):
        n = int(draw.start_index[i])
        ks = indices[n:n + m + 1]  # t_{n+m} … t_n
        torch.testing.assert_close(draw.t_start[i], torch.tensor((ks[0] + 1) / 1000, dtype=F64))
        a0, s0 = coef(ks[0])
        x = a0 * batch.latents[i] + s0 * eps[i]
        torch.testing.assert_close(draw.x_start[i], x)
        for j in range(m):  # DOLLAR Eq. 5 with σ_t = 0, x_s = α_s·x̂0 + σ_s·ε̂, on the CFG teacher (Eq. 9)
            a_t, s_t = coef(ks[j])
            x0_u = posterior_x0(x, a_t, s_t, M_DATA, S_DATA)
            x0_c = posterior_x0(x, a_t, s_t, M_DATA + c, S_DATA)
            x0 = x0_u + w * (x0_c - x0_u)
            eps_hat = (x - a_t * x0) / s_t
            a_s, s_s = coef(ks[j + 1])
            x = a_s * x0 + s_s * eps_hat
        torch.testing.assert_close(draw.x_end[i], x, rtol=1e-9, atol=1e-9)
        # target: the EMA's x0 prediction (c_skip = 0, c_out = 1), or x itself at t_n = 0
        a_n, s_n = coef(ks[-1])
        expected = x if ks[-1] < 0 else posterior_x0(x, a_n, s_n, -0.3 + c, 1.2)
        torch.testing.assert_close(draw.target[i], expected, rtol=1e-9, atol=1e-9)
    if grid != "ddim50":  # both start positions drawn, one of them ending at t = 0
        assert set(draw.start_index.tolist()) == {0, 1}


def test_m1_and_m5_give_different_targets_from_the_same_start():
    sched = VPDiscrete()
    teacher = Denoiser(GaussianX0(sched, M_DATA, S_DATA), sched, "x0")
    roles = {"student": FakeRole("student", teacher), "teacher": FakeRole("teacher", teacher, False)}
    batch, ctx = make_batch(latents(4)), make_ctx(4)
    x, path5 = latents(4, seed=1), sched.t_from_index([499, 479, 459, 439, 419, 399]).unsqueeze(1).expand(6, 4)
    from fewstep.objectives.consistency import denoise_m

    five = denoise_m(teacher, x, path5, batch.cond)
    one = denoise_m(teacher, x, path5[[0, -1]], batch.cond)  # one DDIM jump over the same interval
    assert float((five - one).abs().max()) > 1e-4  # Denoise^5 ≠ Denoise^1 for non-degenerate data
    t1 = cd(m=1).target(batch, roles, ctx).target
    t5 = cd(m=5).target(batch, roles, ctx).target
    assert not torch.allclose(t1, t5)


@pytest.mark.parametrize("grid, m, distance", [("ddim50", 1, "huber"), ("ddim50", 5, "mse"),
                                               ([999, 666, 333], 2, "huber")])
def test_cd_loss_is_zero_for_a_student_consistent_with_the_teacher_ode(grid, m, distance):
    sched = FlowMatching(shift=3.0)
    teacher = Denoiser(GaussianX0(sched, M_DATA, S_DATA), sched, "x0")
    objective = cd(grid=grid, m=m, cfg_scale=3.0, distance=distance)
    grid = objective.grid(sched)
    consistent = Denoiser(DiscreteSolverX0(teacher, grid, 3.0), sched, "x0")
    b = 6
    batch, ctx = make_batch(latents(b), cond_value=0.2), make_ctx(b)
    roles = {"student": FakeRole("student", consistent), "teacher": FakeRole("teacher", teacher, False)}
    loss = objective(batch, roles, ctx).losses["cd"]
    assert loss.shape == (b,) and float(loss.max()) < 1e-12
    # the teacher's own x0 prediction is not a consistency function of its ODE: loss > 0
    roles["student"] = FakeRole("student", teacher)
    assert float(objective(batch, roles, ctx).losses["cd"].min()) > 1e-6


def test_consistency_function_parameterisation_and_boundary():
    sched = VPDiscrete()
    raw = torch.full(SHAPE, 0.3, dtype=F64)
    student = Denoiser(Fixed(raw), sched, "eps")
    x = latents(3)
    t = torch.tensor([0.5, 0.0, 0.25], dtype=F64)
    cond = const_cond(3)
    native = cd().consistency_function(student, x, t, cond)
    hetero = cd(parameterization="x0").consistency_function(student, x, t, cond)
    a, s = sched.coefficients(t, x)
    x0_from_eps = (x - s * raw) / a  # homogeneous: the eps output converted to x0 (Prediction.x0)
    torch.testing.assert_close(native[[0, 2]], x0_from_eps[[0, 2]])
    torch.testing.assert_close(hetero[[0, 2]], raw.expand(2, *SHAPE))  # heterogeneous: the raw output is x0
    torch.testing.assert_close(native[1], x[1])  # boundary f(x, 0) = x
    lcm = cd(boundary="lcm", parameterization="x0")
    f = lcm.consistency_function(student, x, t, cond)
    torch.testing.assert_close(f[1], x[1])
    sk = 10.0 * 1000 * t[0]
    c_skip, c_out = 0.25 / (sk**2 + 0.25), sk / (sk**2 + 0.25) ** 0.5
    torch.testing.assert_close(f[0], c_skip * x[0] + c_out * raw)


def test_cd_on_the_toy_backbone_trains_the_student_against_its_ema():
    pipe, batch = tiny_setup(2)
    student = copy.deepcopy(pipe.denoiser).requires_grad_(True)
    ema = copy.deepcopy(pipe.denoiser).requires_grad_(False)
    teacher = copy.deepcopy(pipe.denoiser).requires_grad_(False)
    roles = {"student": FakeRole("student", student, ema=ema), "teacher": FakeRole("teacher", teacher, False)}
    objective = cd()  # ddim50 grid, m = 5, CFG 8.5, pseudo-Huber
    out = objective(batch, roles, make_ctx(2))
    assert teacher.nfe == 10  # 5 CFG steps
    loss = out.losses["cd"]
    assert loss.shape == (2,) and bool(torch.isfinite(loss).all())
    loss.mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_cd_is_listed_in_a_stage_by_kind():
    cfg = engine_config({"student": True, "teacher": False},
                        {"cd": {"kind": "cd", "m": 1, "cfg_scale": 8.5, "distance": "mse", "grid": "ddim50"}})
    assert cfg.stages["main"].objectives["cd"].reads() == {"teacher"}
