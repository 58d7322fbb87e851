"""Periodic evaluators by config: a recipe's ``evaluator:`` block names one, the recipe builds it and
hands it to the engine (:class:`~fewstep.engine.evaluation.Evaluator`; the engine imports none).

``evaluator: {kind: toy_vbench}`` (the default) — every ``train.eval_every`` steps, the student
samples the first ``train.eval_prompts`` of ``toyworld.EVAL_PROMPTS``, ``train.eval_samples``
samples each with the fixed seeds of ``toyworld.eval_suite``: with the student's own sampler
(the run's ``generator:``, as exported) unless ``train.eval_steps`` lists step counts, one
evaluation per count on the model's default grid. The clips are scored with the toy VBench analysers (``score_clips`` +
``aggregate``), checked against reference videos of the same prompts and seeds (diversity,
static, constant; :mod:`fewstep.engine.health`) — the teacher's own samples when the recipe has
a teacher, else toy-world clips — and logged. It needs a toy model (captions in the toy grammar). An
image-to-video model (and its teacher) samples each (prompt, seed) on the first frame of the toy clip of
that prompt and seed — the first frame of the toy-world reference clip — and is also scored on
VBench-I2V's i2v_subject and i2v_background (eval/i2v.py).

``evaluator: {kind: videos, prompts: FILE}`` — any model (a real teacher's student): the same
sampling on the first ``train.eval_prompts`` captions of ``prompts``, scored with metrics that need
no toy semantics (:mod:`fewstep.eval.generic`: sharpness, flicker, Vendi, and a Fréchet distance on
the features of a local CLIP/DINOv2 model when ``features`` is set), the samples written as mp4s in
``RUN/evals/step_XXXXXX/`` (:class:`VideoEvaluator`).

A new evaluator is a config class with ``kind``, ``build(...)`` and ``example_prompt()``,
registered with :func:`register_evaluator`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from ..config import KindRegistry, StrictModel
from ..data.cache import LatentCache
from ..data.toyworld import EVAL_PROMPTS, eval_suite, render_clip
from ..engine.config import TrainConfig
from ..engine.evaluation import EvalResult, Evaluator
from ..engine.health import HealthMonitor
from ..errors import UserError
from ..eval.analysers import aggregate, score_clips
from ..eval.frechet import FrechetStats
from ..eval.i2v import score_i2v_clips
from ..eval.generic import (VisionFeatures, cache_reference_stats, feature_frechet, pixel_metrics, read_captions,
                            vision_model_class)
from ..eval.report import write_mp4
from ..eval.runner import check_prompts, slug
from ..models.family import VideoModel
from ..utils.frames import to_unit

#: ``(prompt, seeds) -> (n, T, H, W, 3) uint8`` videos the student's samples are compared with.
ReferenceFn = Callable[[str, list[int]], np.ndarray]


class EvaluatorConfig(StrictModel):
    """Base of an evaluator's config: ``kind`` is its registered name."""

    kind: str

    def build(self, train: TrainConfig, monitor: HealthMonitor, model: VideoModel,
              teacher: VideoModel | None) -> Evaluator:
        """``model``: the recipe's model (its geometry); ``teacher``: the reference sampler, if any."""
        raise NotImplementedError

    def check(self, grammar: str | None, has_teacher: bool) -> None:
        """Refuse, in one line, an evaluator that cannot work with a model of prompt grammar ``grammar``
        (its ``prompt_grammar``: "toy" or None) and a recipe with or without a teacher. ``fewstep distill``
        calls it before it writes anything, from the model's family alone (recipes/launch.py); ``build``
        calls it too."""

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
        self.check(getattr(model, "prompt_grammar", None), teacher is not None)
        if teacher is not None:
            reference = teacher_reference(teacher)
        else:
            frames, height, _ = model.geometry
            reference = toy_world_reference(frames, height)
        return ToyVBench(train, monitor, reference)

    def check(self, grammar: str | None, has_teacher: bool) -> None:
        if grammar != "toy":
            raise UserError("evaluator kind 'toy_vbench' scores toy-world clips and this model is not a toy model; "
                            "use evaluator: {kind: videos, prompts: FILE} (a text file, one caption per line)")

    def example_prompt(self) -> str:
        return EVAL_PROMPTS[0]


