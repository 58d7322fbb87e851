"""Prediction-type conversions: round trips, DOLLAR Eq. 8, score, CFG."""

import itertools

import pytest
import torch

from fewstep.diffusion.parameterization import PREDICTION_TYPES, Prediction, from_x0_eps
from fewstep.diffusion.schedules import FlowMatching, VPDiscrete

SCHEDULES = {"flow": FlowMatching(shift=3.0), "vp": VPDiscrete(zero_terminal_snr=False)}


def _sample(schedule, t):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 2, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.as_tensor(t, dtype=torch.float64)
    alpha, sigma = schedule.coefficients(t, x0)
    return x0, eps, alpha * x0 + sigma * eps, alpha, sigma


@pytest.mark.parametrize("schedule", SCHEDULES.values(), ids=SCHEDULES.keys())
@pytest.mark.parametrize("src,dst", list(itertools.product(PREDICTION_TYPES, PREDICTION_TYPES)))
def test_round_trip_every_pair(schedule, src, dst):
    x0, eps, x_t, alpha, sigma = _sample(schedule, [0.05, 0.3, 0.6, 0.95])
    out_src = from_x0_eps(src, x0, eps, alpha, sigma)
    pred = Prediction.from_output(src, out_src, x_t, alpha, sigma)
    torch.testing.assert_close(pred.x0, x0)
    torch.testing.assert_close(pred.eps, eps)
    out_dst = pred.to(dst)
    torch.testing.assert_close(out_dst, from_x0_eps(dst, x0, eps, alpha, sigma))
    back = Prediction.from_output(dst, out_dst, x_t, alpha, sigma).to(src)
    torch.testing.assert_close(back, out_src)


@pytest.mark.parametrize("schedule", SCHEDULES.values(), ids=SCHEDULES.keys())
def test_conjugate_is_dollar_eq_8(schedule):
    x0, eps, x_t, alpha, sigma = _sample(schedule, [0.1, 0.4, 0.7, 1.0])
    v = x0 - eps  # DOLLAR Eq. 4 target
    # Eq. 8 (VP: sqrt(abar) = alpha, sqrt(1 - abar) = sigma)
    eq8 = (x_t + sigma * v) / (alpha + sigma)
    torch.testing.assert_close(Prediction.from_output("conjugate", v, x_t, alpha, sigma).x0, eq8)
    torch.testing.assert_close(eq8, x0)


def test_vp_v_prediction_matches_salimans_ho():
    sched = SCHEDULES["vp"]
    x0, eps, x_t, alpha, sigma = _sample(sched, [0.2, 0.5, 0.8, 0.9])
    v = alpha * eps - sigma * x0
    pred = Prediction.from_output("v", v, x_t, alpha, sigma)
    torch.testing.assert_close(pred.x0, alpha * x_t - sigma * v)  # VP closed form
    torch.testing.assert_close(pred.eps, sigma * x_t + alpha * v)


def test_flow_velocity_ends_are_well_defined():
    sched = FlowMatching()
    x0, eps, x_t, alpha, sigma = _sample(sched, [1.0, 1.0, 0.0, 0.0])
    pred = Prediction.from_output("flow", eps - x0, x_t, alpha, sigma)
    torch.testing.assert_close(pred.x0, x0)
    torch.testing.assert_close(pred.eps, eps)


@pytest.mark.parametrize("schedule", SCHEDULES.values(), ids=SCHEDULES.keys())
def test_score_formula(schedule):
    x0, eps, x_t, alpha, sigma = _sample(schedule, [0.2, 0.4, 0.6, 0.8])
    pred = Prediction.from_output("eps", eps, x_t, alpha, sigma)
    torch.testing.assert_close(pred.score, -(x_t - alpha * x0) / sigma**2)
    torch.testing.assert_close(pred.score, -eps / sigma)


@pytest.mark.parametrize("kind", PREDICTION_TYPES)
def test_cfg_in_any_parameterisation_agrees(kind):
    sched = SCHEDULES["flow"]
    x0c, epsc, x_t, alpha, sigma = _sample(sched, [0.2, 0.4, 0.6, 0.8])
    # an unconditional prediction consistent with the same x_t
    x0u = x0c + 0.3
    epsu = (x_t - alpha * x0u) / sigma
    cond = Prediction(x_t, alpha, sigma, x0c, epsc)
    uncond = Prediction(x_t, alpha, sigma, x0u, epsu)
    w = 4.5
    guided = cond.guided(uncond, w)
    raw = uncond.to(kind) + w * (cond.to(kind) - uncond.to(kind))
    torch.testing.assert_close(guided.to(kind), raw)
    torch.testing.assert_close(cond.guided(uncond, 1.0).x0, cond.x0)
