"""``fewstep export RUN --out DIR``: a distilled student as a diffusers pipeline directory.

The export is the teacher's pipeline (its tokenizer, text encoder and VAE, as loaded from the
run's ``model`` directory) with the student's transformer — the EMA weights of the run's latest
checkpoint, LoRA adapters merged (``W + (α/r)·B A``, :mod:`fewstep.engine.lora`) — and, for a flow
teacher (Wan, HunyuanVideo), a ``FlowMatchEulerDiscreteScheduler`` whose stock ``set_timesteps(N)``
visits the student's σ-grid, so that ``WanPipeline.from_pretrained(DIR)(prompt, num_inference_steps=N,
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

**VP teachers (CogVideoX).** A consistency student gets an ``LCMScheduler`` (its step is exactly
``α_s·x̂0 + σ_s·z``, with the teacher's ᾱ as ``trained_betas``), a deterministic (DDIM) student the
teacher's DDIM scheduler with ``trailing`` spacing (:func:`_vp_scheduler`); both visit integer
timesteps, DOLLAR's [999, 749, 499, 249] among them. CogVideoXPipeline draws a consistency step's
noise in its frames-first layout, so its samples equal fewstep's in distribution, and draw for draw
only when that noise is laid out as fewstep's (the test does so).

**Image-to-video teachers** (``WanImageToVideoPipeline``, ``CogVideoXImageToVideoPipeline``): the export is the
same I2V class with the teacher's image encoder and processor, called as ``pipe(image, prompt, …)``; from the
same image and noise it samples as ``fewstep generate --image`` (``export.json``: ``image_to_video``).

``--lora-only`` writes the student's adapters alone, in the format ``load_lora_weights`` reads
(``B`` pre-scaled by α/r), for a run whose student is a LoRA role.

``--step N`` exports that step's checkpoint instead of the latest (a run keeps ``train.keep_checkpoints``).
A run on a toy model exports its student as a toy model directory, as ``RUN/student`` held it after that
checkpoint.

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

from .diffusion.schedules import FlowMatching, VPDiscrete
from .engine.checkpoint import list_checkpoints, read_checkpoint
from .engine.lora import diffusers_lora_layers
from .errors import UserError
from .utils.io import atomic_directory

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default weight_name
EXACT = 1e-5  # max |Δσ| below which the stock grid is the student's (float32 round-off is ~1e-7)


#: Pipelines that hand the scheduler pre-shift sigmas of their own: N steps → those sigmas.
#: (HunyuanVideoPipeline: ``np.linspace(1, 0, N + 1)[:-1]``; WanPipeline calls ``set_timesteps(N)``.)
PIPELINE_SIGMAS = {"HunyuanVideoPipeline": lambda n: np.linspace(1.0, 0.0, n + 1)[:-1]}


def stock_sigmas(steps: int, shift: float, terminal: float | None, pipeline: str = "WanPipeline") -> np.ndarray:
    """σ that ``pipeline`` samples with ``FlowMatchEulerDiscreteScheduler(shift, shift_terminal)`` in
    ``steps`` steps (without the final 0)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift, shift_terminal=terminal)
    own = PIPELINE_SIGMAS.get(pipeline)
    scheduler.set_timesteps(steps, sigmas=None if own is None else own(steps))
    return scheduler.sigmas[:-1].double().numpy()


def fit_flow_scheduler(sigmas: np.ndarray, pipeline: str = "WanPipeline") -> tuple[dict[str, Any], float]:
    """``({shift, shift_terminal}, max |Δσ|)`` of the stock grid nearest to ``sigmas`` (decreasing,
    without the final 0) as ``pipeline`` samples it. τ = the last σ; ``s'`` minimises the largest
    difference (bounded search)."""
    from scipy.optimize import minimize_scalar

    n = len(sigmas)
    terminal = float(sigmas[-1]) if n > 1 else None
    if n > 1 and not terminal < 1:
        raise UserError("the student's grid has σ = 1 after its first step; no flow scheduler visits it")

    def gap(log_shift: float) -> float:
        return float(np.abs(stock_sigmas(n, float(np.exp(log_shift)), terminal, pipeline) - sigmas).max())

    if n <= 2:  # σ_0 = 1 and τ fix the grid; the shift does not matter
        shift = 1.0
    else:
        best = minimize_scalar(gap, bounds=(np.log(1e-3), np.log(1e3)), method="bounded",
                               options={"xatol": 1e-12, "maxiter": 500})
        shift = float(np.exp(best.x))
    return {"shift": shift, "shift_terminal": terminal}, gap(np.log(shift))


