"""The evaluation runner: generate the eval suite with a model, score it, and write results.

:func:`evaluate` (toy VBench, DESIGN §4) generates ``num_per_prompt`` videos for every prompt
(``EVAL_PROMPTS`` by default) in batches and reports::

    total, quality, semantic, dimensions   analysers.score_clips + aggregate (VBench grouping)
    fvd              Fréchet distance between feature-net embeddings of the generated videos and
                     cached statistics of real eval clips (eval/features.py)
    vendi_pixel      DOLLAR Eq. 17 per prompt (K keyframes, raw pixel vectors), mean over prompts
    vendi_feature    Vendi of the feature-net embeddings of each prompt's videos, mean over
                     prompts (the embedding is of whole clips, so there are no keyframes)
    nfe              network evaluations per video (a CFG step counts 2)
    seconds_per_video  wall clock of sampling + decoding / number of videos (after a warm-up)
    steps, cfg_scale, num_videos, num_per_prompt, seed
    grid, times      which time grid the sampler used ("model": the model's own, else the spacing
                     of diffusion/schedules.sampling_grid) and the times it visited
    jpeg             mean JPEG compressibility reward (−kB per frame, the clip as one frame grid, rewards/jpeg.py)
    i2v, total_i2v   an image-conditioned model only: sample j of each prompt is conditioned on the first
                     frame of toy clip j of that caption (data/toyworld.condition_frame: the same frames for
                     every model), and ``dimensions`` gains VBench-I2V's i2v_subject and i2v_background
                     (eval/i2v.py); ``i2v`` is their mean, ``total_i2v`` = (quality + i2v) / 2 as VBench-I2V
                     groups them; ``total`` stays the text-to-video grouping

:func:`evaluate_generic_with_samples` is the same for a model without the toy world's semantics
(a diffusers teacher or its student), on captions the user gives, with eval/generic.py's metrics::

    sharpness        variance of the Laplacian of luminance, mean over frames and videos (↑)
    flicker          mean |frame_{t+1} − frame_t| in [0, 1] (↓ steadier)
    vendi_pixel      as above; also per prompt under ``prompts``
    fd               Fréchet distance of CLIP / DINOv2 features (frame embeddings averaged over frames)
                     to a latent cache of real clips decoded by the model (only with --features)
    nfe, seconds_per_video, steps, grid, times, cfg_scale, num_videos, num_per_prompt, seed

Every video's initial noise is drawn from one generator seeded with ``seed`` in suite order, so
results do not depend on the batch size (except for the noise a stochastic sampler injects
between steps, which is seeded per batch). :func:`generate_to_dir` and :func:`evaluate_to_dir` are
the ``fewstep generate`` and ``fewstep eval`` commands: they validate everything first and
publish their outputs only when complete (eval/report.py).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fewstep.data.cache import LatentCache
from fewstep.data.toyworld import EVAL_PROMPTS, condition_frame, parse_prompt
from fewstep.errors import UserError, warn
from fewstep.diffusion.samplers import SAMPLERS
from fewstep.diffusion.schedules import grid_steps, grid_times
from fewstep.models.denoiser import cfg_active
from fewstep.models.family import load_model, model_family
from fewstep.utils.frames import to_uint8, to_unit

from .analysers import aggregate, score_clips
from .diversity import vendi_score, video_vendi
from .features import REFERENCE_CLIPS, VideoFeatureNet, reference_stats
from .frechet import FrechetStats, frechet_distance
from .i2v import i2v_summary, score_i2v_clips
from .generic import VisionFeatures, cache_reference_stats, feature_frechet, pixel_metrics, read_captions
from fewstep.utils.io import OutputDir, write_json_atomic

from .report import write_mp4, write_report

VENDI_KEYFRAMES = 4  # K in DOLLAR Eq. 17 (at most the clip length)


@dataclass
class Generated:
    """Videos of one model: ``frames (N, T, H, W, 3)`` uint8, one prompt each."""

    frames: np.ndarray
    prompts: list[str]
    nfe: int  # network evaluations per video
    seconds: float  # wall clock of sampling + decoding, all videos
    steps: int  # sampler steps (intervals of the time grid)
    cfg_scale: float | None  # the effective CFG scale (None = no CFG)
    grid: str = "uniform"  # which time grid: "model" (the model's own times), "uniform" or "diffusers"
    times: tuple[float, ...] = ()  # the times visited, 1 … 0


def check_steps(steps) -> None:
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise UserError(f"steps={steps!r} is invalid; expected an integer >= 1")


#: Above this many steps a sampler has left what any model here was trained for (1000 timesteps).
MAX_STEPS = 1000


def check_sampling(pipe, steps: int | None, cfg_scale: float | None) -> None:
    """Refuse sampling settings with no meaning; warn on unusual ones (before any compute)."""
    if cfg_scale is not None:
        if not math.isfinite(cfg_scale) or cfg_scale < 0:
            raise UserError(f"--cfg {cfg_scale}: the guidance scale w in uncond + w·(cond − uncond) must be >= 0 "
                            f"(1 = no guidance, 0 = unconditional)")
        if cfg_scale < 1:
            warn(f"--cfg {cfg_scale} is below 1: guidance pulls samples towards the unconditional model")
        elif cfg_scale > 20:
            warn(f"--cfg {cfg_scale} is unusually strong; expect saturated, over-guided samples")
    if steps is not None and steps > MAX_STEPS:
        raise UserError(f"--steps {steps}: more than the {MAX_STEPS} timesteps the models are trained on")
    own = pipe.default_steps()
    if steps is not None and own <= 8 and steps > 4 * own:
        warn(f"--steps {steps} on a model distilled for {own} steps: slower by {steps / own:.0f}x and outside "
             f"what it was trained for")


def check_sampler(sampler: str | None, grid: str | None = None, steps: int | None = None) -> None:
    """``--sampler``: one of :data:`~fewstep.diffusion.samplers.SAMPLERS` or None (the model's own); ``--grid``: a
    named step grid (``uniform4_shift3``, ``dollar4``, …) or None, whose step count ``--steps`` must match. Checked
    before the model loads; :func:`set_sampling` applies them."""
    if sampler is not None and sampler not in SAMPLERS:
        raise UserError(f"--sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
    if grid is None:
        return
    try:
        steps_of_grid = grid_steps(grid)
    except UserError as error:
        raise UserError(f"--grid {grid!r}: {error}") from None
    if steps is not None and steps != steps_of_grid:
        raise UserError(f"--steps {steps} and --grid {grid} ({steps_of_grid} steps) disagree; give one of them")


def set_sampling(pipe, sampler: str | None, grid: str | None = None) -> None:
    """Replace the model's own sampler (e.g. a consistency student exported with Euler, sampled the
    multistep-consistency way: x̂0, then fresh noise to the next time) and/or its step times (``grid``: a named
    grid, its times on the model's schedule, then 0)."""
    update: dict = {} if sampler is None else {"sampler": sampler}
    if grid is not None:
        times = grid_times(grid, pipe.denoiser.schedule)
        update |= {"times": times, "steps": len(times) - 1}
    if update:
        pipe.sampling = pipe.sampling.model_copy(update=update)


def set_geometry(pipe, frames: int | None, height: int | None, width: int | None) -> None:
    """Apply ``--frames/--height/--width`` (each None: the model's own); a size the model cannot take is a
    one-line error."""
    if frames is None and height is None and width is None:
        return
    for flag, value in (("frames", frames), ("height", height), ("width", width)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserError(f"--{flag} {value!r} is invalid; expected an integer >= 1")
    pipe.set_geometry(frames, height, width)


def check_prompts(prompts, grammar: str | None = "toy") -> list[str]:
    """The captions as given; with the toy grammar (a toy model's ``prompt_grammar``) every prompt is
    parsed first (a UserError names the first bad word). Other models take any text."""
    if isinstance(prompts, str) or not prompts:
        raise UserError("prompts must be a non-empty list of captions")
    if grammar == "toy":
        for prompt in prompts:
            parse_prompt(prompt)
    return list(prompts)


def generate_videos(pipe, prompts: list[str], *, steps: int | None = None, cfg_scale: float | None = None,
                    seed: int = 0, batch_size: int = 32, warmup: bool = True, progress=None,
                    negative_prompt: str | None = None, images: torch.Tensor | None = None,
                    cfg_scale_2: float | None = None) -> Generated:
    """Sample ``prompts`` with ``pipe`` in batches; ``steps``/``cfg_scale`` default to the model's own;
    ``images`` ``(N, H, W, 3)`` in [−1, 1], one per prompt, condition an image-to-video model.

    Phases: validate → draw all initial noise in order → (warm-up call, untimed) → timed batches.
    ``progress(done, total)`` is called after every batch.
    """
    check_steps(steps)
    prompts = check_prompts(prompts, getattr(pipe, "prompt_grammar", None))
    if cfg_scale is not None and not math.isfinite(cfg_scale):
        raise UserError(f"cfg_scale={cfg_scale!r} is invalid; expected a finite number")
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size} is invalid; expected an integer >= 1")
    if cfg_scale_2 is not None and not (math.isfinite(cfg_scale_2) and cfg_scale_2 >= 0):
        raise UserError(f"--cfg-2 {cfg_scale_2}: the low-noise expert's guidance scale must be a finite number >= 0")
    if cfg_scale_2 is not None and len(getattr(pipe, "expert_slots", ())) < 2:  # Wan 2.2's low-noise expert
        raise UserError("--cfg-2 is the low-noise expert's CFG scale of a two-expert model (Wan 2.2); this model has "
                        "one denoiser")
    with torch.no_grad():
        pipe.encode_prompts(list(dict.fromkeys(prompts)))  # words the model does not know are a UserError here

    n = len(prompts)
    noise = torch.randn(pipe.latent_shape(n), generator=torch.Generator().manual_seed(seed))  # (N, C, T', H', W')
    visual = (lambda lo, hi: {}) if images is None else (lambda lo, hi: {"images": images[lo:hi]})
    if warmup:
        pipe.generate(prompts[:1], steps=1, cfg_scale=cfg_scale, seed=seed, noise=noise[:1], **visual(0, 1))
    chunks, seconds, nfe = [], 0.0, 0
    if progress is not None:
        progress(0, n)  # starts the clock of the ETA
    for lo in range(0, n, batch_size):
        start = time.perf_counter()
        extra = {} if negative_prompt is None else {"negative_prompt": negative_prompt}
        extra.update(visual(lo, lo + batch_size))
        if cfg_scale_2 is not None:
            extra["cfg_scale_2"] = cfg_scale_2
        frames, result = pipe.generate(prompts[lo: lo + batch_size], steps=steps, cfg_scale=cfg_scale,
                                       seed=seed + lo, noise=noise[lo: lo + batch_size], **extra)
        seconds += time.perf_counter() - start
        chunks.append(frames)
        nfe = result.nfe
        if progress is not None:
            progress(min(lo + batch_size, n), n)
    effective_cfg = pipe.sampling.cfg_scale if cfg_scale is None else cfg_scale
    times = pipe.sampling_times(steps)
    return Generated(np.concatenate(chunks), prompts, nfe, seconds, len(times) - 1,
                     float(effective_cfg) if cfg_active(effective_cfg) else None, pipe.grid_name(steps),
                     tuple(round(float(t), 4) for t in times))


def evaluate_with_samples(
    pipe,
    steps: int | None = None,
    cfg_scale: float | None = None,
    num_per_prompt: int = 4,
    prompts: list[str] = EVAL_PROMPTS,
    seed: int = 0,
    feature_net: VideoFeatureNet | None = None,
    ref_stats: FrechetStats | None = None,
    batch_size: int = 32,
    reference_clips: int = REFERENCE_CLIPS,
    progress=None,
) -> tuple[dict, dict[str, np.ndarray]]:
    """:func:`evaluate`, also returning the videos by prompt: ``{prompt: (n, T, H, W, 3) uint8}``
    (``progress(done, total)`` follows the generation batches)."""
    if not isinstance(num_per_prompt, int) or num_per_prompt < 1:
        raise UserError(f"num_per_prompt={num_per_prompt!r} is invalid; expected an integer >= 1")
    check_steps(steps)
    prompts = check_prompts(prompts)
    feature_net = feature_net or VideoFeatureNet.load()  # fail before generating when it is missing

    # 1. Generate every prompt's videos, prompt-major (an I2V model: each on its toy first frame).
    suite = [p for p in prompts for _ in range(num_per_prompt)]
    images = condition_frames(pipe, prompts, num_per_prompt) if pipe.image_conditioned else None
    gen = generate_videos(pipe, suite, steps=steps, cfg_scale=cfg_scale, seed=seed, batch_size=batch_size,
                          progress=progress, images=None if images is None else torch.from_numpy(to_unit(images)))
    N, T, H, W, _ = gen.frames.shape
    by_prompt = {p: gen.frames[i * num_per_prompt: (i + 1) * num_per_prompt] for i, p in enumerate(prompts)}

    # 2. Toy VBench dimensions and their grouping (+ VBench-I2V's, reported beside them).
    dimensions = score_clips(gen.frames, suite)
    groups = aggregate(dimensions)
    i2v = {}
    if images is not None:
        dimensions.update(score_i2v_clips(images, gen.frames))
        i2v = i2v_summary(dimensions, groups["quality"])

    # 3. Fréchet distance to real eval clips rendered at the model's geometry.
    if ref_stats is None:
        ref_stats = reference_stats(reference_clips, feature_net, frames=T, size=H)
    feats = feature_net.features(gen.frames)  # (N, d)
    fvd = frechet_distance(feats, ref_stats) if N >= 2 else float("nan")

    # 4. Diversity per prompt (DOLLAR Eq. 17), averaged over prompts.
    keyframes = min(VENDI_KEYFRAMES, T)
    vendi_pixel = np.mean([video_vendi(v, keyframes=keyframes) for v in by_prompt.values()])
    vendi_feature = np.mean([vendi_score(feats[i * num_per_prompt: (i + 1) * num_per_prompt])
                             for i in range(len(prompts))])

    # 5. JPEG compressibility (the non-differentiable reward), −kB per frame.
    from fewstep.rewards.jpeg import JpegCompressibility

    jpeg = JpegCompressibility().reward(torch.from_numpy(to_unit(gen.frames)))

    metrics = {
        "total": groups["total"], "quality": groups["quality"], "semantic": groups["semantic"],
        "dimensions": dimensions, "fvd": float(fvd), "vendi_pixel": float(vendi_pixel),
        "vendi_feature": float(vendi_feature), "nfe": gen.nfe, "seconds_per_video": gen.seconds / N,
        "steps": gen.steps, "grid": gen.grid, "times": list(gen.times), "cfg_scale": gen.cfg_scale, "num_videos": N, "num_per_prompt": num_per_prompt,
        "seed": seed, "jpeg": float(jpeg.mean()), **i2v,
    }
    return metrics, by_prompt


def condition_frames(pipe, prompts: list[str], num_per_prompt: int) -> np.ndarray:
    """``(P·n, H, W, 3)`` uint8, prompt-major: the first frame of conditioning clip j of each prompt."""
    frames, height, width = pipe.geometry
    if height != width:
        raise UserError(f"the toy evaluation renders square conditioning frames; the model makes {height}×{width} clips")
    return np.stack([condition_frame(p, j, frames, height) for p in prompts for j in range(num_per_prompt)])


def evaluate(
    pipe,
    steps: int | None = None,
    cfg_scale: float | None = None,
    num_per_prompt: int = 4,
    prompts: list[str] = EVAL_PROMPTS,
    seed: int = 0,
    feature_net: VideoFeatureNet | None = None,
    ref_stats: FrechetStats | None = None,
    batch_size: int = 32,
    reference_clips: int = REFERENCE_CLIPS,
) -> dict:
    """Toy-VBench metrics of ``pipe`` on ``prompts`` (module docstring); JSON-serialisable."""
    return evaluate_with_samples(pipe, steps, cfg_scale, num_per_prompt, prompts, seed, feature_net, ref_stats,
                                 batch_size, reference_clips)[0]


def evaluate_generic_with_samples(
    pipe,
    prompts: list[str],
    steps: int | None = None,
    cfg_scale: float | None = None,
    num_per_prompt: int = 4,
    seed: int = 0,
    features: VisionFeatures | None = None,
    ref_stats: FrechetStats | None = None,
    batch_size: int = 32,
    progress=None,
    images: torch.Tensor | None = None,
    cfg_scale_2: float | None = None,
) -> tuple[dict, dict[str, np.ndarray]]:
    """Metrics that need no toy semantics (module docstring, eval/generic.py) of ``pipe`` on ``prompts``,
    and the videos by prompt; ``fd`` when ``features`` and ``ref_stats`` are given. ``images``
    ``(len(prompts), H, W, 3)``: each prompt's condition image (an image-to-video model); ``cfg_scale_2``: Wan
    2.2's low-noise expert's CFG scale."""
    if not isinstance(num_per_prompt, int) or num_per_prompt < 1:
        raise UserError(f"num_per_prompt={num_per_prompt!r} is invalid; expected an integer >= 1")
    prompts = check_prompts(prompts, getattr(pipe, "prompt_grammar", None))

    # 1. Generate every prompt's videos, prompt-major.
    suite = [p for p in prompts for _ in range(num_per_prompt)]
    condition = None if images is None else images.repeat_interleave(num_per_prompt, dim=0)  # prompt-major
    gen = generate_videos(pipe, suite, steps=steps, cfg_scale=cfg_scale, seed=seed, batch_size=batch_size,
                          progress=progress, images=condition, cfg_scale_2=cfg_scale_2)
    N = len(gen.frames)
    by_prompt = {p: gen.frames[i * num_per_prompt: (i + 1) * num_per_prompt] for i, p in enumerate(prompts)}

    # 2. Pixel metrics per prompt (Vendi needs one prompt's samples), averaged over prompts.
    per_prompt = {p: pixel_metrics(v) for p, v in by_prompt.items()}
    means = {k: float(np.mean([m[k] for m in per_prompt.values()])) for k in ("sharpness", "flicker", "vendi")}

    # 3. Fréchet distance of the feature model's embeddings to the reference.
    fd = None
    if features is not None and ref_stats is not None:
        fd = feature_frechet(features, gen.frames, ref_stats) if N >= 2 else float("nan")

    metrics = {
        "metric_set": "generic", "sharpness": means["sharpness"], "flicker": means["flicker"],
        "vendi_pixel": means["vendi"], **({"fd": fd} if fd is not None else {}),
        "prompts": {p: {"sharpness": m["sharpness"], "flicker": m["flicker"], "vendi_pixel": m["vendi"]}
                    for p, m in per_prompt.items()},
        "nfe": gen.nfe, "seconds_per_video": gen.seconds / N, "steps": gen.steps, "grid": gen.grid,
        "times": list(gen.times), "cfg_scale": gen.cfg_scale, "num_videos": N, "num_per_prompt": num_per_prompt,
        "seed": seed,
    }
    return metrics, by_prompt


#: Extra report text for the generic metrics (the report's own notes describe the toy ones).
GENERIC_NOTE = ("<p class='note'>Metrics without toy-world semantics (eval/generic.py). Sharpness: variance of "
                "the Laplacian of luminance in [0, 1], mean over frames (higher = sharper; noise raises it too). "
                "Flicker: mean |frame<sub>t+1</sub> − frame<sub>t</sub>| in [0, 1] (lower = steadier; real motion "
                "counts too). Vendi px: DOLLAR Eq. 17 on raw pixel keyframes, per prompt. FD: Fréchet distance of "
                "the feature model's frame embeddings, averaged over each clip's frames, to real clips of the "
                "reference latent cache.</p>")


# --- the commands -------------------------------------------------------------------------------


def slug(prompt: str, limit: int | None = None) -> str:
    """A file-name piece of a caption: lower-case runs of ``[a-z0-9]`` joined by ``-`` (at most ``limit``
    characters)."""
    text = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return text if limit is None else text[:limit].rstrip("-")


def generate_to_dir(model: str, prompts: list[str], out: str | Path, *, steps: int | None = None,
                    cfg_scale: float | None = None, num: int = 1, seed: int = 0, fps: int = 8,
                    scale: int = 8, batch_size: int = 32, device: str = "cpu", overwrite: bool = False,
                    progress=None, frames: int | None = None, height: int | None = None, width: int | None = None,
                    negative_prompt: str | None = None, dtype: torch.dtype | None = None,
                    images: list[str] | None = None, cfg_scale_2: float | None = None,
                    sampler: str | None = None, grid: str | None = None) -> Path:
    """``fewstep generate``: ``num`` videos per prompt → ``out/NNN_<prompt>.mp4`` (×``scale``,
    nearest neighbour) and ``out/samples.npz`` (``frames (K, T, H, W, 3)`` uint8 at the model's
    resolution, ``prompts (K,)``), prompt-major. ``out`` is checked before anything is generated.
    ``images`` (``--image``, once or once per prompt: a PNG/JPEG file or ``toy:CAPTION``) condition an
    image-to-video model (:func:`condition_images`); ``samples.npz`` then also holds ``images (K, H, W, 3)``.
    ``sampler`` and ``grid`` replace the model's own (:func:`set_sampling`)."""
    if not isinstance(num, int) or num < 1:
        raise UserError(f"--num {num!r} is invalid; expected an integer >= 1")
    check_steps(steps)
    check_sampler(sampler, grid, steps)
    prompts = check_prompts(prompts, "toy" if model_family(model).name == "toy" else None)
    suite = [p for p in prompts for _ in range(num)]
    names = [f"{i:03d}_{slug(p)}.mp4" for i, p in enumerate(suite)] + ["samples.npz"]
    output = OutputDir(out, "generate", overwrite, names)
    output.check()
    pipe = load_model(model, device)
    if dtype is not None:  # the networks' weights; the sampler's latents stay float32
        pipe.to(dtype)
    set_geometry(pipe, frames, height, width)
    check_sampling(pipe, steps, cfg_scale)
    set_sampling(pipe, sampler, grid)
    condition = condition_images(pipe, images, prompts)
    condition = None if condition is None else condition.repeat_interleave(num, dim=0)  # (K, H, W, 3), prompt-major
    with output as stage:
        gen = generate_videos(pipe, suite, steps=steps, cfg_scale=cfg_scale, seed=seed, batch_size=batch_size,
                              warmup=False, progress=progress, negative_prompt=negative_prompt, images=condition,
                              cfg_scale_2=cfg_scale_2)
        for name, video in zip(names, gen.frames):
            write_mp4(stage / name, video, fps=fps, scale=scale)
        stored = {} if condition is None else {"images": to_uint8(condition).numpy()}
        np.savez(stage / "samples.npz", frames=gen.frames, prompts=np.array(suite, dtype=str), **stored)
    return Path(out)


def condition_images(pipe, images: list[str] | None, prompts: list[str]) -> torch.Tensor | None:
    """``--image`` values → ``(len(prompts), H, W, 3)`` float in [−1, 1] for an image-to-video model, None for
    a text-to-video one. Each value is a PNG/JPEG file at the model's size (utils/images) or ``toy:CAPTION``,
    the first frame of a toy clip of CAPTION (data/toyworld.condition_frame); one value serves every prompt.
    An I2V model without ``--image``, a T2V model with one: one-line errors."""
    from fewstep.models.family import no_image_input
    from fewstep.utils.images import load_condition_image

    if not pipe.image_conditioned:
        if images:
            raise no_image_input(pipe)
        return None
    if not images:
        raise UserError("this model is image-to-video: give the condition image with --image FILE (a PNG/JPEG at "
                        "the model's size) or --image toy:CAPTION (the first frame of a toy clip)")
    if len(images) not in (1, len(prompts)):
        raise UserError(f"--image given {len(images)} times; expected once or once per --prompt ({len(prompts)})")
    _, height, width = pipe.geometry
    loaded = {}
    for spec in dict.fromkeys(images):
        if spec.startswith("toy:"):
            if height != width:
                raise UserError(f"--image {spec}: toy clips are square; the model makes {height}×{width} clips")
            caption = str(parse_prompt(spec[4:].strip()))  # a caption outside the toy grammar: one line
            loaded[spec] = torch.from_numpy(to_unit(condition_frame(caption, frames=pipe.geometry.frames, size=height)))
        else:
            loaded[spec] = load_condition_image(spec, height, width)
    specs = images * len(prompts) if len(images) == 1 else images
    return torch.stack([loaded[s] for s in specs])  # (P, H, W, 3)


def evaluate_to_dir(model: str, out: str | Path, *, steps: int | None = None, cfg_scale: float | None = None,
                    num: int = 4, seed: int = 0, features: str | None = None, batch_size: int = 32,
                    label: str | None = None, device: str = "cpu", overwrite: bool = False,
                    progress=None, frames: int | None = None, height: int | None = None,
                    width: int | None = None, prompts: str | Path | None = None,
                    reference: str | Path | None = None, reference_clips: int = 64,
                    dtype: torch.dtype | None = None, images: list[str] | None = None,
                    cfg_scale_2: float | None = None, sampler: str | None = None,
                    grid: str | None = None) -> dict:
    """``fewstep eval``: ``out/metrics.json`` and ``out/report.html`` (+ ``out/gifs/``); ``out`` is
    checked before anything is generated. ``sampler`` and ``grid`` replace the model's own (:func:`set_sampling`).

    A toy model gets the toy VBench (:func:`evaluate_with_samples`) on ``prompts`` (a text file; default
    the eval prompts) with the ``features`` feature net (default the shipped ``toy-features``). Any other
    model gets the generic metrics (:func:`evaluate_generic_with_samples`) on ``prompts`` (required), with
    a Fréchet distance when ``features`` (a CLIP or DINOv2 directory) and ``reference`` (a latent cache of
    real clips, its first ``reference_clips`` decoded by the model) are given; an image-to-video one also needs
    ``images`` (``--image``, once or once per prompt, as ``fewstep generate``). ``cfg_scale_2``: Wan 2.2's
    low-noise expert's CFG scale. A toy image-to-video model is conditioned on each eval prompt's own toy clip's
    first frame (eval/i2v.py), so it takes no ``--image``."""
    if not isinstance(num, int) or num < 1:
        raise UserError(f"--num {num!r} is invalid; expected an integer >= 1")
    check_steps(steps)
    check_sampler(sampler, grid, steps)
    toy = model_family(model).name == "toy"
    captions = read_captions(prompts) if prompts is not None else None
    if toy:
        if reference is not None:
            raise UserError("--reference is for models outside the toy world; a toy model's FVD compares with "
                            "rendered eval clips (eval/features.py)")
        captions = check_prompts(captions if captions is not None else EVAL_PROMPTS, "toy")
        if images:
            raise UserError("--image is for models outside the toy world; a toy image-to-video model is evaluated "
                            "on each eval prompt's own first frame")
        if cfg_scale_2 is not None:
            raise UserError("--cfg-2 is the low-noise expert's CFG scale of a two-expert model (Wan 2.2); a toy "
                            "model has one denoiser")
    else:
        if captions is None:
            raise UserError(f"--model {model} is not a toy-world model: give --prompts FILE (one caption per line) "
                            f"to evaluate it on")
        if (features is None) != (reference is None):
            raise UserError("--features and --reference go together: a Fréchet distance needs a CLIP or DINOv2 "
                            "model directory (--features) and a latent cache of real clips (--reference, made by "
                            "fewstep cache --videos)")
        if reference_clips < 2:
            raise UserError(f"--reference-clips {reference_clips}: expected an integer >= 2")
    output = OutputDir(out, "eval", overwrite, ["metrics.json", "report.html", "gifs"])
    output.check()
    vision_net = cache = None
    if not toy and features is not None:
        vision_net = VisionFeatures.load(features, device)  # fail before loading the video model
        cache = _reference_cache(reference)
    pipe = load_model(model, device)
    if dtype is not None:
        pipe.to(dtype)
    set_geometry(pipe, frames, height, width)
    check_sampling(pipe, steps, cfg_scale)
    set_sampling(pipe, sampler, grid)
    condition = None if toy else condition_images(pipe, images, captions)
    name = label or Path(str(model)).name
    if toy:
        feature_net = VideoFeatureNet.load(features or "toy-features")
        with output as stage:
            metrics, by_prompt = evaluate_with_samples(pipe, steps, cfg_scale, num, captions, seed=seed,
                                                       feature_net=feature_net, batch_size=batch_size,
                                                       progress=progress)
            metrics = {"model": str(model), "sampler": pipe.sampling.sampler, **metrics}
            write_json_atomic(stage / "metrics.json", metrics)
            write_report(stage, [(name, metrics, by_prompt)])
        return metrics

    ref_stats = None
    if cache is not None:
        cache.check_model(pipe)
        with torch.no_grad():
            ref_stats = cache_reference_stats(cache, pipe, vision_net, reference_clips)
    with output as stage:
        metrics, by_prompt = evaluate_generic_with_samples(pipe, captions, steps, cfg_scale, num, seed=seed,
                                                           features=vision_net, ref_stats=ref_stats, batch_size=batch_size,
                                                           progress=progress, images=condition,
                                                           cfg_scale_2=cfg_scale_2)
        metrics = {"model": str(model), "sampler": pipe.sampling.sampler, **metrics,
                   **({"features": str(features), "reference": str(reference)} if features is not None else {})}
        write_json_atomic(stage / "metrics.json", metrics)
        H, W = next(iter(by_prompt.values())).shape[2:4]
        write_report(stage, [(name, metrics, by_prompt)], scale=max(1, 128 // max(H, W)),
                     sections=[("About the metrics", GENERIC_NOTE)])
    return metrics


def _reference_cache(reference) -> LatentCache:
    """The latent cache of real clips behind ``--reference`` (complete, with clips)."""
    cache = LatentCache(reference)
    if cache.text_only:
        raise UserError(f"--reference {reference}: {cache.where} is text-only; the Fréchet reference needs real "
                        f"clips (fewstep cache --videos)")
    return cache
