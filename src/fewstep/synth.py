"""``fewstep synth``: write a teacher trajectory store (AccVideo's SynVid, papers/002 §4.1, Eq. 5).

The teacher's Euler solver runs with CFG from seeded noise and keeps, per sample ``i``, the
latents at AccVideo's key timesteps (§4.2) — or, with ``--keep all``, the whole path — on the
solver grid of :func:`~fewstep.data.trajectories.solver_grid`, which contains every key time::

    l_{t_N} = z_i ~ N(0, I)                                               (noise of sample i)
    l_{t_{j−1}} = l_{t_j} + (σ(t_{j−1}) − σ(t_j))·v̂(l_{t_j}, t_j, T_i)     (AccVideo Eq. 5; CFG w)
    stored:  l at t ∈ {1, 0.9651, 0.9130, 0.8235, 0.6363, 0}             (``--keep all``: every t_j)

(Eq. 5 writes the step in ``t``; ours is :func:`~fewstep.diffusion.samplers.sample_euler`,
which steps in σ(t) — the same thing for an unshifted flow-matching teacher, and the DDIM step
for a VP one.) The latent at ``t = 1`` *is* the initial noise ``z_i``, so the noise is stored once,
as the first latent of the path.

**Determinism.** Sample ``i`` is a pure function of ``(seed, i)``: its noise comes from a
generator seeded by ``(seed, i)`` alone and its prompt is prompt ``i`` (``--prompts toy``: the toy
world's training caption of index ``i``; a file: line ``i mod P`` of its ``P`` non-empty lines).
Samples are generated in shards of ``shard_size`` consecutive indices, each in fixed batches
aligned to the shard's start, so a resumed run produces bit-identical shards. The teacher solves
with its own (float32) encoding of each batch's captions, exactly as before the text table existed;
the store keeps each distinct caption's encoding once, in the store dtype (``--dtype auto``:
bfloat16 for a real teacher, float32 for the toy one, whose stored results are thus unchanged).
The store format, its resume and integrity rules are :mod:`fewstep.data.trajectories`'.

**A latent cache as the prompts** (``--prompts CACHE``, a directory made by ``fewstep cache`` with the
teacher): sample ``i`` takes clip ``i mod N``'s caption and, for an image-to-video teacher, that real clip's
stored first-frame condition — AccVideo's and SwiftVideo's I2V setting, trajectories from real first frames.
The cache must have been built with this teacher (its encoders and shapes, checked first).

**Image-to-video teachers** solve each sample on its own condition image: with ``--prompts toy``, the first
frame of the toy world's training clip ``i`` (the clip of caption ``i``); with ``--prompts CACHE``, the
stored condition of clip ``i mod N``; the visual extras (``encode_images``) are stored per sample in the
shards and served back with the caption. A prompt file gives no images: an image-to-video teacher takes
``--prompts toy`` or a cache.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .data.cache import MANIFEST as CACHE_MANIFEST
from .data.toyworld import ToyWorld
from .data.trajectories import (DTYPES, FORMAT, MANIFEST, TEXTS, Keep, StoreSettings, TrajectoryStore, key_indices,
                                read_manifest, solver_grid)
from .diffusion.samplers import sample_euler
from .errors import UserError
from .models.denoiser import cfg_active
from .models.family import SHIPPED, load_model
from .utils.io import check_writable

_SEED_TAG = 0x5E1D  # keeps synth noise seeds apart from other SeedSequence users of (seed, i)
#: ``--dtype`` → the store dtype (``auto`` is resolved by the teacher: :func:`store_dtype`).
DTYPE_CHOICES = {"auto": None, "bf16": "bfloat16", "fp32": "float32"}


def _noise_seed(seed: int, index: int) -> int:
    """63-bit seed of sample ``index``'s noise, a function of ``(seed, index)`` only."""
    (word,) = np.random.SeedSequence([_SEED_TAG, seed, index]).generate_state(1, dtype=np.uint64)
    return int(word) >> 1