def _student_from_checkpoint(run: Path, step: int | None = None):
    """(recipe, checkpoint path, student role weights, lora config) of the latest checkpoint or ``step``'s."""
    from .recipes.base import recipe_class

    if not run.is_dir():
        raise UserError(f"run {run} does not exist")
    found = dict(list_checkpoints(run))
    if not found:
        raise UserError(f"run {run} has no checkpoint to export (train it first, or point at the run directory "
                        f"that `fewstep distill --out` wrote)")
    if step is not None and step not in found:
        raise UserError(f"--step {step}: run {run} has checkpoints of steps {', '.join(map(str, sorted(found)))}")
    where = found[max(found) if step is None else step]
    data = read_checkpoint(where)
    raw = yaml.safe_load(data.config_yaml) if data.config_yaml else None
    if not isinstance(raw, dict):
        raise UserError(f"checkpoint {where} holds no run config")
    recipe = recipe_class(data.trainer["recipe"])(recipe_class(data.trainer["recipe"]).load_config(base=raw))
    weights = data.tensors.get("ema/student", data.tensors.get("roles/student"))
    if weights is None or "student" not in recipe.config.roles:
        raise UserError(f"run {run} trains no student role; nothing to export")
    return recipe, where, weights, recipe.config.roles["student"].lora


