"""Periodic evaluators by config: a recipe's ``evaluator:`` block names one, the recipe builds it and
hands it to the engine (:class:`~fewstep.engine.evaluation.Evaluator`; the engine imports none).

``evaluator: {kind: toy_vbench}`` (the default) — every ``train.eval_every`` steps, the student
samples the first ``train.eval_prompts`` of ``toyworld.EVAL_PROMPTS``, ``train.eval_samples``
samples each with the fixed seeds of ``toyworld.eval_suite``: with the student's own sampler
(the run's ``generator:``, as exported) unless ``train.eval_steps`` lists step counts, one
evaluation per count on the model's default grid. The clips are scored with the toy VBench analysers (``score_clips`` +
``aggregate``), checked against reference videos of the same prompts and seeds (diversity,
static, constant; :mod:`fewstep.engine.health`) — the teacher's own samples when the recipe has
a teacher, else toy-world clips — and logged.

A new evaluator is a config class with ``kind``, ``build(...)`` and ``example_prompt()``,
registered with :func:`register_evaluator`.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import numpy as np
import torch

from ..config import KindRegistry, StrictModel
from ..data.toyworld import EVAL_PROMPTS, eval_suite, render_clip
from ..engine.config import TrainConfig
from ..engine.evaluation import EvalResult, Evaluator
from ..engine.health import HealthMonitor
from ..eval.analysers import aggregate, score_clips
from ..models.family import VideoModel

#: ``(prompt, seeds) -> (n, T, H, W, 3) uint8`` videos the student's samples are compared with.
ReferenceFn = Callable[[str, list[int]], np.ndarray]


class EvaluatorConfig(StrictModel):
    """Base of an evaluator's config: ``kind`` is its registered name."""

    kind: str

    def build(self, train: TrainConfig, monitor: HealthMonitor, model: VideoModel,
              teacher: VideoModel | None) -> Evaluator:
        """``model``: the recipe's model (its geometry); ``teacher``: the reference sampler, if any."""
        raise NotImplementedError

    def example_prompt(self) -> str:
        """A prompt to show in commands the run prints (``fewstep generate --prompt …``)."""
        raise NotImplementedError


EVALUATORS = KindRegistry("evaluator")
register_evaluator = EVALUATORS.register
#: A recipe's ``evaluator:`` when it gives none.
DEFAULT_EVALUATOR = {"kind": "toy_vbench"}


def parse_evaluator_config(raw: Any, key: str = "evaluator") -> EvaluatorConfig:
    """An ``evaluator:`` value → its kind's config; one-line errors naming the key."""
    return raw if isinstance(raw, EvaluatorConfig) else EVALUATORS.parse(raw, key)


def seeded_noise(model: VideoModel, seeds: list[int]) -> torch.Tensor:
    """``(N, C, T', H', W')``: one noise tensor per seed, so a sample does not depend on its batch."""
    shape = model.latent_shape(1)[1:]
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s & (2**63 - 1)))
                        for s in seeds])


# ---------------------------------------------------------------------------------------------
# toy_vbench
# ---------------------------------------------------------------------------------------------

@register_evaluator
class ToyVBenchConfig(EvaluatorConfig):
    """Toy VBench on the eval prompts, with sample health checks (module doc); its counts are the
    ``train.eval_*`` keys."""

    kind: Literal["toy_vbench"] = "toy_vbench"

    def build(self, train: TrainConfig, monitor: HealthMonitor, model: VideoModel,
              teacher: VideoModel | None) -> Evaluator:
        if teacher is not None:
            reference = teacher_reference(teacher)
        else:
            frames, height, _ = model.geometry
            reference = toy_world_reference(frames, height)
        return ToyVBench(train, monitor, reference)

    def example_prompt(self) -> str:
        return EVAL_PROMPTS[0]


def teacher_reference(teacher: VideoModel) -> ReferenceFn:
    """The teacher's own default sampler on the eval seeds."""
    def reference(prompt: str, seeds: list[int]) -> np.ndarray:
        videos, _ = teacher.generate([prompt] * len(seeds), noise=seeded_noise(teacher, seeds))
        return videos
    return reference


def toy_world_reference(frames: int, size: int) -> ReferenceFn:
    """Toy-world clips of the prompt with the eval seeds."""
    def reference(prompt: str, seeds: list[int]) -> np.ndarray:
        return np.stack([render_clip(prompt, seed, frames, size)[0] for seed in seeds])
    return reference


class ToyVBench:
    def __init__(self, train: TrainConfig, monitor: HealthMonitor, reference: ReferenceFn):
        self.steps = list(train.eval_steps) if train.eval_steps else [None]  # None: the model's own sampler
        self.monitor = monitor
        self.reference = reference
        self.suite = [(p, s) for p, s in eval_suite(train.eval_samples) if p in EVAL_PROMPTS[:train.eval_prompts]]
        self._references: dict[str, np.ndarray] = {}

    def _reference(self, prompt: str, seeds: list[int]) -> np.ndarray:
        if prompt not in self._references:
            self._references[prompt] = self.reference(prompt, seeds)
        return self._references[prompt]

    @torch.no_grad()
    def __call__(self, model: VideoModel, step: int, logger) -> EvalResult:
        prompts = [p for p, _ in self.suite]
        seeds = [s for _, s in self.suite]
        noise = seeded_noise(model, seeds)  # (N, C, T, H, W)
        results, issues, record = {}, [], {}
        for steps in self.steps:
            n_steps = model.default_steps() if steps is None else steps
            videos, _ = model.generate(prompts, steps=steps, noise=noise)  # (N, T, H, W, 3) uint8
            scores = score_clips(videos, prompts)
            scores.update(aggregate(scores))
            per_prompt = {}
            for prompt in dict.fromkeys(prompts):
                idx = [i for i, p in enumerate(prompts) if p == prompt]
                found, stats = self.monitor.check_samples(prompt, videos[idx], self._reference(
                    prompt, [seeds[i] for i in idx]), label=f"{n_steps}-step samples of ")
                issues += found
                per_prompt[prompt] = stats
                logger.frames(f"samples_{n_steps}step/{prompt}", videos[idx], step)
            scores["diversity"] = float(np.mean([s["diversity"] for s in per_prompt.values()]))
            results[str(n_steps)] = {"scores": scores, "prompts": per_prompt}
            record.update({f"eval/{n_steps}step/{k}": v for k, v in scores.items()})
        return EvalResult(record, issues, {"results": results})
