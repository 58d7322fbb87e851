"""Periodic evaluation of the (EMA) student: the generic driver.

Every ``train.eval_every`` steps rank 0 loads the student's weights into a plain copy of the
recipe's model (:meth:`Plan.student_pipeline`) and calls the run's :class:`Evaluator` — built by
the recipe from its ``evaluator:`` config (:mod:`fewstep.recipes.evaluators`) and handed to the
engine, which knows no benchmark. The evaluator samples, scores, checks sample health (against
reference videos of its choosing, :meth:`~fewstep.engine.health.HealthMonitor.check_samples`) and
logs videos; the driver writes its report to ``RUN/evals/step_XXXXXX.json``::

    {"step": N, **report, "health": ["HEALTH: …", …]}

and the trainer logs its record and reports its health issues.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .health import HealthIssue


@dataclass
class EvalResult:
    record: dict[str, float]  # scalars logged to metrics.jsonl ("eval/…")
    issues: list[HealthIssue] = field(default_factory=list)  # sample health
    report: dict[str, Any] = field(default_factory=dict)  # JSON written to RUN/evals/step_XXXXXX.json


class Evaluator(Protocol):
    def __call__(self, model, step: int, logger) -> EvalResult: ...  # model: a VideoModel with the student's weights


def run_evaluation(evaluator: Evaluator, model, step: int, logger, run_dir: Path) -> EvalResult:
    """Evaluate ``model`` at ``step`` and write ``RUN/evals/step_XXXXXX.json`` (rank 0)."""
    result = evaluator(model, step, logger)
    report = {"step": step, **result.report, "health": [str(i) for i in result.issues]}
    out = Path(run_dir) / "evals" / f"step_{step:06d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    return result