def first_frames(model: VideoModel, prompts: list[str], seeds: list[int]) -> np.ndarray | None:
    """``(N, H, W, 3)`` uint8 condition images of an image-to-video model: the first frame of the toy clip of
    each (prompt, seed); None for a text-to-video model."""
    if not model.image_conditioned:
        return None
    frames, size, _ = model.geometry
    return np.stack([render_clip(prompt, seed, frames, size)[0][0] for prompt, seed in zip(prompts, seeds)])


def _images(first: np.ndarray | None) -> dict:
    """``generate``'s ``images=`` keyword for condition images ``first`` (none for a text-to-video model)."""
    return {} if first is None else {"images": torch.from_numpy(to_unit(first))}


def teacher_reference(teacher: VideoModel) -> ReferenceFn:
    """The teacher's own default sampler on the eval seeds (an I2V teacher on the seeds' first frames)."""
    def reference(prompt: str, seeds: list[int]) -> np.ndarray:
        images = _images(first_frames(teacher, [prompt] * len(seeds), seeds))
        videos, _ = teacher.generate([prompt] * len(seeds), noise=seeded_noise(teacher, seeds), **images)
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
        first = first_frames(model, prompts, seeds)  # (N, H, W, 3) of an image-to-video model, else None
        results, issues, record = {}, [], {}
        for steps in self.steps:
            n_steps = model.default_steps() if steps is None else steps
            videos, _ = model.generate(prompts, steps=steps, noise=noise, **_images(first))  # (N, T, H, W, 3) uint8
            scores = score_clips(videos, prompts)
            scores.update(aggregate(scores))
            if first is not None:
                scores.update(score_i2v_clips(first, videos))
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


# ---------------------------------------------------------------------------------------------
# videos
# ---------------------------------------------------------------------------------------------

@register_evaluator
class VideosConfig(EvaluatorConfig):
    """Metrics without toy semantics on the user's captions, mp4s of the samples (module doc,
    :class:`VideoEvaluator`); its counts are the ``train.eval_*`` keys."""

    kind: Literal["videos"] = "videos"
    prompts: str | list[str] = Field(description="captions: a text file (one per line) or a list; the first "
                                                 "train.eval_prompts are sampled")
    fps: int = Field(16, ge=1, description="frame rate of the mp4s written")
    features: str | None = Field(None, description="a local CLIP (vision) or DINOv2 model directory: Fréchet "
                                                   "distance of its features to the reference; null = none")
    reference: str | None = Field(None, description=(
        "Fréchet reference: a latent cache of real clips (fewstep cache --videos); null = the teacher's samples "
        "of the eval prompts"))
    reference_clips: int = Field(64, ge=2, description="clips of the reference cache decoded for its statistics")

    @model_validator(mode="after")
    def _check_files(self) -> VideosConfig:
        """What can be checked without the model (on --dry-run too): the captions, the feature model's
        kind, the reference cache (complete, with clips)."""
        self.captions()
        if self.features is not None:
            vision_model_class(self.features, "config key 'evaluator.features':")
        if self.reference is not None:
            if self.features is None:
                raise UserError("config key 'evaluator.reference': the reference is for the Fréchet distance; set "
                                "evaluator.features too (a CLIP or DINOv2 model directory)")
            self.reference_cache()
        return self

    def captions(self) -> list[str]:
        if isinstance(self.prompts, str):
            return read_captions(self.prompts, "config key 'evaluator.prompts':")
        captions = [c.strip() for c in self.prompts]
        if not captions or not all(captions):
            raise UserError("config key 'evaluator.prompts': expected a text file (one caption per line) or a "
                            "non-empty list of non-empty captions")
        return captions

    def reference_cache(self) -> LatentCache:
        try:
            cache = LatentCache(self.reference)
        except UserError as err:
            raise UserError(f"config key 'evaluator.reference': {err}") from None
        if cache.text_only:
            raise UserError(f"config key 'evaluator.reference': {cache.where} is text-only; the Fréchet reference "
                            f"needs real clips (fewstep cache --videos)")
        return cache

    def check(self, grammar: str | None, has_teacher: bool) -> None:
        check_prompts(self.captions(), grammar)  # a toy model: its grammar
        if self.features is not None and self.reference is None and not has_teacher:
            raise UserError("config key 'evaluator.features': a Fréchet distance needs a reference: set "
                            "evaluator.reference (a latent cache of real clips, fewstep cache --videos) or train "
                            "with a teacher role, whose samples of the eval prompts are the reference")

    def build(self, train: TrainConfig, monitor: HealthMonitor, model: VideoModel,
              teacher: VideoModel | None) -> Evaluator:
        self.check(getattr(model, "prompt_grammar", None), teacher is not None)
        cache = None
        if self.reference is not None:
            cache = self.reference_cache()
            cache.check_model(model)  # its VAE and geometry (needs the loaded model: refused once RUN/ exists)
        features = (VisionFeatures.load(self.features, what="config key 'evaluator.features':")
                    if self.features is not None else None)
        return VideoEvaluator(self, train, monitor, features, cache,
                              teacher_reference(teacher) if teacher is not None else None)

    def example_prompt(self) -> str:
        return self.captions()[0]


