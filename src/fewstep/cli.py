"""The ``fewstep`` command line (typer).

Every command runs inside :func:`main`, the one place that turns a
:class:`~fewstep.errors.UserError` into a single ``error: …`` line on stderr and its exit code
(2; 130/143 for a training run stopped by SIGINT/SIGTERM after its checkpoint), and an
``OSError`` of the environment (disk full, permission denied) into one line and exit code 2. Commands validate their input at the boundary and raise ``UserError``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer

from . import __version__
from .config import dump_config
from .errors import Interrupted, UserError

app = typer.Typer(
    name="fewstep",
    help="Distil many-step video diffusion / flow-matching teachers into 1–4 step students.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _version(value: bool):
    if value:
        typer.echo(f"fewstep {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    """fewstep: RGTD, DOLLAR, AccVideo and SwiftVideo as composable objectives in one engine."""


@app.command()
def timesteps(
    schedule: str = typer.Option("flow", help="Noise schedule: 'flow' (flow matching) or 'vp' (DDPM)."),
    steps: int = typer.Option(None, help="Sampler steps (the grid an N-step Euler/DDIM sampler visits)."),
    grid: str = typer.Option(None, help="A named grid instead of --steps (e.g. dollar4, ddim50, accvideo_keys)."),
    spacing: str = typer.Option("uniform", help="With --steps: uniform (N equal intervals of t) or diffusers "
                                                "(the diffusers scheduler's own grid)."),
    shift: float = typer.Option(1.0, help="Flow-matching shift s."),
    betas: str = typer.Option("scaled_linear", help="VP betas: linear or scaled_linear."),
    zero_terminal_snr: bool = typer.Option(False, help="VP: rescale betas to zero terminal SNR."),
):
    """Print a timestep grid: continuous t, alpha(t), sigma(t) and the backbone's model timestep."""
    from rich.console import Console
    from rich.table import Table

    from .config import parse_config
    from .diffusion.schedules import FlowMatchingConfig, VPConfig, named_grid, sampling_grid

    if schedule == "flow":
        sched = parse_config(FlowMatchingConfig, {"shift": shift}).build()
    elif schedule == "vp":
        sched = parse_config(VPConfig, {"betas": betas, "zero_terminal_snr": zero_terminal_snr}).build()
    else:
        raise UserError(f"--schedule must be 'flow' or 'vp', got {schedule!r}")
    if (steps is None) == (grid is None):
        raise UserError("give exactly one of --steps N or --grid NAME")
    t = named_grid(grid, sched) if grid else sampling_grid(sched, steps, spacing)
    table = Table(title=f"{schedule} schedule: {grid or f'{steps}-step {spacing} sampling grid'}")
    for col in ("i", "t", "alpha", "sigma", "model timestep"):
        table.add_column(col, justify="right")
    for i, ti in enumerate(t.tolist()):
        tt = t.new_tensor(ti)
        table.add_row(str(i), f"{ti:.4f}", f"{float(sched.alpha(tt)):.4f}", f"{float(sched.sigma(tt)):.4f}",
                      f"{float(sched.model_timestep(tt)):.2f}")
    Console().print(table)


