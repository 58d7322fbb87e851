"""``fewstep distill``: resolve the recipe and its config, check the run directory, train.

Fresh run:  recipe defaults (``<recipe>.yaml``) ← ``--config FILE`` ← ``--set key=value`` …
Resume:     the run's saved ``config.yaml`` ← ``--config`` ← ``--set`` (e.g. a larger
            ``train.steps``), continuing from the run's latest complete checkpoint.

Everything that can be refused is checked before anything is written: the config, the recipe
of the run being resumed, the output directory, what the evaluator needs of the model
(:func:`check_evaluator`), the checkpoint's integrity (in the trainer, before it creates or touches
``--out``).
"""

from __future__ import annotations

from pathlib import Path

from ..config import dump_config, load_yaml
from ..engine.rundir import check_out, check_resume
from ..errors import UserError
from ..models.family import model_family
from .base import PipelineRecipe, recipe_class


def distill(recipe: str | None, config: Path | None = None, overrides: list[str] | tuple[str, ...] = (),
            out: Path | None = None, resume: Path | None = None, dry_run: bool = False,
            overwrite: bool = False) -> str:
    """Run the command; returns the resolved config YAML (what ``--dry-run`` prints)."""
    checkpoint = None
    if resume is not None:
        name, checkpoint = check_resume(Path(resume), recipe)
        cls = recipe_class(name)
        cfg = cls.load_config(config, overrides, base=load_yaml(Path(resume) / "config.yaml"))
    else:
        if recipe is None:
            raise UserError("give --recipe NAME (or --resume RUN to continue a run)")
        cls = recipe_class(recipe)
        cfg = cls.load_config(config, overrides)
    text = dump_config(cfg)
    if dry_run:
        return text
    if out is None:
        if resume is None:
            raise UserError("give --out RUN, the run directory to write")
        out = resume
    out = Path(out)
    resuming_here = resume is not None and out.resolve() == Path(resume).resolve()
    check_out(out, overwrite, resuming_here)
    plan = cls(cfg)
    check_evaluator(plan)

    from ..engine.trainer import train

    train(plan, out, resume_from=checkpoint, config_yaml=text, overwrite=overwrite, resuming_here=resuming_here)
    return text


def check_evaluator(plan) -> None:
    """What the run's evaluator needs of the model (:meth:`EvaluatorConfig.check`), refused before anything
    is written (the trainer builds the evaluator after it has created the run directory). Only for a run
    that evaluates (``train.eval_every`` and a student role). The model is not loaded here: its family's
    class says its prompt grammar (loading it now would move the RNG draws of the run's initialisation)."""
    cfg = plan.config
    if cfg.train.eval_every and "student" in cfg.roles and isinstance(plan, PipelineRecipe):
        grammar = getattr(model_family(cfg.model).model, "prompt_grammar", None)
        cfg.evaluator.check(grammar, "teacher" in cfg.roles)