#: Clips whose larger side is below this are upscaled (nearest neighbour) in the mp4s so players show them.
MP4_MIN_SIDE = 256
#: Frames per sample in the logged frame strips (evenly spaced).
LOGGED_FRAMES = 8


class VideoEvaluator:
    """The ``videos`` evaluator. Every evaluation, for each step count (the student's own sampler, or
    each of ``train.eval_steps``):

    1. samples caption ``p`` of the first ``train.eval_prompts`` with seeds ``k = 0 … S − 1``
       (``S = train.eval_samples``, one noise tensor per seed: :func:`seeded_noise`) and writes
       ``RUN/evals/step_XXXXXX/NNN_<slug>_sK.mp4`` (``NNN = p``; ``_<n>step`` before ``.mp4`` when
       ``train.eval_steps`` lists counts) at ``fps``, upscaled only below :data:`MP4_MIN_SIDE`;
       logs :data:`LOGGED_FRAMES` frames of each sample;
    2. scores each caption's samples (:func:`~fewstep.eval.generic.pixel_metrics`: sharpness, flicker,
       Vendi) and, with a teacher, checks their health against the teacher's samples of the same caption
       and seeds (sampled once; :meth:`~fewstep.engine.health.HealthMonitor.check_samples`);
    3. with ``features``: the Fréchet distance of all ``P·S`` samples' features to the reference — the
       first ``reference_clips`` of the latent cache decoded once with the model's decoder (statistics
       kept in ``RUN/evals/reference_<key>.npz``), else the teacher's samples of step 2.

    ``scores`` are the means over captions (+ ``fd``), logged as ``eval/<n>step/<metric>``; the report
    has them, the per-caption metrics and health statistics, and the mp4 paths (relative to RUN). The run
    directory is the logger's ``run_dir``; a logger without one gets no files.
    """

    def __init__(self, config: VideosConfig, train: TrainConfig, monitor: HealthMonitor,
                 features: VisionFeatures | None, cache: LatentCache | None, reference: ReferenceFn | None):
        self.config, self.monitor = config, monitor
        self.steps = list(train.eval_steps) if train.eval_steps else [None]  # None: the model's own sampler
        self.prompts = config.captions()[:train.eval_prompts]
        self.seeds = list(range(train.eval_samples))
        self.features, self.cache, self.reference = features, cache, reference
        self._teacher: dict[str, np.ndarray] = {}
        self._stats: FrechetStats | None = None

    def teacher_videos(self, prompt: str) -> np.ndarray:
        """``(S, T, H, W, 3)`` uint8: the teacher's samples of ``prompt`` on the eval seeds (sampled once)."""
        if prompt not in self._teacher:
            self._teacher[prompt] = self.reference(prompt, self.seeds)
        return self._teacher[prompt]

    @torch.no_grad()
    def __call__(self, model: VideoModel, step: int, logger) -> EvalResult:
        run_dir = getattr(logger, "run_dir", None)
        noise = seeded_noise(model, self.seeds)  # (S, C, T', H', W')
        results, issues, record = {}, [], {}
        for steps in self.steps:
            n_steps = model.default_steps() if steps is None else steps
            suffix = "" if steps is None else f"_{n_steps}step"
            per_prompt, clips, files = {}, [], []
            for p, prompt in enumerate(self.prompts):
                videos, _ = model.generate([prompt] * len(self.seeds), steps=steps, noise=noise)  # (S, T, H, W, 3)
                if run_dir is not None:
                    files += self._write(Path(run_dir), step, p, prompt, videos, suffix)
                frames = np.round(np.linspace(0, videos.shape[1] - 1, min(LOGGED_FRAMES, videos.shape[1])))
                logger.frames(f"samples_{n_steps}step/{prompt}", videos[:, frames.astype(int)], step)
                stats = pixel_metrics(videos)
                if self.reference is not None:
                    found, health = self.monitor.check_samples(prompt, videos, self.teacher_videos(prompt),
                                                               label=f"{n_steps}-step samples of ")
                    issues += found
                    stats.update(health)
                per_prompt[prompt] = stats
                clips.append(videos)
            scores = {k: float(np.mean([s[k] for s in per_prompt.values()])) for k in ("sharpness", "flicker", "vendi")}
            if self.features is not None:
                scores["fd"] = self.frechet(model, np.concatenate(clips), run_dir)
            results[str(n_steps)] = {"scores": scores, "prompts": per_prompt, "videos": files}
            record.update({f"eval/{n_steps}step/{k}": v for k, v in scores.items()})
        return EvalResult(record, issues, {"results": results})

    def _write(self, run_dir: Path, step: int, p: int, prompt: str, videos: np.ndarray, suffix: str) -> list[str]:
        """The mp4s of one caption's samples (each written under a temporary name, then renamed)."""
        where = Path("evals") / f"step_{step:06d}"
        (run_dir / where).mkdir(parents=True, exist_ok=True)
        scale = max(1, MP4_MIN_SIDE // max(videos.shape[2:4]))
        files = []
        for k, video in zip(self.seeds, videos):
            name = f"{p:03d}_{slug(prompt, 60) or 'prompt'}_s{k}{suffix}.mp4"
            partial = run_dir / where / f".{name}.partial.mp4"
            write_mp4(partial, video, fps=self.config.fps, scale=scale)
            partial.replace(run_dir / where / name)
            files.append((where / name).as_posix())
        return files

    def frechet(self, model: VideoModel, videos: np.ndarray, run_dir) -> float:
        """Fréchet distance of ``videos``' features to the reference statistics (fitted on first use)."""
        self.features.to(next(model.parameters()).device)
        try:
            if self._stats is None:
                if self.cache is not None:
                    self._stats = cache_reference_stats(self.cache, model, self.features, self.config.reference_clips,
                                                        stats_dir=Path(run_dir) / "evals" if run_dir else None)
                else:
                    teacher = np.concatenate([self.teacher_videos(p) for p in self.prompts])
                    self._stats = FrechetStats.from_features(self.features.features(teacher))
            return feature_frechet(self.features, videos, self._stats)
        finally:
            self.features.to("cpu")