def sample_noise(shape: Sequence[int], seed: int, indices: Sequence[int]) -> Tensor:
    """``(B, *shape)`` float32 noise; row ``b`` drawn from its own generator seeded by ``(seed, indices[b])``."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(_noise_seed(seed, i)))
                        for i in indices])


class PromptSource:
    """Prompt ``i`` of a run: the toy world's training caption ``i`` (``"toy"``), line ``i mod P`` of a file, or
    the caption of clip ``i mod N`` of a latent cache (with its stored first-frame condition; module doc)."""

    def __init__(self, spec: str):
        self.spec = spec
        self.lines: list[tuple[int, str]] = []  # (line number, prompt) of the file's non-empty lines
        self.sha256: str | None = None
        self.cache = None
        if spec == "toy":
            self.world = ToyWorld("train", length=2**62)
            return
        path = Path(spec)
        if path.is_dir() and (path / CACHE_MANIFEST).is_file():
            from .data.cache import LatentCache

            self.cache = LatentCache(path)
            self.sha256 = hashlib.sha256((path / CACHE_MANIFEST).read_bytes()).hexdigest()
            return
        if path.is_dir():
            raise UserError(f"--prompts {spec}: a directory that is not a latent cache (no {CACHE_MANIFEST}; make "
                            f"one with `fewstep cache`), or give 'toy' or a text file with one prompt per line")
        if not path.is_file():
            raise UserError(f"--prompts {spec}: no such file (give 'toy' or a text file with one prompt per line)")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise UserError(f"--prompts {spec} is not UTF-8 text (byte {err.start})") from None
        self.lines = [(n + 1, line.strip()) for n, line in enumerate(text.splitlines()) if line.strip()]
        if not self.lines:
            raise UserError(f"--prompts {spec}: the file holds no prompt (one prompt per line)")
        self.sha256 = hashlib.sha256(text.encode()).hexdigest()

    def __getitem__(self, index: int) -> str:
        if self.spec == "toy":
            return self.world.prompt_and_seed(index)[0]
        if self.cache is not None:
            return self.captions[index % len(self.captions)]
        return self.lines[index % len(self.lines)][1]

    @functools.cached_property
    def captions(self) -> list[str]:
        """A cache's captions, clip by clip."""
        return [c for j in range(len(self.cache.shards)) for c in self.cache.load_shard(j)["captions"]]

    def check(self, pipeline, num: int) -> None:
        """Every prompt the first ``num`` samples use parses, and an image-to-video model has its images
        (before anything is written); a cache was built with ``pipeline`` (same encoders and shapes)."""
        if self.cache is not None:
            self.cache.check_model(pipeline)  # an I2V model and a cache without first frames: one line
            return
        if pipeline.image_conditioned and self.spec != "toy":
            raise UserError(f"--prompts {self.spec}: an image-to-video model samples each prompt on a condition "
                            f"image; use --prompts toy (each sample on the first frame of its toy clip) or a latent "
                            f"cache of clips (fewstep cache --videos, each sample on its clip's first frame)")
        if self.spec != "toy":
            self.encode(pipeline, range(min(num, len(self.lines))))

    def images(self, pipeline, indices: Sequence[int]) -> Tensor:
        """``(B, H, W, 3)`` in [−1, 1]: the first frames of the toy world's training clips ``indices`` (whose
        captions are prompts ``indices``) at the model's geometry, on its device."""
        if self.cache is not None:
            raise UserError(f"--prompts {self.spec}: a latent cache holds each clip's encoded condition, not its "
                            f"image; preference pairs of an image-to-video model take --prompts toy")
        frames, height, _ = pipeline.geometry
        world = ToyWorld("train", frames=frames, size=height, length=2**62)  # captions as self.world's
        return world.batch(list(indices))["frames"][:, 0].to(next(pipeline.parameters()).device)

    def visual(self, pipeline, indices: Sequence[int]) -> dict[str, Tensor]:
        """The visual extras (``encode_images``) of samples ``indices`` for an image-to-video model; ``{}``
        for a text-to-video one."""
        if not pipeline.image_conditioned:
            return {}
        device = next(pipeline.parameters()).device
        if self.cache is not None:  # the stored condition of clips i mod N (checked to fit by check())
            rows = self.cache.samples([i % len(self.cache) for i in indices])
            return {name: rows[f"extra.{name}"].to(device=device, dtype=torch.float32)
                    for name in self.cache.settings.visual}
        with torch.no_grad():
            return pipeline.encode_images(self.images(pipeline, indices))

    def table(self, num: int) -> tuple[list[str], list[int]]:
        """The distinct prompts of samples ``0 … num − 1`` in order of first use (the text table's rows)
        and each sample's row: ``prompts[i] == captions[rows[i]]``."""
        first: dict[str, int] = {}
        rows = [first.setdefault(self[i], len(first)) for i in range(num)]
        return list(first), rows

    def encode(self, pipeline, indices: Sequence[int]):
        """``(prompts, Conditioning)`` of ``indices`` through ``pipeline``'s text encoder."""
        prompts = [self[i] for i in indices]
        return prompts, self.encode_texts(pipeline, prompts)

    @property
    def label(self) -> str:
        """The prompts as a store records them: ``toy``, or the file's or cache's absolute path."""
        return self.spec if self.spec == "toy" else str(Path(self.spec).resolve())

    def encode_texts(self, pipeline, prompts: list[str]):
        """The ``Conditioning`` of ``prompts`` (a prompt the text encoder refuses: a one-line error naming the file)."""
        try:
            with torch.no_grad():
                return pipeline.encode_prompts(prompts)
        except UserError as err:
            if self.spec == "toy":
                raise
            raise UserError(f"--prompts {self.spec}: {err}") from None