@app.command()
def pretrain(
    stage: str = typer.Option("all", help="rewards | codec | latents | teacher | export | all (in that order); i2v: "
                                          "the image-to-video teacher fine-tuned from the T2V one (i2v.source)."),
    work: Path = typer.Option(Path("runs/pretrain"), help="Work directory for checkpoints and caches."),
    out: Path = typer.Option(None, help="Where to export the teacher (default: WORK/toy-teacher)."),
    into_package: bool = typer.Option(False, "--into-package", help="Write the teacher and reward models into the "
                                      "installed package's assets, replacing the shipped ones (for maintainers)."),
    config: Path = typer.Option(None, help="YAML file overriding pretraining defaults."),
    set_: list[str] = typer.Option([], "--set", help="Dotted override, e.g. teacher.steps=2000 (repeatable)."),
    max_minutes: float = typer.Option(1e9, help="Stop (after a checkpoint) once this many minutes have passed."),
):
    """Train the embedded default from scratch: codec, latent cache, toy teacher; resumable in chunks."""
    import torch

    from .config import load_config
    from .models.family import ASSETS, SHIPPED
    from .pretrain import (PretrainConfig, build_latents, export_i2v, export_teacher, train_codec, train_i2v,
                           train_rewards, train_teacher)
    from .utils.io import check_writable, write_text_atomic
    from .utils.progress import StageProgress

    stages = ["rewards", "codec", "latents", "teacher", "export"]
    if stage not in ("all", "i2v") and stage not in stages:
        raise UserError(f"--stage must be one of all, {', '.join(stages)}, i2v; got {stage!r}")
    if into_package and out is not None:
        raise UserError("give --out or --into-package, not both")
    cfg = load_config(PretrainConfig, config, set_)
    assets = ASSETS if into_package else work
    name = "toy-teacher-i2v" if stage == "i2v" else "toy-teacher"
    out = SHIPPED[name] if into_package else (out or work / name)
    check_writable(work, "--work")
    check_writable(out.parent, "--out")
    work.mkdir(parents=True, exist_ok=True)
    write_text_atomic(work / "config.yaml", dump_config(cfg))
    budget = max_minutes * 60
    start = time.monotonic()
    # adaLN-Zero and zero-initialised residual convs fill Adam's moments with denormal floats,
    # which slow CPU steps several-fold; flushing them to zero changes nothing measurable
    torch.set_flush_denormal(True)
    with StageProgress() as progress:
        if stage == "i2v":
            if not train_i2v(cfg, work, budget, progress):
                typer.echo(f"time budget reached; run the same command again to continue from {work}")
                return
            typer.echo(f"image-to-video teacher written to {export_i2v(cfg, work, out)}")
            return
        for name in stages if stage == "all" else [stage]:
            left = budget - (time.monotonic() - start)
            if name == "rewards" and (stage == "rewards" or not (ASSETS / "toy-features" / "config.json").is_file()):
                train_rewards(cfg, assets, progress)
                typer.echo(f"toy-clip and toy-features written to {assets}")
            if name == "codec" and not train_codec(cfg, work, left, progress):
                break
            if name == "latents":
                build_latents(cfg, work, progress)
            if name == "teacher" and not train_teacher(cfg, work, left, progress):
                break
            if name == "export":
                target = export_teacher(cfg, work, out)
                typer.echo(f"teacher written to {target}")
        else:
            return
    typer.echo(f"time budget reached; run the same command again to continue from {work}")


DEVICE_HELP = "auto (cuda when available) | cpu | cuda."


def _device(value: str) -> str:
    """The ``--device`` option resolved to ``cpu`` or ``cuda`` (a UserError for anything else)."""
    import torch

    if value not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda; got {value!r}")
    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if value == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    return value


DTYPE_HELP = "Weights of the networks: auto (as stored/loaded), bf16 or fp32 (the sampler's latents stay fp32)."


def _dtype(value: str):
    """``--dtype``: None (as loaded), torch.bfloat16 or torch.float32."""
    import torch

    choices = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}
    if value not in choices:
        raise UserError(f"--dtype must be auto, bf16 or fp32; got {value!r}")
    return choices[value]


def _warn_if_untrained(model: str) -> None:
    """A training run's ``RUN/student`` says which step it holds (run.json); warn on an untrained one."""
    from .engine.rundir import describe_student, student_record
    from .errors import warn

    record = student_record(model)
    if record is not None and (record["step"] == 0 or record["step"] < (record.get("of") or 0)):
        warn(f"{model} holds {describe_student(record)}")