def export_run(run: str | Path, out: str | Path, *, lora_only: bool = False, overwrite: bool = False,
               step: int | None = None) -> dict:
    """Write ``out`` (module doc) from the latest checkpoint or ``step``'s; returns what ``export.json``
    records. A run on a toy model exports as a toy model directory (what ``RUN/student`` holds after that
    checkpoint: an earlier student of the run, e.g. the best of a curve of checkpoints)."""
    from .models.diffusers_family import SETTINGS_FILE, DiffusersVideoModel

    run, out = Path(run), Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")
    recipe, where, weights, lora = _student_from_checkpoint(run, step)
    model = recipe.student_pipeline()
    if model is None:
        raise UserError(f"run {run}'s recipe {recipe.name!r} has no student model to export")
    if not isinstance(model, DiffusersVideoModel):
        if lora_only:
            raise UserError(f"--lora-only: run {run} distils {recipe.config.model!r}, not a diffusers pipeline; "
                            f"export its student as a model directory (without --lora-only)")
        recipe.load_student(model, weights)
        model.save(out)
        return {"run": str(run), "checkpoint": where.name, "model": "toy"}
    record: dict[str, Any] = {"run": str(run), "checkpoint": where.name, "pipeline": model.spec.pipeline}
    if model.image_conditioned:  # the call takes the condition image first: pipe(image, prompt, ...)
        record["image_to_video"] = True
    if lora_only:
        if lora is None:
            raise UserError(f"--lora-only: run {run}'s student is not a LoRA role (roles.student.lora is not set)")
        slots = model.expert_slots  # Wan 2.2: one file per expert (the second loads with load_into_transformer_2)
        build = recipe.config.roles["student"].build or {}
        single = build.get("kind") == "expert"  # one expert's network for every step (recipes/builders.py)
        if single:  # its adapters belong to its own expert's base only
            slots = [build.get("expert", "transformer")]
        files = {slot: LORA_FILE if slot == "transformer" else LORA_FILE.replace(".", f"_{slot}.", 1) for slot in slots}
        with atomic_directory(out) as tmp:
            counts = {}
            for slot in slots:
                prefix = _transformer_prefix(model, slot, model.denoisers()[slot] if single else None)
                layers = diffusers_lora_layers({k: v for k, v in weights.items() if k.startswith(prefix)}, prefix,
                                               lora.scale)
                type(model.pipe).save_lora_weights(tmp, transformer_lora_layers=layers, weight_name=files[slot],
                                                   safe_serialization=True)
                counts[slot] = len(layers) // 2
            record["lora"] = {"rank": lora.rank, "alpha": lora.alpha, "scale_folded_into_B": lora.scale,
                              "layers": counts[slots[0]]}
            if len(model.expert_slots) > 1:
                record["lora"]["experts"] = {slot: {"weight_name": files[slot], "layers": counts[slot]}
                                             for slot in slots}
            if single and len(model.expert_slots) > 1:
                route = "None" if slots[0] == "transformer" else "> 1"
                record["lora"]["note"] = (f"a single student: {slots[0]} with these adapters takes every step "
                                          f"(WanPipeline: boundary_ratio {route})")
            (tmp / "export.json").write_text(json.dumps(record, indent=2))
        return record

    recipe.load_student(model, weights)
    sampling, schedule = model.sampling, model.denoiser.schedule
    times = model.sampling_times(None)
    steps = len(times) - 1
    if sampling.sampler not in ("euler", "consistency"):
        raise UserError(f"the student samples with {sampling.sampler!r}; export writes Euler or consistency samplers")
    if isinstance(schedule, FlowMatching):
        scheduler, grid, stock_t, exported_t = _flow_scheduler(schedule, sampling.sampler, times, model.spec.pipeline)
    elif isinstance(schedule, VPDiscrete):
        scheduler, grid, stock_t, exported_t = _vp_scheduler(schedule, model.pipe.scheduler, sampling.sampler, times)
    else:
        raise UserError(f"export writes flow-matching and VP schedulers, not {type(schedule).__name__}")
    sigmas, stock = schedule.sigma(times[:-1]).numpy(), schedule.sigma(stock_t).numpy()
    gap = float(np.abs(stock - sigmas).max())
    guidance = sampling.cfg_scale if sampling.cfg_scale is not None else 1.0
    call = {"num_inference_steps": steps, "guidance_scale": guidance, "height": model.settings.height,
            "width": model.settings.width, "num_frames": model.settings.frames,
            "max_sequence_length": model.settings.max_sequence_length}
    if model.settings.embedded_guidance_scale is not None:  # HunyuanVideo: guidance_scale is the embedded one
        call.update(guidance_scale=model.settings.embedded_guidance_scale, true_cfg_scale=guidance)
    if model.settings.prompt_template is not None:
        call["prompt_template"] = model.settings.prompt_template.model_dump()
    record.update({
        "call": call,
        "sampler": sampling.sampler, "scheduler": {"class": type(scheduler).__name__, **grid},
        "student_sigmas": [round(float(s), 8) for s in sigmas], "stock_sigmas": [round(float(s), 8) for s in stock],
        "max_sigma_gap": gap, "exact": gap <= EXACT})
    if not record["exact"]:
        record["note"] = (f"no stock {type(scheduler).__name__} visits the student's σ-grid; exported with the "
                          f"nearest one (max |Δσ| = {gap:.4f}); `fewstep generate --model {run}/student` samples the "
                          f"exact grid")
    # fewstep reads the export too: the exported grid in the exported scheduler's own time
    settings = model.settings.model_copy(update={"sampling": sampling.model_copy(
        update={"times": [float(t) for t in exported_t], "steps": steps})})
    model.pipe.register_modules(scheduler=scheduler)
    if len(model.expert_slots) > 1:
        record["experts"] = _route_experts(model, times, scheduler)
        model.pipe.register_to_config(boundary_ratio=record["experts"]["boundary_ratio"])
    with atomic_directory(out) as tmp:
        model.write_pipeline(tmp)
        (tmp / SETTINGS_FILE).write_text(json.dumps(settings.model_dump(mode="json"), indent=2))
        (tmp / "export.json").write_text(json.dumps(record, indent=2))
    return record


def _route_experts(model, times: torch.Tensor, scheduler) -> dict[str, Any]:
    """Wan 2.2: a ``boundary_ratio`` under which diffusers gives each exported step to the student that owns it.

    fewstep gives step ``k`` to the expert of its model timestep ``1000·σ(t_k)`` (models/experts.py); WanPipeline
    gives its step timestep ``τ_k`` (the scheduler's, float32) to ``transformer`` iff ``τ_k ≥ ratio · N``. The
    teacher's ratio stays when it routes every exported step as fewstep routes the student's; otherwise the ratio
    lies halfway between the lowest step the high-noise student owns and the highest the low-noise one owns.
    A ``single`` student sits in both slots (hard-linked files), where any ratio samples alike.
    """
    router, schedule = model.denoiser.backbone, model.denoiser.schedule
    owners = router.route(schedule.model_timestep(times[:-1])).tolist()  # (K,) 0 = transformer (high noise)
    n = scheduler.config.num_train_timesteps
    stock = type(scheduler).from_config(scheduler.config)
    stock.set_timesteps(len(times) - 1)
    tau = stock.timesteps.float()  # what WanPipeline compares, (K,)

    def routes(ratio: float) -> list[int]:
        return (tau < torch.tensor(ratio * n, dtype=torch.float32)).long().tolist()

    ratio = float(model.pipe.config["boundary_ratio"])
    if routes(ratio) != owners:
        high = [float(t) for t, o in zip(tau, owners) if o == 0]
        low = [float(t) for t, o in zip(tau, owners) if o == 1]
        if high and low and min(high) <= max(low):  # the exported grid reorders steps around the boundary
            raise UserError("the student's steps do not split into high-noise steps followed by low-noise ones; "
                            "no boundary_ratio routes them")
        lowest_high = min(high) if high else float(n)
        highest_low = max(low) if low else 0.0
        ratio = (lowest_high + highest_low) / 2 / n
    slots = list(router.experts)
    return {"boundary_ratio": ratio, "steps": [slots[o] for o in owners], "same_student": model.same_experts()}


