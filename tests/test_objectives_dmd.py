"""VSD / DMD (DOLLAR Eq. 10–13, DMD2) and the fake-score loss on student samples.

Gaussian toys with analytic scores: real data N(μ_r, I), fake N(μ_f, I); the "denoisers" predict
the exact posterior mean E[x0 | x_t] (:class:`helpers.GaussianX0`).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from fewstep.diffusion.schedules import FlowMatching, Uniform, VPDiscrete
from fewstep.errors import UserError
from fewstep.models.backbones import Backbone
from fewstep.models.denoiser import Denoiser
from fewstep.objectives.distribution_matching import VSD, FakeScoreLoss, dmd_gradient, stop_gradient_mse
from fewstep.objectives.student import GeneratorConfig, StudentGenerator, step_times, student_sample
from helpers import F64, FakeRole, GaussianX0, engine_config, make_batch, make_ctx, tiny_setup

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# Gaussian toys
# ---------------------------------------------------------------------------------------------

class Shift(Backbone):
    """x0 prediction ``x_t + b`` (a learnable shift): at t ≈ 1 the one-step student G(ε) = ε + b."""

    def __init__(self, b):
        super().__init__()
        self.b = nn.Parameter(b.clone())

    def forward(self, x, timestep, cond):
        return x + self.b


SHAPE = (2, 1, 2, 2)  # (C, T, H, W) of the Gaussian toys


def vector(seed, scale=1.0):
    return scale * torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ---------------------------------------------------------------------------------------------
# The student generator
# ---------------------------------------------------------------------------------------------

def test_step_times_follow_the_schedule():
    flow, vp = FlowMatching(), VPDiscrete()
    torch.testing.assert_close(step_times("dollar4", flow), torch.tensor([0.999, 0.749, 0.499, 0.249], dtype=F64))
    torch.testing.assert_close(step_times([999, 499], vp), torch.tensor([1.0, 0.5], dtype=F64))
    assert float(step_times("accvideo_keys", flow)[-1]) > 0  # the final 0 of a time grid is dropped


def test_generate_is_consistency_sampling_with_shared_noise():
    sched = FlowMatching()
    student = Denoiser(GaussianX0(sched, vector(1), s=0.5), sched, "x0").double()
    batch = make_batch(torch.zeros(3, *SHAPE, dtype=F64))
    times = step_times("dollar4", sched)
    out = student_sample(student, batch, make_ctx(3, role="student"))
    # by hand: x̂0_k at x_k, x_{k+1} = α·x̂0_k + σ·z_{k+1}, noise drawn as the student under fixed names
    as_student = make_ctx(3, role="student")
    noises = [as_student.randn(SHAPE, f"generator/{i}", dtype=F64) for i in range(4)]
    x = noises[0]
    for k, t in enumerate(times):
        if k:
            x = (1 - t) * x0 + t * noises[k]
        x0 = student.predict(x, t, batch.cond).x0
    torch.testing.assert_close(out.x0, x0)
    # another role (the fake score's update) regenerates the same sample
    again = student_sample(student, batch, make_ctx(3, role="fake_score"), role="student")
    torch.testing.assert_close(again.x0, out.x0)


def test_generate_last_keeps_only_the_last_call_in_the_graph():
    sched = FlowMatching()
    student = Denoiser(Shift(torch.zeros(SHAPE, dtype=F64)), sched, "x0")
    gen, batch, ctx = StudentGenerator(GeneratorConfig(times="dollar4")), make_batch(torch.zeros(2, *SHAPE, dtype=F64)), make_ctx(2)
    full = gen.sample(student, batch, ctx, backprop="all")
    last = gen.sample(student, batch, ctx, backprop="last")
    torch.testing.assert_close(full.x0, last.x0)
    (g_all,) = torch.autograd.grad(full.x0.sum(), student.backbone.b)
    (g_last,) = torch.autograd.grad(last.x0.sum(), student.backbone.b)
    # x̂0_k = x_k + b and x_k = α_k·x̂0_{k−1} + σ_k·z_k with α = 1 − t = 0.251, 0.501, 0.751 (2 samples)
    torch.testing.assert_close(g_last, torch.full(SHAPE, 2.0, dtype=F64))
    expected = 1 + 0.751 * (1 + 0.501 * (1 + 0.251))
    torch.testing.assert_close(g_all, torch.full(SHAPE, 2.0 * expected, dtype=F64))


# ---------------------------------------------------------------------------------------------
# VSD
# ---------------------------------------------------------------------------------------------

def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


def test_vsd_gradient_is_minus_the_score_difference_toward_the_real_mean():
    sched = FlowMatching(shift=3.0)
    mu_r, mu_f = vector(1), vector(2)
    teacher = Denoiser(GaussianX0(sched, mu_r), sched, "x0")
    fake = Denoiser(GaussianX0(sched, mu_f), sched, "x0")
    student = Denoiser(Shift(mu_f), sched, "x0")  # G(ε) = ε + μ_f ~ N(μ_f, I): the fake score is exact
    roles = {"student": FakeRole("student", student), "teacher": FakeRole("teacher", teacher, trainable=False),
             "fake_score": FakeRole("fake_score", fake)}
    objective = VSD(VSD.Config(real_cfg_scale=None), "vsd")
    b = 64
    batch, ctx = make_batch(torch.zeros(b, *SHAPE, dtype=F64)), make_ctx(b, times=[999])

    x_hat = student_sample(student, batch, ctx).x0.detach().requires_grad_(True)
    grad, t = objective.gradient(x_hat, batch, roles, ctx)
    # the scores at the x_t the objective used (same ctx draws)
    t_ref = ctx.times(Uniform(0.02, 0.98), "vsd/t")
    torch.testing.assert_close(t, t_ref)
    x_t = sched.add_noise(x_hat.detach(), ctx.randn(SHAPE, "vsd/eps", dtype=F64), t)
    s_real = teacher.predict(x_t, t, batch.cond).score
    s_fake = fake.predict(x_t, t, batch.cond).score
    assert bool((_cos(-grad, s_real - s_fake) > 0.999999).all())
    # … which for unit-variance Gaussians is the direction μ_r − μ_f: samples move from μ_f toward μ_r
    assert bool((_cos(-grad, (mu_r - mu_f).expand_as(grad)) > 0.999999).all())
    # the stop-gradient surrogate's gradient w.r.t. x̂ is grad / D (mean over dims)
    stop_gradient_mse(x_hat, grad).sum().backward()
    torch.testing.assert_close(x_hat.grad, grad / x_hat[0].numel())


def test_dmd_gradient_normalisation_and_zero_division():
    x_hat = torch.ones(2, 1, 1, 1, 2)
    real = torch.zeros_like(x_hat)
    real[1] = 1.0  # x̂ == x0_real → 0/0 → 0
    fake = torch.full_like(x_hat, 3.0)
    grad = dmd_gradient(x_hat, real, fake)
    torch.testing.assert_close(grad[0], torch.full((1, 1, 1, 2), 3.0))  # (3 − 0) / mean|1 − 0|
    assert bool((grad[1] == 0).all())


@pytest.mark.parametrize("cfg_scale, cond_value", [(None, 0.0), (2.0, 0.25)])
def test_vsd_sgd_moves_a_shift_student_to_the_guided_real_mean(cfg_scale, cond_value):
    """With the exact fake score of the current student, VSD drives G(ε) = ε + b to N(μ_r + w·c, I).

    CFG ``uncond + w·(cond − uncond)`` of two Gaussian posteriors with means μ and μ + c is the
    posterior of mean μ + w·c (our convention; DOLLAR's Eq. 9 form would give μ + (w + 1)·c).
    """
    sched = FlowMatching()
    mu_r = vector(3, scale=1.5)
    student = Denoiser(Shift(torch.zeros(SHAPE, dtype=F64)), sched, "x0")
    b_param = student.backbone.b
    fake = Denoiser(GaussianX0(sched, lambda: b_param.detach() - cond_value), sched, "x0")  # N(b, I) with the caption
    teacher = Denoiser(GaussianX0(sched, mu_r), sched, "x0")
    roles = {"student": FakeRole("student", student), "teacher": FakeRole("teacher", teacher, trainable=False),
             "fake_score": FakeRole("fake_score", fake)}
    objective = VSD(VSD.Config(real_cfg_scale=cfg_scale), "vsd")
    target = mu_r + (cfg_scale or 1.0) * cond_value
    start = float((b_param.detach() - target).norm())
    optim = torch.optim.SGD([b_param], lr=4.0)
    batch = make_batch(torch.zeros(32, *SHAPE, dtype=F64), cond_value=cond_value)
    for step in range(15):
        optim.zero_grad()
        out = objective(batch, roles, make_ctx(32, step=step, times=[999]))
        out.losses["vsd"].mean().backward()
        optim.step()
    assert float((b_param.detach() - target).norm()) < 0.01 * start


# ---------------------------------------------------------------------------------------------
# Fake-score loss
# ---------------------------------------------------------------------------------------------

def test_fake_score_loss_is_the_flow_loss_on_the_detached_student_sample():
    pipe, batch = tiny_setup(2)
    student = copy.deepcopy(pipe.denoiser).requires_grad_(True)
    fake = copy.deepcopy(pipe.denoiser).requires_grad_(True)
    roles = {"student": FakeRole("student", student), "fake_score": FakeRole("fake_score", fake)}
    objective = FakeScoreLoss(FakeScoreLoss.Config(), "fake")
    ctx = make_ctx(2, role="fake_score", times="dollar2")
    out = objective(batch, roles, ctx)
    assert out.role == "fake_score" and out.losses["mse"].shape == (2,)

    # by hand: x̂ = G(ε) with the student's noise, t ~ U[0.02, 0.98], flow target u = ε' − x̂
    with torch.no_grad():
        x_hat = student_sample(student, batch, make_ctx(2, role="student", times="dollar2")).x0
        t = ctx.times(Uniform(0.02, 0.98), "fake/t").float()
        eps = ctx.randn(tuple(x_hat.shape[1:]), "fake/eps")
        sigma = fake.schedule.sigma(t).view(-1, 1, 1, 1, 1)  # flow matching: α = 1 − σ
        x_t = (1 - sigma) * x_hat + sigma * eps
        expected = (fake(x_t, t, batch.cond) - (eps - x_hat)).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(out.losses["mse"].detach(), expected)

    out.losses["mse"].mean().backward()
    assert all(p.grad is None for p in student.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in fake.parameters())


def test_vsd_on_the_toy_backbone_updates_only_the_student():
    pipe, batch = tiny_setup(2)
    student = copy.deepcopy(pipe.denoiser).requires_grad_(True)
    teacher = copy.deepcopy(pipe.denoiser).requires_grad_(False)
    fake = copy.deepcopy(pipe.denoiser)
    with torch.no_grad():  # a fake score that differs from the teacher
        for p in fake.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    fake.requires_grad_(True)
    roles = {"student": FakeRole("student", student), "teacher": FakeRole("teacher", teacher, trainable=False),
             "fake_score": FakeRole("fake_score", fake)}
    objective = VSD(VSD.Config(), "vsd")  # dollar4, real CFG 4.5
    teacher.reset_nfe()
    out = objective(batch, roles, make_ctx(2))
    assert teacher.nfe == 2  # one CFG call
    loss = out.losses["vsd"]
    assert loss.shape == (2,) and bool(torch.isfinite(loss).all()) and float(loss.detach().min()) > 0
    loss.mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in fake.parameters())


def test_vsd_and_fake_score_are_listed_in_a_stage_by_kind():
    cfg = engine_config({"student": True, "teacher": False, "fake_score": True}, {
        "vsd": {"kind": "vsd", "real_cfg_scale": 4.5},
        "fake": {"kind": "fake_score"},
    }, generator={"times": [999, 499]})
    assert cfg.generator.times == [999, 499] and cfg.generator.sampler == "consistency"
    objectives = cfg.stages["main"].objectives
    assert objectives["vsd"].reads() == {"teacher", "fake_score"} and objectives["fake"].role == "fake_score"
    with pytest.raises(UserError, match="fake_score"):
        engine_config({"student": True, "teacher": False}, {"vsd": {"kind": "vsd"}})
    with pytest.raises(UserError, match="generator.times"):
        engine_config({"student": True, "teacher": False, "fake_score": True},
                      {"vsd": {"kind": "vsd"}}, generator={"times": "dollar5"})


def test_objectives_train_in_the_engine_with_pipeline_roles(teacher_dir, tmp_path):
    """vsd + cd + ddpo on the student, fake_score on its own role, listed by kind in a stage."""
    from fewstep.engine.distributed import DistEnv
    from fewstep.engine.trainer import Trainer
    from fewstep.recipes.base import recipe_class
    Finetune = recipe_class("finetune")

    times = [999, 499]
    base = {
        "model": str(teacher_dir),
        "train": {"steps": 2, "batch_size": 2, "eval_every": 0, "checkpoint_every": 0, "tensorboard": False},
        "roles": {"student": {"optim": {"lr": 1e-4}, "ema": 0.99}, "fake_score": {"optim": {"lr": 1e-4}},
                  "teacher": {}},
        "stages": {"distill": {"objectives": {
            "vsd": {"kind": "vsd"},
            "cd": {"kind": "cd", "weight": 0.5, "m": 5},
            "ddpo": {"kind": "ddpo", "weight": 0.1, "truncation": 1, "decoder": str(teacher_dir)},
            "fake": {"kind": "fake_score"},
        }}},
        "generator": {"times": times},
    }
    trainer = Trainer(Finetune(Finetune.load_config(None, [], base=base)), tmp_path / "run", DistEnv())
    for _ in range(2):
        record = trainer.train_step()
    for key in ("loss/student/vsd/vsd", "loss/student/cd/cd", "loss/student/ddpo/ddpo", "loss/fake_score/fake/mse"):
        assert np.isfinite(record[key]), key
    assert trainer.roles["student"].updates == 2 and trainer.roles["fake_score"].updates == 2


def test_objectives_name_the_roles_they_read_by_key():
    """Any role name may be declared; VSD reads its real and fake scores from the roles it names."""
    cfg = engine_config({"student": True, "real": False, "critic": True}, {
        "vsd": {"kind": "vsd", "teacher": "real", "fake_score": "critic"},
        "fake": {"kind": "fake_score", "role": "critic"},
    })
    assert cfg.stages["main"].objectives["vsd"].reads() == {"real", "critic"}
    with pytest.raises(UserError, match="uses role 'fake_score', which is not declared"):
        engine_config({"student": True, "real": False, "critic": True}, {"vsd": {"kind": "vsd", "teacher": "real"}})
    pipe, batch = tiny_setup(2)
    student, real, critic = (copy.deepcopy(pipe.denoiser) for _ in range(3))
    roles = {"student": FakeRole("student", student), "real": FakeRole("real", real, trainable=False),
             "critic": FakeRole("critic", critic)}
    out = VSD(cfg.stages["main"].objectives["vsd"], "vsd")(batch, roles, make_ctx(2))
    assert out.losses["vsd"].shape == (2,) and bool(torch.isfinite(out.losses["vsd"]).all())