def store_dtype(choice: str, pipeline) -> str:
    """The store dtype of ``--dtype choice``: ``auto`` is float32 for the toy model (its results stay as
    they were) and bfloat16 for any other teacher (half the bytes of float32)."""
    if DTYPE_CHOICES[choice] is not None:
        return DTYPE_CHOICES[choice]
    return "float32" if getattr(pipeline, "prompt_grammar", None) == "toy" else "bfloat16"


def _table_rows(source: PromptSource, pipeline, dtype: torch.dtype):
    """``captions → {context (b, L, D), mask (b, L), extra.<name> (b, …)}`` on the CPU, in the store dtype."""
    def encode(captions: list[str]) -> dict[str, Tensor]:
        cond = source.encode_texts(pipeline, captions)
        mask = cond.mask if cond.mask is not None else torch.ones(cond.context.shape[:2], dtype=torch.bool)
        return {"context": cond.context.to("cpu", dtype), "mask": mask.to("cpu", torch.bool),
                **{f"extra.{name}": value.to("cpu", dtype) for name, value in cond.extra.items()}}
    return encode


def _check_same(found: StoreSettings, wanted: StoreSettings, out: Path) -> None:
    end = "rerun with the same settings to continue it, or choose another --out"
    for name in StoreSettings.model_fields:
        a, b = getattr(found, name), getattr(wanted, name)
        if name == "prompts_sha256" and a != b:
            raise UserError(f"--out {out} holds a trajectory store of other prompts ({found.prompts} had sha256 "
                            f"{str(a)[:12]}…, now {str(b)[:12]}…); {end}")
        if a != b:
            show = (lambda v: f"{v[:3]}…" if isinstance(v, list) and len(v) > 3 else repr(v))
            raise UserError(f"--out {out} holds a trajectory store made with {name}={show(a)} (this run: {show(b)}); "
                            f"{end}")