def _flow_scheduler(schedule: FlowMatching, sampler: str, times: torch.Tensor, pipeline: str):
    """``FlowMatchEulerDiscreteScheduler`` fitted to the student's σ-grid (module doc): (scheduler, its
    settings, the stock grid's times in ``schedule``'s t, the same in the exported scheduler's t + 0)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    steps = len(times) - 1
    grid, _ = fit_flow_scheduler(schedule.sigma(times[:-1]).numpy(), pipeline)  # every stock grid starts at σ = 1
    scheduler = FlowMatchEulerDiscreteScheduler(shift=grid["shift"], shift_terminal=grid["shift_terminal"],
                                                stochastic_sampling=sampler == "consistency")
    stock = torch.from_numpy(stock_sigmas(steps, grid["shift"], grid["shift_terminal"], pipeline))
    exported = FlowMatching(grid["shift"]).unshift(torch.cat([stock, torch.zeros(1, dtype=torch.float64)]))
    return scheduler, grid, schedule.unshift(stock), exported


def _vp_scheduler(schedule: VPDiscrete, teacher_scheduler, sampler: str, times: torch.Tensor):
    """A VP (CogVideoX) student's scheduler, on integer timesteps ``k`` (``t = (k + 1)/N``):

    * ``euler`` (deterministic DDIM, ``x_s = α_s·x̂0 + σ_s·ε̂``): the teacher's own DDIM scheduler with
      ``trailing`` spacing, whose ``set_timesteps(n)`` visits ``k = N − i·N/n − 1``;
    * ``consistency`` (``x_s = α_s·x̂0 + σ_s·z``): ``LCMScheduler``, whose step is exactly that
      (``denoised = c_out·x̂0 + c_skip·x`` with ``timestep_scaling`` so large that ``c_skip`` underflows,
      then re-noised to the next timestep); ``original_inference_steps = n`` makes it visit
      ``k = N − i·⌊N/n⌋ − 1`` (DOLLAR's [999, 749, 499, 249] for n = 4), and the teacher's ᾱ (its SNR
      shift and zero-terminal-SNR rescale included) goes in as ``trained_betas``.
    """
    from diffusers import LCMScheduler

    steps, n = len(times) - 1, schedule.num_train_timesteps
    prediction = teacher_scheduler.config.get("prediction_type", "epsilon")
    if sampler == "consistency":
        scheduler = LCMScheduler(num_train_timesteps=n, trained_betas=schedule.betas.tolist(), prediction_type=prediction,
                                 original_inference_steps=steps, timestep_scaling=1e6, clip_sample=False,
                                 set_alpha_to_one=True)
        grid = {"original_inference_steps": steps}
    else:
        scheduler = type(teacher_scheduler).from_config(teacher_scheduler.config, timestep_spacing="trailing")
        grid = {"timestep_spacing": "trailing"}
    scheduler.set_timesteps(steps)
    stock = schedule.t_from_index(scheduler.timesteps.tolist())
    return scheduler, grid, stock, torch.cat([stock, torch.zeros(1, dtype=torch.float64)])


def _transformer_prefix(model, slot: str = "transformer", denoiser=None) -> str:
    """``backbone.model.`` (Wan 2.2: ``backbone.experts.<slot>.model.``): where the pipeline's transformer ``slot``
    sits in the parameter names of ``denoiser`` (default: the model's)."""
    transformer = model.component(slot)
    for name, module in (denoiser or model.denoiser).named_modules():
        if module is transformer:
            return f"{name}."
    raise UserError("the student's denoiser does not hold the pipeline's transformer")
