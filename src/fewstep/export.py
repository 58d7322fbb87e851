"""``fewstep export RUN --out DIR``: a distilled student as a diffusers pipeline directory.

The export is the teacher's pipeline (its tokenizer, text encoder and VAE, as loaded from the
run's ``model`` directory) with the student's transformer — the EMA weights of the run's latest
checkpoint, LoRA adapters merged (``W + (α/r)·B A``, :mod:`fewstep.engine.lora`) — and a
``FlowMatchEulerDiscreteScheduler`` whose stock ``set_timesteps(N)`` visits the student's
σ-grid, so that ``WanPipeline.from_pretrained(DIR)(prompt, num_inference_steps=N,
guidance_scale=1)`` samples as ``fewstep generate --model RUN/student``:

* an ``euler`` student: ``x ← x + (σ_{i+1} − σ_i)·v``, the scheduler's deterministic step;
* a ``consistency`` student: ``x ← (1 − σ_{i+1})·x̂0 + σ_{i+1}·z`` with fresh noise ``z``, the
  scheduler's ``stochastic_sampling`` step. diffusers' pipelines draw ``z`` from torch's global
  generator: ``torch.manual_seed(s)`` before the call reproduces ``fewstep generate --seed s``.

**Which grids a stock scheduler expresses.** ``set_timesteps(N)`` (fixed shift ``s'``, optional
``shift_terminal`` τ) gives ``σ_i = 1 − k·(1 − M_{s'}(u_i))`` with ``u_i`` linear from 1 to
``M_{s'}(1/1000)``, ``M_s(u) = s·u / (1 + (s − 1)·u)``, and ``k`` chosen so that ``σ_{N−1} = τ``.
``s'`` is free (the transformer is given ``1000·σ``, whatever shift produced σ), so export solves
for ``(s', τ)``: τ is the student's last non-zero σ and ``s'`` is found by a 1-D search. Every grid
that is uniform in the teacher's pre-shift time and starts at t = 1 (DOLLAR's ``dollar4`` on a flow
teacher: t = 1, 0.75, 0.5, 0.25; the ``uniform`` spacing) is reproduced exactly; any other grid
(AccVideo's key times, for instance) is exported with the nearest such grid, and ``export.json``
and the command's output say how far it is (max |Δσ|). We export rather than refuse: the nearest
grid is what a diffusers user can run; ``fewstep generate --model RUN/student`` keeps the exact one.

``--lora-only`` writes the student's adapters alone, in the format ``load_lora_weights`` reads
(``B`` pre-scaled by α/r), for a run whose student is a LoRA role.

``export.json`` records the call (steps, guidance scale, sampler), the grids and the source
checkpoint. Checkpoints of single-process and FSDP2 runs are the same files (full state dicts,
:mod:`fewstep.engine.distributed`), so both export alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from .engine.checkpoint import latest_checkpoint, read_checkpoint
from .engine.lora import diffusers_lora_layers
from .errors import UserError
from .utils.io import atomic_directory

EXACT = 1e-5  # max |Δσ| below which the stock grid is the student's (float32 round-off is ~1e-7)


def stock_sigmas(steps: int, shift: float, terminal: float | None) -> np.ndarray:
    """σ of ``FlowMatchEulerDiscreteScheduler(shift, shift_terminal).set_timesteps(steps)`` (without the 0)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift, shift_terminal=terminal)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas[:-1].double().numpy()


def fit_flow_scheduler(sigmas: np.ndarray) -> tuple[dict[str, Any], float]:
    """``({shift, shift_terminal}, max |Δσ|)`` of the stock grid nearest to ``sigmas`` (decreasing,
    without the final 0). τ = the last σ; ``s'`` minimises the largest difference (bounded search)."""
    from scipy.optimize import minimize_scalar

    n = len(sigmas)
    terminal = float(sigmas[-1]) if n > 1 else None
    if n > 1 and not terminal < 1:
        raise UserError("the student's grid has σ = 1 after its first step; no flow scheduler visits it")

    def gap(log_shift: float) -> float:
        return float(np.abs(stock_sigmas(n, float(np.exp(log_shift)), terminal) - sigmas).max())

    if n <= 2:  # σ_0 = 1 and τ fix the grid; the shift does not matter
        shift = 1.0
    else:
        best = minimize_scalar(gap, bounds=(np.log(1e-3), np.log(1e3)), method="bounded",
                               options={"xatol": 1e-12, "maxiter": 500})
        shift = float(np.exp(best.x))
    return {"shift": shift, "shift_terminal": terminal}, gap(np.log(shift))


