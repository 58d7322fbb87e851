"""Training health: detectors for the ways distillation runs fail, and a monitor that runs them.

Few-step distillation fails in recognisable ways (DOLLAR Tab. 3's VSD mode collapse, GAN
oscillation, divergence). Each detector is a pure function with its threshold in
:class:`HealthConfig`; the :class:`HealthMonitor` feeds them the losses seen since the start and
the samples of each periodic evaluation and returns :class:`HealthIssue` s, which the trainer
prints and logs as ``HEALTH: …`` lines (and which stop the run under ``train.stop_on_collapse``).

Loss trend (on the per-step losses of each role and term):

* **exploding** — a non-finite value among the recent ones, or ``mean|recent| > factor · mean|early|``
  (early = the first ``window`` values, recent = the last ``window``);
* **oscillating** — over the last ``window`` values, the successive differences flip sign at
  least ``flip_rate`` of the time *and* their mean size is at least ``amplitude`` × the mean
  |loss|. (I.i.d. noise flips 2/3 of the time, so the default 0.9 needs a real alternation.)

Samples (``(n, T, H, W, 3)`` videos of one prompt, uint8 or float in [−1, 1]), each compared with
the same statistic of reference videos (the evaluator's: e.g. the teacher's samples):

* **low diversity** — centred Vendi (:func:`fewstep.eval.diversity.video_vendi`) ``V`` with
  ``V − 1 < min_diversity_fraction · (V_ref − 1)``. Vendi is 1 for identical samples, so
  ``V − 1`` (distinct samples beyond the first) is what a fraction can be taken of;
* **static** — mean |frame_{t+1} − frame_t| below ``static_fraction`` × the reference's;
* **constant** — mean spatial std of the frames below ``constant_fraction`` × the reference's.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
from pydantic import Field

from ..config import StrictModel
from ..eval.diversity import video_vendi


class HealthConfig(StrictModel):
    min_diversity_fraction: float = Field(0.5, ge=0, description="flag Vendi − 1 below this × the reference's")
    static_fraction: float = Field(0.1, ge=0, description="flag temporal change below this × the reference's")
    constant_fraction: float = Field(0.1, ge=0, description="flag spatial variation below this × the reference's")
    window: int = Field(32, ge=4, description="loss values per trend window")
    explosion_factor: float = Field(10.0, gt=1)
    oscillation_flip_rate: float = Field(0.9, gt=0, le=1)
    oscillation_amplitude: float = Field(0.5, gt=0)


@dataclass(frozen=True)
class HealthIssue:
    kind: str  # exploding | oscillating | low_diversity | static | constant
    subject: str  # the loss key or the prompt
    message: str

    def __str__(self) -> str:
        return f"HEALTH: {self.message}"


# ---------------------------------------------------------------------------------------------
# Detectors (pure functions)
# ---------------------------------------------------------------------------------------------

def loss_exploding(early: list[float], recent: list[float], factor: float) -> str | None:
    """Why the loss exploded, or None."""
    if any(not math.isfinite(v) for v in recent):
        return "non-finite values"
    early = [abs(v) for v in early if math.isfinite(v)]
    if not early or not recent:
        return None
    e, r = float(np.mean(early)), float(np.mean(np.abs(recent)))
    if r > factor * max(e, 1e-12):
        return f"recent mean {r:.3g} > {factor:g} × early mean {e:.3g}"
    return None


def loss_oscillating(values: list[float], flip_rate: float, amplitude: float) -> str | None:
    """Why the loss oscillates, or None (needs at least 4 finite values)."""
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=np.float64)
    if len(v) < 4:
        return None
    d = np.diff(v)
    flips = float(np.mean(np.sign(d[1:]) * np.sign(d[:-1]) < 0))
    size = float(np.mean(np.abs(d))) / max(float(np.mean(np.abs(v))), 1e-12)
    if flips >= flip_rate and size >= amplitude:
        return f"{flips:.0%} sign flips of successive differences, amplitude {size:.2f} × its mean"
    return None


def _unit(videos) -> np.ndarray:
    """uint8 or [−1, 1] float videos → float64 in [0, 1]."""
    v = np.asarray(videos)
    return v.astype(np.float64) / 255.0 if v.dtype == np.uint8 else (np.clip(v.astype(np.float64), -1, 1) + 1) / 2


def temporal_change(videos) -> float:
    """Mean |frame_{t+1} − frame_t| over ``(n, T, H, W, 3)`` videos, in [0, 1] units."""
    v = _unit(videos)
    return float(np.abs(np.diff(v, axis=1)).mean()) if v.shape[1] > 1 else 0.0


def spatial_variation(videos) -> float:
    """Mean over frames of the spatial std (per channel), in [0, 1] units."""
    v = _unit(videos)  # (n, T, H, W, 3)
    return float(v.std(axis=(2, 3)).mean())


def diversity(videos) -> float:
    """Centred keyframe Vendi of ``(n, T, H, W, 3)`` samples of one prompt (1 = all identical)."""
    return video_vendi(videos, keyframes=min(4, np.asarray(videos).shape[1]), center=True)


def below(value: float, reference: float, fraction: float) -> bool:
    return reference > 0 and value < fraction * reference


# ---------------------------------------------------------------------------------------------
# Monitor
# ---------------------------------------------------------------------------------------------

class HealthMonitor:
    """Keeps the loss history the trend detectors need; checks samples against a reference."""

    def __init__(self, config: HealthConfig):
        self.config = config
        self.early: dict[str, list[float]] = {}
        self.recent: dict[str, deque] = {}

    def observe(self, losses: dict[str, float]) -> None:
        """Record one step's losses (``{key: value}``)."""
        for key, value in losses.items():
            early = self.early.setdefault(key, [])
            if len(early) < self.config.window:
                early.append(value)
            self.recent.setdefault(key, deque(maxlen=self.config.window)).append(value)

    def restart_losses(self) -> None:
        """Forget the loss history: a new stage changes which objectives a role's loss sums, so its trend
        starts afresh (the stage's first ``window`` values become the new early ones)."""
        self.early.clear()
        self.recent.clear()

    def check_losses(self) -> list[HealthIssue]:
        cfg, issues = self.config, []
        for key, recent in self.recent.items():
            if len(recent) < cfg.window:
                continue
            why = loss_exploding(self.early[key], list(recent), cfg.explosion_factor)
            if why:
                issues.append(HealthIssue("exploding", key, f"{key} is exploding ({why})"))
                continue
            why = loss_oscillating(list(recent), cfg.oscillation_flip_rate, cfg.oscillation_amplitude)
            if why:
                issues.append(HealthIssue("oscillating", key, f"{key} is oscillating ({why})"))
        return issues

    def check_samples(self, prompt: str, videos, reference, label: str = "") -> tuple[list[HealthIssue], dict]:
        """Issues of one prompt's samples vs reference videos, and the statistics measured."""
        cfg, where = self.config, f"{label}'{prompt}'"
        stats = {"diversity": diversity(videos), "reference_diversity": diversity(reference),
                 "temporal_change": temporal_change(videos), "reference_temporal_change": temporal_change(reference),
                 "spatial_variation": spatial_variation(videos),
                 "reference_spatial_variation": spatial_variation(reference)}
        issues = []
        if below(stats["diversity"] - 1, stats["reference_diversity"] - 1, cfg.min_diversity_fraction):
            issues.append(HealthIssue("low_diversity", prompt, (
                f"diversity collapsed for {where}: Vendi {stats['diversity']:.2f} vs reference "
                f"{stats['reference_diversity']:.2f} (V − 1 below {cfg.min_diversity_fraction:g} × the reference's)")))
        if below(stats["temporal_change"], stats["reference_temporal_change"], cfg.static_fraction):
            issues.append(HealthIssue("static", prompt, (
                f"outputs are static for {where}: temporal change {stats['temporal_change']:.4f} < "
                f"{cfg.static_fraction:g} × reference {stats['reference_temporal_change']:.4f}")))
        if below(stats["spatial_variation"], stats["reference_spatial_variation"], cfg.constant_fraction):
            issues.append(HealthIssue("constant", prompt, (
                f"outputs are constant for {where}: spatial variation {stats['spatial_variation']:.4f} < "
                f"{cfg.constant_fraction:g} × reference {stats['reference_spatial_variation']:.4f}")))
        return issues, stats

    # -- checkpointing (JSON) --------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"early": self.early, "recent": {k: list(v) for k, v in self.recent.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.early = {k: list(v) for k, v in state.get("early", {}).items()}
        self.recent = {k: deque(v, maxlen=self.config.window) for k, v in state.get("recent", {}).items()}
