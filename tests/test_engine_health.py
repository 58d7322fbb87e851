"""Training health: each detector on synthetic signals, and a collapsing run flagged (and stopped)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fewstep.engine.health import (HealthConfig, HealthMonitor, diversity, loss_exploding, loss_oscillating,
                                   spatial_variation, temporal_change)
from fewstep.models.pipeline import VideoPipeline
from helpers import cli, sets, tiny_pipeline_config

RNG = np.random.default_rng(0)


def moving_squares(n=4, T=8, size=16) -> np.ndarray:
    """``n`` clips of a bright square moving right from different starts: (n, T, H, W, 3) uint8."""
    videos = np.full((n, T, size, size, 3), 30, dtype=np.uint8)
    for i in range(n):
        y = 2 + 3 * i
        for t in range(T):
            videos[i, t, y:y + 4, t:t + 4] = 220
    return videos


def test_oscillating_loss():
    t = np.arange(64)
    alternating = list(1.0 + 0.8 * (-1.0) ** t)
    noisy = list(1.0 + 0.05 * RNG.standard_normal(64))
    decaying = list(np.exp(-t / 20) + 0.01 * RNG.standard_normal(64))
    assert loss_oscillating(alternating, 0.9, 0.5)
    assert loss_oscillating(noisy, 0.9, 0.5) is None
    assert loss_oscillating(decaying, 0.9, 0.5) is None


def test_exploding_loss():
    early = [1.0] * 32
    assert "non-finite" in loss_exploding(early, [1.0] * 31 + [float("inf")], 10)
    assert "recent mean" in loss_exploding(early, [50.0] * 32, 10)
    assert loss_exploding(early, [2.0] * 32, 10) is None
    assert loss_exploding([-1.0] * 32, [-3.0] * 32, 10) is None  # sign-agnostic (GAN losses)


def test_static_constant_and_diversity_detectors():
    good = moving_squares()
    static = np.repeat(good[:, :1], good.shape[1], axis=1)  # first frame held
    constant = np.full_like(good, 90)
    collapsed = np.repeat(good[:1], len(good), axis=0)  # one sample repeated
    assert temporal_change(static) == 0 < temporal_change(good)
    assert spatial_variation(constant) < 1e-12 < spatial_variation(good)
    assert diversity(collapsed) == pytest.approx(1.0) and diversity(good) > 2

    monitor = HealthMonitor(HealthConfig())
    assert monitor.check_samples("p", good, good)[0] == []
    kinds = {i.kind for i in monitor.check_samples("p", static, good)[0]}
    assert "static" in kinds and "constant" not in kinds
    assert {i.kind for i in monitor.check_samples("p", constant, good)[0]} == {"static", "constant", "low_diversity"}
    issues, stats = monitor.check_samples("p", collapsed, good)
    assert [i.kind for i in issues] == ["low_diversity"] and stats["diversity"] == pytest.approx(1.0)
    assert str(issues[0]).startswith("HEALTH: diversity collapsed for 'p'")


def test_monitor_trend_and_state_round_trip():
    cfg = HealthConfig(window=8)
    monitor = HealthMonitor(cfg)
    for i in range(20):
        monitor.observe({"loss/student": 1.0 if i < 10 else 100.0, "loss/disc": 1.0 + 0.9 * (-1) ** i})
    kinds = {(i.kind, i.subject) for i in monitor.check_losses()}
    assert kinds == {("exploding", "loss/student"), ("oscillating", "loss/disc")}
    again = HealthMonitor(cfg)
    again.load_state_dict(json.loads(json.dumps(monitor.state_dict())))
    assert again.check_losses() == monitor.check_losses()


def collapsed_model(path):
    """A student whose output ignores its input: x0-prediction, final layer = constant bias."""
    torch.manual_seed(0)
    pipe = VideoPipeline(tiny_pipeline_config(steps=4).model_copy(update={"prediction_type": "x0"}))
    final = pipe.denoiser.backbone.module.final_layer.linear
    with torch.no_grad():
        final.weight.zero_()
        final.bias.copy_(torch.linspace(-1, 1, final.bias.numel()))
    pipe.save(path)
    return path


def test_collapsing_run_is_flagged_and_stopped(tmp_path, capsys):
    model = collapsed_model(tmp_path / "collapsed")
    extra = ["train.steps=4", "train.eval_every=2", "roles.student.optim.lr=1e-8", "roles.student.ema=null"]
    rc, out, err = cli(capsys, "distill", "--recipe", "finetune", "--out", tmp_path / "run", *sets(model, *extra))
    assert rc == 0, err
    assert "HEALTH: diversity collapsed for 2-step samples of 'a red circle moves left'" in out
    assert "step 3/4 [finetune] loss/student=" in out and "| HEALTH: low_diversity" in out  # the progress line
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["step"] == 2 and "diversity collapsed" in " ".join(r.get("health", [])) for r in records)
    report = json.loads((tmp_path / "run" / "evals" / "step_000002.json").read_text())
    assert any("diversity collapsed" in h for h in report["health"])
    assert report["results"]["2"]["prompts"]["a red circle moves left"]["diversity"] < 1.01

    rc, out, err = cli(capsys, "distill", "--recipe", "finetune", "--out", tmp_path / "stop",
                       *sets(model, *extra, "train.stop_on_collapse=true"))
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("error: training stopped at step 2 because train.stop_on_collapse is set: HEALTH: ")
    assert (tmp_path / "stop" / "checkpoints" / "step_000002").is_dir()  # the state at the stop is kept
