"""Periodic evaluation of the (EMA) student, with the sample-based health checks.

Every ``train.eval_every`` steps rank 0 samples the student — loaded into a plain copy of the
recipe's pipeline (:meth:`Recipe.student_pipeline`) — on the first ``train.eval_prompts`` of
``toyworld.EVAL_PROMPTS``, ``train.eval_samples`` samples each with the fixed seeds of
``toyworld.eval_suite``, once per sampler step count in ``train.eval_steps``. The clips are
scored with the toy VBench analysers (``score_clips`` + ``aggregate``), checked against
reference videos of the same prompts (diversity, static, constant; see
:mod:`fewstep.engine.health`), logged, and written to ``RUN/evals/step_XXXXXX.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..data.toyworld import EVAL_PROMPTS, eval_suite
from ..eval.analysers import aggregate, score_clips
from .health import HealthIssue, HealthMonitor

#: ``(prompt, seeds) -> (n, T, H, W, 3) uint8`` videos the student's samples are compared with.
ReferenceFn = Callable[[str, list[int]], np.ndarray]


class Evaluator:
    def __init__(self, config, monitor: HealthMonitor, reference: ReferenceFn, run_dir: Path):
        self.config = config  # TrainConfig
        self.monitor = monitor
        self.reference = reference
        self.run_dir = Path(run_dir)
        self.suite = [(p, s) for p, s in eval_suite(config.eval_samples) if p in EVAL_PROMPTS[:config.eval_prompts]]
        self._references: dict[str, np.ndarray] = {}

    def _reference(self, prompt: str, seeds: list[int]) -> np.ndarray:
        if prompt not in self._references:
            self._references[prompt] = self.reference(prompt, seeds)
        return self._references[prompt]

    @torch.no_grad()
    def __call__(self, pipe, step: int, logger) -> tuple[dict, list[HealthIssue]]:
        prompts = [p for p, _ in self.suite]
        seeds = [s for _, s in self.suite]
        # one noise tensor per suite seed, so samples do not depend on the batch they are in
        shape = pipe.latent_shape(1)[1:]
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s & (2**63 - 1)))
                             for s in seeds])  # (N, C, T, H, W)
        report, issues, record = {"step": step, "results": {}}, [], {}
        for n_steps in self.config.eval_steps:
            videos, _ = pipe.generate(prompts, steps=n_steps, noise=noise)  # (N, T, H, W, 3) uint8
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
            report["results"][str(n_steps)] = {"scores": scores, "prompts": per_prompt}
            record.update({f"eval/{n_steps}step/{k}": v for k, v in scores.items()})
        report["health"] = [str(i) for i in issues]
        out = self.run_dir / "evals" / f"step_{step:06d}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
        return record, issues