def synthesize(teacher: str | Path, out: str | Path, num: int, *, prompts: str = "toy", steps: int = 50,
               cfg_scale: float | None = None, keep: Keep = "keys", seed: int = 0, batch_size: int = 16,
               shard_size: int = 256, dtype: str = "auto", device: str | torch.device = "cpu",
               progress: Callable[[str, int, int, dict], None] | None = None,
               overwrite: bool = False) -> TrajectoryStore:
    """Synthesize (or continue, or verify) the store at ``out``; see the module doc.

    Everything is checked before the first write: ``out`` is writable, every prompt of the run
    parses. A store with no sample written yet is not kept as a store (a corrected rerun starts
    afresh); ``overwrite`` replaces a store (only its manifest, text table and shards; other files are kept).

    ``teacher``: a shipped model name or a model directory (:func:`~fewstep.models.family.load_model`);
    ``cfg_scale``: CFG w in ``uncond + w·(cond − uncond)``, default the teacher's own (1 or None: no CFG);
    ``keep``: ``keys`` (the six key timesteps) or ``all`` (the whole solver path);
    ``dtype``: of the stored latents and caption tensors, ``auto`` (:func:`store_dtype`), ``bf16`` or ``fp32``.
    """
    for name, value, least in (("--num", num, 1), ("--batch-size", batch_size, 1), ("--shard-size", shard_size, 1),
                               ("--seed", seed, 0)):
        if value < least:
            raise UserError(f"{name} {value} is invalid; expected an integer >= {least}")
    if keep not in ("keys", "all"):
        raise UserError(f"--keep must be 'keys' or 'all', got {keep!r}")
    if dtype not in DTYPE_CHOICES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    out = Path(out)
    check_writable(out)
    if not (out / MANIFEST).is_file() and out.exists() and any(out.iterdir()):  # before the teacher loads
        raise UserError(f"--out {out} exists and is not a trajectory store (no {MANIFEST}); choose an empty or new "
                        f"directory")
    grid = solver_grid(steps)  # (steps + 1,) decreasing, contains KEY_TIMES
    source = PromptSource(prompts)
    pipe = load_model(teacher, device)
    source.check(pipe, num)
    cfg_scale = pipe.sampling.cfg_scale if cfg_scale is None else cfg_scale
    guided = cfg_active(cfg_scale)
    keep_index = list(range(len(grid))) if keep == "all" else key_indices(grid)
    latent_shape = list(pipe.latent_shape(1)[1:])
    captions, text_rows = source.table(num)  # the text table's rows; sample i uses row text_rows[i]
    probe = source.encode(pipe, [0])[1]
    dtype = store_dtype(dtype, pipe)
    settings = StoreSettings(
        teacher=str(teacher) if str(teacher) in SHIPPED else str(Path(teacher).resolve()),
        prompts=source.label, prompts_sha256=source.sha256, num=num, seed=seed, steps=steps,
        cfg_scale=cfg_scale if guided else None,
        keep=keep, shard_size=shard_size, grid=grid.tolist(), times=grid[keep_index].tolist(),
        latent_shape=latent_shape, text_shape=list(probe.context.shape[1:]), dtype=dtype, num_texts=len(captions),
        extra_shapes={name: list(value.shape[1:]) for name, value in probe.extra.items()},
        visual_shapes={name: list(value.shape[1:]) for name, value in source.visual(pipe, [0]).items()})

    # 1. open the store (same settings, same text table) or create it with its text table; drop
    #    leftovers of an interrupted write
    replaced = (out / MANIFEST).is_file() and (overwrite or not read_manifest(out).shards)
    if replaced:
        for f in [out / MANIFEST, out / TEXTS, *out.glob("shard_*.safetensors"), *out.glob(".*.tmp")]:
            f.unlink(missing_ok=True)  # only the store's own files
    for leftover in out.glob(".*.tmp"):
        leftover.unlink()
    if (out / MANIFEST).is_file():
        found = read_manifest(out)
        if found.format != FORMAT:
            raise UserError(f"--out {out} holds a format-{found.format} trajectory store (an older fewstep's): it "
                            f"trains as it is; to continue or change it, synthesize it again with --overwrite")
        _check_same(found.settings, settings, out)
        store = TrajectoryStore.resume(out)  # a missing or resized text table: a one-line error
        if store.texts.captions != captions:  # sha256-checked on this first read
            raise UserError(f"--out {out}: its text table {TEXTS} holds other captions than this run's; synthesize "
                            f"the store again with --overwrite, or choose another --out")
    else:
        store = TrajectoryStore.create(out, settings)
        store.write_texts(captions, _table_rows(source, pipe, DTYPES[dtype]), batch_size)  # before any shard

    # 2. generate the shards the manifest does not list, in order
    done = {s.start for s in store.manifest.shards}
    finished = len(store)
    todo = [s for s in range(0, num, shard_size) if s not in done]
    if progress:
        progress("synth", finished, num, {})
    for start in todo:
        stop = min(start + shard_size, num)
        parts: dict[str, list[Tensor]] = {"latents": [], "text_index": []}
        for first in range(start, stop, batch_size):  # batches aligned to the shard start
            indices = list(range(first, min(first + batch_size, stop)))
            _, cond = source.encode(pipe, indices)
            visual = source.visual(pipe, indices)  # an I2V teacher: each sample's own first frame
            cond = cond.with_extra(visual)
            noise = sample_noise(latent_shape, seed, indices).to(device)  # (B, C, T, H, W) = l at t = 1
            uncond = pipe.null_condition(len(indices)) if guided else None
            with torch.no_grad():
                result = sample_euler(pipe.denoiser, noise, grid, cond, cfg_scale=cfg_scale if guided else None,
                                      uncond=uncond, return_trajectory=True)
            path = torch.stack(result.trajectory, dim=1)  # (B, steps + 1, C, T, H, W)
            parts["latents"].append(path[:, keep_index].to("cpu", DTYPES[dtype]))  # (B, K, C, T, H, W)
            parts["text_index"].append(torch.tensor([text_rows[i] for i in indices], dtype=torch.int64))  # (B,)
            for name, value in visual.items():
                parts.setdefault(f"visual.{name}", []).append(value.to("cpu", DTYPES[dtype]))  # (B, …)
            finished += len(indices)
            if progress:
                progress("synth", finished, num, {"shard": start // shard_size})
        tensors = {k: torch.cat(v) for k, v in parts.items()}
        tensors["index"] = torch.arange(start, stop, dtype=torch.int64)
        store.write_shard(start // shard_size, tensors)
    return store


# ---------------------------------------------------------------------------------------------
# Preference pairs (SwiftVideo's trajectory alignment)
# ---------------------------------------------------------------------------------------------

def synthesize_pairs(model: str | Path, out: str | Path, num: int, *, preferred: int | str = 8,
                     dispreferred: int = 4, prompts: str = "toy", cfg_scale: float | None = None, seed: int = 0,
                     batch_size: int = 16, shard_size: int = 256, dtype: str = "auto",
                     device: str | torch.device = "cpu", progress: Callable[[str, int, int, dict], None] | None = None,
                     overwrite: bool = False):
    """Write (or continue) the preference store at ``out`` (:mod:`fewstep.data.preferences`; SwiftVideo §3).

    Sample ``i``: prompt ``i`` and noise seeded by ``(seed, i)`` (as :func:`synthesize`), sampled by ``model``
    (the distribution-aligned student: its own sampler, e.g. Euler) with ``preferred`` steps (x0^w) and with
    ``dispreferred`` steps (x0^l) from that same noise; ``preferred="real"`` takes the toy world's clip of
    prompt ``i`` instead (``prompts="toy"`` only). ``cfg_scale``: default the model's own (a distilled
    student: none). Shards, resume and integrity are the trajectory store's.
    """
    from .data.preferences import PreferenceSettings, PreferenceStore

    for name, value, least in (("--num", num, 1), ("--batch-size", batch_size, 1), ("--shard-size", shard_size, 1),
                               ("--seed", seed, 0), ("--steps (dispreferred)", dispreferred, 1)):
        if value < least:
            raise UserError(f"{name} {value} is invalid; expected an integer >= {least}")
    real = preferred == "real"
    if not real and (not isinstance(preferred, int) or preferred <= dispreferred):
        raise UserError(f"--steps {preferred} {dispreferred}: the preferred sample takes more steps than the "
                        f"dispreferred one (e.g. 8 4), or give --preferred real")
    if real and prompts != "toy":
        raise UserError("--preferred real takes the toy world's clips: use --prompts toy")
    if dtype not in DTYPE_CHOICES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    out = Path(out)
    check_writable(out)
    if not (out / MANIFEST).is_file() and out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not a preference store (no {MANIFEST}); choose an empty or new "
                        f"directory")
    source = PromptSource(prompts)
    pipe = load_model(model, device)
    source.check(pipe, num)
    if source.cache is not None and pipe.image_conditioned:  # sample_latents takes images, a cache holds latents
        source.images(pipe, [0])  # its one-line error, before anything is written
    cfg_scale = pipe.sampling.cfg_scale if cfg_scale is None else cfg_scale
    guided = cfg_active(cfg_scale)
    latent_shape = list(pipe.latent_shape(1)[1:])
    captions, text_rows = source.table(num)
    probe = source.encode(pipe, [0])[1]
    dtype = store_dtype(dtype, pipe)
    settings = PreferenceSettings(
        model=str(model) if str(model) in SHIPPED else str(Path(model).resolve()),
        prompts=source.label, prompts_sha256=source.sha256,
        num=num, seed=seed, preferred=preferred, dispreferred=dispreferred, cfg_scale=cfg_scale if guided else None,
        shard_size=shard_size, latent_shape=latent_shape, text_shape=list(probe.context.shape[1:]), dtype=dtype,
        num_texts=len(captions), extra_shapes={name: list(value.shape[1:]) for name, value in probe.extra.items()},
        visual_shapes={name: list(value.shape[1:]) for name, value in source.visual(pipe, [0]).items()})

    # 1. open the store (same settings and captions) or create it with its text table
    if (out / MANIFEST).is_file() and (overwrite or not PreferenceStore.read_manifest(out).shards):
        for f in [out / MANIFEST, out / TEXTS, *out.glob("shard_*.safetensors")]:
            f.unlink(missing_ok=True)
    for leftover in out.glob(".*.tmp"):
        leftover.unlink()
    if (out / MANIFEST).is_file():
        found = PreferenceStore.read_manifest(out).settings
        if found != settings:
            diff = next(k for k in PreferenceSettings.model_fields if getattr(found, k) != getattr(settings, k))
            raise UserError(f"--out {out} holds a preference store made with {diff}={getattr(found, diff)!r} (this "
                            f"run: {getattr(settings, diff)!r}); rerun with the same settings to continue it, or "
                            f"choose another --out")
        store = PreferenceStore.resume(out)
    else:
        store = PreferenceStore.create(out, settings)
        store.write_texts(captions, _table_rows(source, pipe, DTYPES[dtype]), batch_size)

    # 2. the shards the manifest does not list, in order, batches aligned to the shard start
    world = ToyWorld("train", frames=pipe.geometry.frames, size=pipe.geometry.height, length=2**62) if real else None
    done = {s.start for s in store.manifest.shards}
    finished = len(store)
    if progress:
        progress("pairs", finished, num, {})
    for start in [s for s in range(0, num, shard_size) if s not in done]:
        stop = min(start + shard_size, num)
        parts: dict[str, list[Tensor]] = {"latents": [], "text_index": []}
        for first in range(start, stop, batch_size):
            indices = list(range(first, min(first + batch_size, stop)))
            texts = [source[i] for i in indices]
            noise = sample_noise(latent_shape, seed, indices)  # (B, C, T, H, W), the same for both samples
            visual = source.visual(pipe, indices)  # an I2V model: both samples on the clip's first frame
            images = {"images": source.images(pipe, indices)} if visual else {}
            with torch.no_grad():
                lose = pipe.sample_latents(texts, steps=dispreferred, noise=noise, cfg_scale=cfg_scale, **images).x
                if real:
                    win = pipe.encode(world.batch(indices)["frames"].to(device))  # the real clip of prompt i
                else:
                    win = pipe.sample_latents(texts, steps=preferred, noise=noise, cfg_scale=cfg_scale, **images).x
            pair = torch.stack([win, lose], dim=1)  # (B, 2, C, T, H, W)
            parts["latents"].append(pair.to("cpu", DTYPES[dtype]))
            parts["text_index"].append(torch.tensor([text_rows[i] for i in indices], dtype=torch.int64))
            for name, value in visual.items():
                parts.setdefault(f"visual.{name}", []).append(value.to("cpu", DTYPES[dtype]))  # (B, …)
            finished += len(indices)
            if progress:
                progress("pairs", finished, num, {"shard": start // shard_size})
        tensors = {k: torch.cat(v) for k, v in parts.items()}
        tensors["index"] = torch.arange(start, stop, dtype=torch.int64)
        store.write_shard(start // shard_size, tensors)
    return store