@app.command()
def generate(
    model: str = typer.Option(..., help="A shipped model name (toy-teacher) or a model directory."),
    prompt: list[str] = typer.Option(..., help="Caption (repeatable); a toy model takes the toy world's grammar."),
    out: str = typer.Option(..., help="Output directory: one mp4 per video + samples.npz."),
    steps: int = typer.Option(None, help="Sampler steps (default: the model's own)."),
    sampler: str = typer.Option(None, help="euler | ddim | consistency (default: the model's own), e.g. a "
                                "consistency student sampled with fresh noise at each step."),
    grid: str = typer.Option(None, help="Step times: a named grid, e.g. uniform4_shift3 = t 1, 0.9, 0.75, 0.5 "
                             "(default: the model's own, or --steps uniform steps)."),
    cfg: float = typer.Option(None, help="CFG scale w in uncond + w·(cond − uncond) (default: the model's own)."),
    cfg_2: float = typer.Option(None, "--cfg-2", help="Wan 2.2: the low-noise expert's CFG scale (default: the "
                                "model's guidance_scale_2, else --cfg)."),
    num: int = typer.Option(1, help="Videos per prompt."),
    seed: int = typer.Option(0, help="Seed of the initial noise."),
    scale: int = typer.Option(8, help="Nearest-neighbour upscaling of the mp4s (samples.npz keeps the original)."),
    frames: int = typer.Option(None, help="Frames per clip (default: the model's own; a diffusers model takes 4k + 1)."),
    height: int = typer.Option(None, help="Clip height in pixels (default: the model's own)."),
    width: int = typer.Option(None, help="Clip width in pixels (default: the model's own)."),
    negative_prompt: str = typer.Option(None, "--negative-prompt", help="Caption of CFG's unconditional branch "
                                        "(default: the model's own, usually empty)."),
    image: list[str] = typer.Option([], "--image", help="Condition image of an image-to-video model: an RGB "
                                    "PNG/JPEG at the model's height × width, or toy:CAPTION (the first frame of a toy "
                                    "clip); once, or once per --prompt."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty --out (replacing what fewstep "
                                   "wrote there; other files are kept)."),
):
    """Generate videos: OUT/NNN_<prompt>.mp4 and OUT/samples.npz (frames uint8 [K, T, H, W, 3], prompts; images
    of an image-to-video model)."""
    from .eval.runner import generate_to_dir
    from .utils.progress import StageProgress

    if scale < 1:
        raise UserError(f"--scale {scale} is invalid; expected an integer >= 1")
    device = _device(device)
    _warn_if_untrained(model)
    with StageProgress(every_seconds=5.0) as progress:
        target = generate_to_dir(model, prompt, out, steps=steps, cfg_scale=cfg, num=num, seed=seed, scale=scale,
                                 device=device, overwrite=overwrite, frames=frames, height=height, width=width,
                                 negative_prompt=negative_prompt, dtype=_dtype(dtype), images=list(image) or None,
                                 cfg_scale_2=cfg_2, sampler=sampler, grid=grid,
                                 progress=lambda done, total: progress("generate", done, total, {}))
    typer.echo(f"wrote {len(prompt) * num} videos to {target}")


@app.command("eval")
def eval_(
    model: str = typer.Option(..., help="A shipped model name (toy-teacher) or a model directory."),
    out: str = typer.Option(..., help="Output directory: metrics.json, report.html, gifs/."),
    prompts: str = typer.Option(None, help="Captions, one per line (a toy model: default the eval prompts; any "
                                           "other model needs them)."),
    steps: int = typer.Option(None, help="Sampler steps (default: the model's own)."),
    sampler: str = typer.Option(None, help="euler | ddim | consistency (default: the model's own), e.g. a "
                                "consistency student sampled with fresh noise at each step."),
    grid: str = typer.Option(None, help="Step times: a named grid, e.g. uniform4_shift3 = t 1, 0.9, 0.75, 0.5 "
                             "(default: the model's own, or --steps uniform steps)."),
    cfg: float = typer.Option(None, help="CFG scale w in uncond + w·(cond − uncond) (default: the model's own)."),
    cfg_2: float = typer.Option(None, "--cfg-2", help="Wan 2.2: the low-noise expert's CFG scale (default: the "
                                "model's guidance_scale_2, else --cfg)."),
    image: list[str] = typer.Option([], "--image", help="Condition image of a non-toy image-to-video model: an RGB "
                                    "PNG/JPEG at the model's height × width, once or once per line of --prompts (a "
                                    "toy one is conditioned on each eval prompt's own first frame)."),
    num: int = typer.Option(4, help="Videos per eval prompt."),
    seed: int = typer.Option(0, help="Seed of the initial noise."),
    features: str = typer.Option(None, help="Fréchet feature net: a toy model's (shipped name or directory; default "
                                            "toy-features), or for other models a CLIP / DINOv2 model directory."),
    reference: str = typer.Option(None, help="Fréchet reference of a non-toy model: a latent cache of real clips "
                                             "(fewstep cache --videos), decoded by the model."),
    reference_clips: int = typer.Option(64, help="Clips of --reference decoded for its feature statistics."),
    batch_size: int = typer.Option(32, help="Videos generated per batch."),
    frames: int = typer.Option(None, help="Frames per clip (default: the model's own; a diffusers model takes 4k + 1)."),
    height: int = typer.Option(None, help="Clip height in pixels (default: the model's own)."),
    width: int = typer.Option(None, help="Clip width in pixels (default: the model's own)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty --out (replacing what fewstep "
                                   "wrote there; other files are kept)."),
):
    """Toy VBench for a toy model (quality/semantic/total, FVD, Vendi); for any other model, sharpness, flicker,
    Vendi and (with --features/--reference) a Fréchet distance on --prompts; NFE and seconds per video."""
    import json

    from .eval.runner import evaluate_to_dir
    from .utils.progress import StageProgress

    device = _device(device)
    _warn_if_untrained(model)
    with StageProgress(every_seconds=5.0) as progress:
        metrics = evaluate_to_dir(model, out, steps=steps, cfg_scale=cfg, num=num, seed=seed, features=features,
                                  batch_size=batch_size, device=device, overwrite=overwrite, frames=frames,
                                  height=height, width=width, prompts=prompts, reference=reference,
                                  reference_clips=reference_clips, dtype=_dtype(dtype), images=list(image) or None,
                                  cfg_scale_2=cfg_2, sampler=sampler, grid=grid,
                                  progress=lambda done, total: progress("eval", done, total, {}))
    keys = (("sharpness", "flicker", "vendi_pixel", "fd") if metrics.get("metric_set") == "generic" else
            ("total", "quality", "semantic", "fvd", "vendi_pixel", "vendi_feature"))
    summary = {k: metrics[k] for k in (*keys, "i2v", "total_i2v", "nfe", "seconds_per_video", "steps", "grid",
                                       "sampler")
               if k in metrics}
    summary.update({k: v for k, v in metrics.get("dimensions", {}).items() if k.startswith("i2v_")})
    typer.echo(json.dumps(summary))
    typer.echo(f"wrote {out}/metrics.json and {out}/report.html")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Output directory: run/, report.html, summary.json."),
    model: str = typer.Option("toy-teacher", help="Teacher to distil: a shipped name or a model directory."),
    set_: list[str] = typer.Option([], "--set", help="Override a dollar-recipe key, e.g. train.steps=300."),
    num: int = typer.Option(4, help="Videos per eval prompt."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty --out (replacing what fewstep "
                                   "wrote there; other files are kept)."),
):
    """The main job on the embedded default: distil a 4-step DOLLAR student, evaluate, report."""
    from .demo import run_demo, summary_table

    summary = run_demo(out, model=model, overrides=list(set_), num=num, overwrite=overwrite)
    typer.echo(summary_table(summary))
    typer.echo(f"demo took {summary['seconds']['total'] / 60:.1f} min; wrote {out}/report.html and "
               f"{out}/summary.json")


@app.command()
def bench(
    student: str = typer.Option(..., help="Student model directory (e.g. RUN/student)."),
    teacher: str = typer.Option("toy-teacher", help="Teacher: a shipped name or a model directory."),
    steps: list[int] = typer.Option([4, 2, 1], "--steps", help="Student step counts to time (repeatable)."),
    teacher_steps: int = typer.Option(50, help="Teacher sampler steps (with its own CFG)."),
    num: int = typer.Option(32, help="Videos per timed generation (one batch; 32 = fewstep eval/generate's batch)."),
    repeats: int = typer.Option(3, help="Interleaved repetitions; medians are reported."),
    reward: str = typer.Option("toy-clip", help="Differentiable pixel reward of the memory comparison."),
    memory_batch: int = typer.Option(8, help="Batch size of the memory comparison."),
    backprop: str = typer.Option("last", help="Student graph in the whole-step memory comparison: all | last."),
    out: Path = typer.Option(None, help="Also write the results to this JSON file."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
):
    """Student vs teacher wall clock and NFE; peak memory of an LRM step vs a pixel-reward step."""
    import json

    import torch

    from .bench import bench_reward_memory, bench_speed
    from .models.family import load_model, resolve_model
    from .utils.io import check_writable, write_json_atomic

    if any(n < 1 for n in steps) or teacher_steps < 1 or num < 1 or repeats < 1 or memory_batch < 1:
        raise UserError("--steps, --teacher-steps, --num, --repeats and --memory-batch must be >= 1")
    if backprop not in ("all", "last"):
        raise UserError(f"--backprop must be 'all' or 'last', got {backprop!r}")
    if resolve_model(student).resolve() == resolve_model(teacher).resolve():
        raise UserError(f"--student {student} and --teacher {teacher} are the same model; give the distilled "
                        f"student (e.g. RUN/student)")
    if out is not None:
        check_writable(out.parent, "--out")
    device = _device(device)
    student_pipe, teacher_pipe = load_model(student, device), load_model(teacher, device)
    flush = torch.set_flush_denormal(True)  # as in training: denormal floats slow CPU kernels several-fold
    speed = bench_speed(student_pipe, teacher_pipe, student_steps=tuple(steps), teacher_steps=teacher_steps,
                        num_videos=num, repeats=repeats)
    memory = bench_reward_memory(student_pipe, reward=reward, batch_size=memory_batch, steps=max(steps),
                                 backprop=backprop)
    result = {"speed": speed, "memory": memory, "flush_denormal": bool(flush), "device": device}
    t = speed["teacher"]
    typer.echo(f"teacher {t['steps']} steps (CFG {t['cfg_scale']}): NFE {t['nfe']}, "
               f"{t['seconds_per_video']['sampling'] * 1e3:.1f} ms/video sampling, "
               f"{t['seconds_per_video']['end_to_end'] * 1e3:.1f} ms/video with decoding")
    for n, s in speed["students"].items():
        typer.echo(f"student {n} steps: NFE {s['nfe']} ({s['nfe_ratio']:.1f}x fewer), "
                   f"{s['seconds_per_video']['sampling'] * 1e3:.2f} ms/video sampling "
                   f"({s['speedup']['sampling']:.1f}x), {s['seconds_per_video']['end_to_end'] * 1e3:.2f} ms/video "
                   f"with decoding ({s['speedup']['end_to_end']:.1f}x)")
    for scope, what in (("reward", "reward gradient dR/dx"), ("step", f"whole step, backprop {backprop}")):
        m = memory[scope]
        typer.echo(f"peak memory, {what} (batch {memory['batch_size']}, {memory['steps']} student steps): "
                   f"LRM {m['lrm_bytes'] / 2**20:.2f} MiB vs pixel reward through the decoder "
                   f"{m['pixel_bytes'] / 2**20:.2f} MiB (ratio {m['ratio']:.3f})")
    if out is not None:
        write_json_atomic(out, result)
    typer.echo(json.dumps({"speedup_4": speed["students"].get("4", {}).get("speedup"),
                           "memory_ratio": {scope: memory[scope]["ratio"] for scope in ("reward", "step")}}))


@app.command()
def distill(
    recipe: str = typer.Option(None, "--recipe", help="Recipe name (finetune, …); optional with --resume."),
    config: Path = typer.Option(None, "--config", help="YAML file merged over the recipe's defaults."),
    overrides: list[str] = typer.Option([], "--set", help="Override a config key: --set train.steps=100 (repeatable)."),
    presets: list[str] = typer.Option([], "--preset", help="Apply a preset of the recipe (repeatable, in order; "
                                                             "`fewstep recipes NAME` lists them)."),
    out: Path = typer.Option(None, "--out", help="Run directory to write (default with --resume: that run)."),
    resume: Path = typer.Option(None, "--resume", help="Continue the run in this directory from its latest checkpoint."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config as YAML and exit."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run already in --out."),
):
    """Train a few-step student with a recipe (torchrun-aware); RUN/student is the exported model."""
    from .recipes.launch import distill as run_distill

    if presets:
        overrides = [*overrides, f"preset=[{', '.join(presets)}]"]
    text = run_distill(recipe, config, overrides, out, resume, dry_run, overwrite)
    if dry_run:
        typer.echo(text, nl=False)


@app.command()
def export(
    run: Path = typer.Argument(..., help="A run directory (fewstep distill --out)."),
    out: Path = typer.Option(..., "--out", help="Directory to write: a diffusers pipeline (or, with --lora-only, "
                                                "a LoRA file)."),
    lora_only: bool = typer.Option(False, "--lora-only", help="Write only the student's LoRA adapters "
                                                              "(pipeline.load_lora_weights reads them)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out."),
    step: int = typer.Option(None, "--step", help="Export this step's checkpoint (RUN/checkpoints/step_N) "
                                                  "instead of the latest."),
):
    """Export a run's student (latest checkpoint, EMA, LoRA merged) as a diffusers pipeline directory (a run
    on a toy model: as a toy model directory)."""
    from .export import export_run

    record = export_run(run, out, lora_only=lora_only, overwrite=overwrite, step=step)
    if record.get("model") == "toy":
        typer.echo(f"{run}'s student ({record['checkpoint']}) in {out}: fewstep generate/eval --model {out}")
        return
    if lora_only:
        typer.echo(f"LoRA adapters of {run}'s student ({record['checkpoint']}) in {out}: "
                   f"pipe.load_lora_weights('{out}') on the teacher's pipeline")
        return
    shown = ", ".join(f"{k}={v!r}" for k, v in record["call"].items() if k not in ("max_sequence_length",
                                                                                  "prompt_template"))
    inputs = "image, prompt" if record.get("image_to_video") else "prompt"
    typer.echo(f"{record['pipeline']} with {run}'s student ({record['checkpoint']}) in {out}: "
               f"{record['pipeline']}.from_pretrained('{out}')({inputs}, {shown}) (export.json: the whole call)")
    if "note" in record:
        typer.echo(f"note: {record['note']}")


@app.command()
def recipes(name: str = typer.Argument(None, help="A recipe: list its presets.")):
    """List the recipes (or one recipe's presets, for `distill --preset`)."""
    from .recipes.base import all_recipes, recipe_class
    from .recipes.presets import describe

    if name is None:
        found = all_recipes()
        width = max(map(len, found))
        for key, cls in found.items():
            typer.echo(f"{key:<{width}}  {(cls.__doc__ or '').strip().splitlines()[0] if cls.__doc__ else ''}")
        return
    cls = recipe_class(name)
    lines = describe(cls.presets())
    typer.echo(f"{name}: {cls.defaults_path()}")
    typer.echo("\n".join(f"  --preset {line}" for line in lines) if lines else "  (no presets)")


@app.command()
def synth(
    teacher: str = typer.Option(..., help="The teacher: a shipped model name (toy-teacher) or a model directory."),
    prompts: str = typer.Option("toy", help="'toy' (the toy world's training prompts, by index), a text file "
                                            "with one prompt per line (sample i uses line i mod P), or a latent "
                                            "cache of the teacher (clip i mod N's caption; an image-to-video "
                                            "teacher: and its first frame)."),
    num: int = typer.Option(..., help="Trajectories to synthesize (sample i: prompt i, noise seeded by (seed, i))."),
    out: Path = typer.Option(..., help="Store directory: manifest.json + shards; rerun the same command to resume."),
    steps: int = typer.Option(50, help="Euler steps of the teacher's solver (its grid contains the key timesteps)."),
    cfg: float = typer.Option(None, help="CFG scale w in uncond + w·(cond − uncond) (default: the teacher's own)."),
    keep: str = typer.Option("keys", help="keys: latents at AccVideo's key timesteps; all: the whole path."),
    seed: int = typer.Option(0, help="Seed of the per-sample noise."),
    batch_size: int = typer.Option(16, help="Samples solved together."),
    shard_size: int = typer.Option(256, help="Samples per shard file."),
    dtype: str = typer.Option("auto", help="Stored latents and caption tokens: bf16, fp32, or auto (bf16 for a real "
                                           "teacher, fp32 for the toy one). Read back as fp32."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the store in --out instead of resuming it."),
):
    """Store teacher denoising trajectories (AccVideo's SynVid) for `distill --recipe accvideo`."""
    from .synth import synthesize
    from .utils.progress import StageProgress

    device = _device(device)
    with StageProgress() as progress:
        store = synthesize(teacher, out, num, prompts=prompts, steps=steps, cfg_scale=cfg, keep=keep, seed=seed,
                           batch_size=batch_size, shard_size=shard_size, dtype=dtype, device=device,
                           progress=progress, overwrite=overwrite)
    s = store.settings
    typer.echo(f"{len(store)} trajectories ({len(store.manifest.shards)} shards, {s.num_texts} captions, {s.dtype}, "
               f"times {', '.join(f'{t:.4g}' for t in s.times[:6])}{', …' if keep == 'all' else ''}) in {out}")


@app.command()
def pairs(
    model: str = typer.Option(..., help="The model that samples both videos (the distribution-aligned student, "
                                        "e.g. RUN/student): a shipped name or a model directory."),
    num: int = typer.Option(..., help="Pairs to write (pair i: prompt i, noise seeded by (seed, i))."),
    out: Path = typer.Option(..., help="Store directory: manifest.json + shards; rerun the same command to resume."),
    steps: tuple[int, int] = typer.Option((8, 4), help="Sampling steps of the preferred and the dispreferred video "
                                                       "(SwiftVideo: 8 4, then 4 2 in the second round)."),
    preferred: str = typer.Option("samples", help="samples: the preferred video is the model's with more steps; "
                                                  "real: the toy world's clip of the prompt (--prompts toy)."),
    prompts: str = typer.Option("toy", help="'toy' (the toy world's training prompts, by index) or a text file "
                                            "with one prompt per line (pair i uses line i mod P)."),
    cfg: float = typer.Option(None, help="CFG scale w of both samples (default: the model's own)."),
    seed: int = typer.Option(0, help="Seed of the per-pair noise."),
    batch_size: int = typer.Option(16, help="Pairs sampled together."),
    shard_size: int = typer.Option(256, help="Pairs per shard file."),
    dtype: str = typer.Option("auto", help="Stored latents and caption tokens: bf16, fp32, or auto (bf16 for a real "
                                           "model, fp32 for the toy one)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the store in --out instead of resuming it."),
):
    """Store synthetic preference pairs (SwiftVideo's trajectory alignment) for `distill --recipe swiftvideo_ta`."""
    from .synth import synthesize_pairs
    from .utils.progress import StageProgress

    if preferred not in ("samples", "real"):
        raise UserError(f"--preferred must be 'samples' or 'real', got {preferred!r}")
    win = "real" if preferred == "real" else steps[0]
    with StageProgress() as progress:
        store = synthesize_pairs(model, out, num, preferred=win, dispreferred=steps[1], prompts=prompts,
                                 cfg_scale=cfg, seed=seed, batch_size=batch_size, shard_size=shard_size, dtype=dtype,
                                 device=_device(device), progress=progress, overwrite=overwrite)
    s = store.settings
    typer.echo(f"{len(store)} pairs ({len(store.manifest.shards)} shards, {s.num_texts} captions, {s.dtype}; preferred "
               f"{s.preferred}{'' if s.preferred == 'real' else ' steps'}, dispreferred {s.dispreferred} steps) in {out}")


@app.command()
def cache(
    model: str = typer.Option(..., help="The model whose VAE and text encoder to cache with: a shipped name or a "
                                        "model directory."),
    videos: Path = typer.Option(None, help="A folder of videos with sidecar captions (STEM.txt), or a .csv "
                                           "(columns path, caption) or .jsonl ({path, caption}) file; paths "
                                           "relative to its folder."),
    prompts: Path = typer.Option(None, help="Instead of --videos: a text file with one caption per line "
                                            "(a text-only cache, for data-free objectives)."),
    out: Path = typer.Option(..., help="Cache directory: manifest.json + shards; rerun the same command to resume."),
    fps: float = typer.Option(16.0, help="Frame rate the clips' frames are sampled at (from the start of a video)."),
    batch_size: int = typer.Option(4, help="Clips encoded together."),
    shard_size: int = typer.Option(64, help="Input items per shard file."),
    frames: int = typer.Option(None, help="Frames per clip (default: the model's own; a diffusers model takes "
                                          "4k + 1)."),
    height: int = typer.Option(None, help="Clip height in pixels (default: the model's own)."),
    width: int = typer.Option(None, help="Clip width in pixels (default: the model's own)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", help="Encoders' precision: bf16 | fp32 | auto (bf16 on cuda, fp32 on cpu)."),
):
    """Encode videos and captions once (latents + caption tokens) for `distill` with data: {kind: latent_cache}."""
    import os

    import torch

    from .cache import build_cache, check_out, process_group
    from .data.cache import read_inputs
    from .eval.runner import set_geometry
    from .models.family import load_model
    from .utils.progress import StageProgress

    if dtype not in ("auto", "bf16", "fp32"):
        raise UserError(f"--dtype must be auto, bf16 or fp32; got {dtype!r}")
    device = _device(device)
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    inputs = read_inputs(videos, prompts)
    check_out(out)
    pipe = load_model(model, device)
    set_geometry(pipe, frames, height, width)
    pipe.to(torch.bfloat16 if dtype == "bf16" or (dtype == "auto" and device != "cpu") else torch.float32)
    try:
        with process_group(), StageProgress() as progress:
            run = build_cache(pipe, inputs, out, fps=fps, batch_size=batch_size, shard_size=shard_size,
                              model_name=model, progress=progress)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; the finished shards in {out} are kept: rerun the same command to "
                          f"continue") from None
    typer.echo(run.summary())


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, mapping user errors to one line and exit code 2."""
    try:
        app(args=argv, standalone_mode=True)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:  # outside training (which checkpoints and raises a UserError of its own)
        print("error: interrupted; nothing was published", file=sys.stderr)
        return 130
    except OSError as err:  # the environment refused: disk full, permission denied, read-only filesystem
        where = f": {err.filename}" if err.filename else ""
        print(f"error: {err.strerror or type(err).__name__}{where}", file=sys.stderr)
        return UserError.exit_code
    except SystemExit as exc:  # typer/click exit codes (0, or 2 for usage errors)
        return exc.code if isinstance(exc.code, int) else 0
    return 0


def _console_main():  # pragma: no cover - thin wrapper for the console script
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    _console_main()