def _student_from_checkpoint(run: Path):
    """(recipe, model with the student's weights, checkpoint path, student role weights, lora config)."""
    from .recipes.base import recipe_class

    if not run.is_dir():
        raise UserError(f"run {run} does not exist")
    where = latest_checkpoint(run)
    if where is None:
        raise UserError(f"run {run} has no checkpoint to export (train it first, or point at the run directory "
                        f"that `fewstep distill --out` wrote)")
    data = read_checkpoint(where)
    raw = yaml.safe_load(data.config_yaml) if data.config_yaml else None
    if not isinstance(raw, dict):
        raise UserError(f"checkpoint {where} holds no run config")
    recipe = recipe_class(data.trainer["recipe"])(recipe_class(data.trainer["recipe"]).load_config(base=raw))
    weights = data.tensors.get("ema/student", data.tensors.get("roles/student"))
    if weights is None or "student" not in recipe.config.roles:
        raise UserError(f"run {run} trains no student role; nothing to export")
    return recipe, where, weights, recipe.config.roles["student"].lora


def export_run(run: str | Path, out: str | Path, *, lora_only: bool = False, overwrite: bool = False) -> dict:
    """Write ``out`` (module doc); returns what ``export.json`` records."""
    from .models.diffusers_family import SETTINGS_FILE, DiffusersVideoModel

    run, out = Path(run), Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")
    recipe, where, weights, lora = _student_from_checkpoint(run)
    model = recipe.student_pipeline()
    if not isinstance(model, DiffusersVideoModel):
        raise UserError(f"run {run} distils {recipe.config.model!r}, not a diffusers pipeline; its RUN/student "
                        f"directory is the export")
    record: dict[str, Any] = {"run": str(run), "checkpoint": where.name, "pipeline": model.spec.pipeline}
    if lora_only:
        if lora is None:
            raise UserError(f"--lora-only: run {run}'s student is not a LoRA role (roles.student.lora is not set)")
        prefix = _transformer_prefix(model)
        layers = diffusers_lora_layers(weights, prefix, lora.scale)
        with atomic_directory(out) as tmp:
            type(model.pipe).save_lora_weights(tmp, transformer_lora_layers=layers, safe_serialization=True)
            record.update({"lora": {"rank": lora.rank, "alpha": lora.alpha, "scale_folded_into_B": lora.scale,
                                    "layers": len(layers) // 2}})
            (tmp / "export.json").write_text(json.dumps(record, indent=2))
        return record

    recipe.load_student(model, weights)
    sampling, schedule = model.sampling, model.denoiser.schedule
    times = model.sampling_times(None)
    steps = len(times) - 1
    if sampling.sampler not in ("euler", "consistency"):
        raise UserError(f"the student samples with {sampling.sampler!r}; export writes Euler or consistency samplers")
    sigmas = schedule.sigma(times[:-1]).numpy()  # every stock grid starts at σ = 1: a later start is a gap
    grid, gap = fit_flow_scheduler(sigmas)
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=grid["shift"], shift_terminal=grid["shift_terminal"],
                                                stochastic_sampling=sampling.sampler == "consistency")
    stock = stock_sigmas(steps, grid["shift"], grid["shift_terminal"])
    guidance = sampling.cfg_scale if sampling.cfg_scale is not None else 1.0
    record.update({
        "call": {"num_inference_steps": steps, "guidance_scale": guidance, "height": model.settings.height,
                 "width": model.settings.width, "num_frames": model.settings.frames,
                 "max_sequence_length": model.settings.max_sequence_length},
        "sampler": sampling.sampler, "scheduler": grid,
        "student_sigmas": [round(float(s), 8) for s in sigmas], "stock_sigmas": [round(float(s), 8) for s in stock],
        "max_sigma_gap": gap, "exact": gap <= EXACT})
    if not record["exact"]:
        record["note"] = (f"no stock FlowMatchEulerDiscreteScheduler visits the student's σ-grid; exported with the "
                          f"nearest one (max |Δσ| = {gap:.4f}); `fewstep generate --model {run}/student` samples the "
                          f"exact grid")
    # fewstep reads the export too: its times re-expressed in the exported scheduler's shift
    from .diffusion.schedules import FlowMatching

    exported_t = FlowMatching(grid["shift"]).unshift(torch.tensor([*stock, 0.0], dtype=torch.float64))
    settings = model.settings.model_copy(update={"sampling": sampling.model_copy(
        update={"times": [float(t) for t in exported_t], "steps": steps})})
    model.pipe.register_modules(scheduler=scheduler)
    with atomic_directory(out) as tmp:
        model.write_pipeline(tmp)
        (tmp / SETTINGS_FILE).write_text(json.dumps(settings.model_dump(mode="json"), indent=2))
        (tmp / "export.json").write_text(json.dumps(record, indent=2))
    return record


def _transformer_prefix(model) -> str:
    """``backbone.model.``: where the transformer sits in the denoiser's parameter names."""
    for name, module in model.denoiser.named_modules():
        if module is model.transformer:
            return f"{name}."
    raise UserError("the student's denoiser does not hold the pipeline's transformer")
