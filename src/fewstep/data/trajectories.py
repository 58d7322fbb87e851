"""Teacher trajectory stores: AccVideo's SynVid (papers/002, §4.1, Eq. 5) for any teacher.

``fewstep synth`` runs the teacher's Euler solver with CFG from seeded noise and keeps, per
sample ``i``, the latents at AccVideo's key timesteps (§4.2), so that distillation only ever
sees points that lie on the teacher's own denoising trajectories::

    l_{t_N} = z_i ~ N(0, I)                                               (noise of sample i)
    l_{t_{j−1}} = l_{t_j} + (σ(t_{j−1}) − σ(t_j))·v̂(l_{t_j}, t_j, T_i)     (AccVideo Eq. 5; CFG w)
    stored:  l at t ∈ {1, 0.9651, 0.9130, 0.8235, 0.6363, 0}             (``--keep all``: every t_j)

(Eq. 5 writes the step in ``t``; ours is :func:`~fewstep.diffusion.samplers.sample_euler`,
which steps in σ(t) — the same thing for an unshifted flow-matching teacher, and the DDIM step
for a VP one.) The latent at ``t = 1`` *is* the initial noise ``z_i``, so the noise is stored once,
as the first latent of the path.

**The solver grid contains the key timesteps** (:func:`solver_grid`): the ``N`` steps are split
among the five key segments ``[t'_{k+1}, t'_k]`` in proportion to their length (largest-remainder
rounding, at least one step each), and every segment is subdivided uniformly. With ``N = 50`` the
segments get ``[2, 3, 4, 9, 32]`` steps of ≈0.02 each, close to a uniform 50-step grid, and every
key timestep is a grid point exactly — the paper reads its key latents off a 50-step trajectory
the same way.

**Determinism.** Sample ``i`` is a pure function of ``(seed, i)``: its noise comes from a
generator seeded by ``(seed, i)`` alone and its prompt is prompt ``i`` (``--prompts toy``: the toy
world's training caption of index ``i``; a file: line ``i mod P`` of its ``P`` non-empty lines).
Samples are generated in shards of ``shard_size`` consecutive indices, each in fixed batches
aligned to the shard's start, so a resumed run produces bit-identical shards.

**On disk** (a directory)::

    manifest.json                 StoreManifest: the settings below + one entry per finished shard
                                  (file, first index, count, bytes, sha256)
    shard_00000.safetensors       index (n,) int64 · latents (n, K, C, T, H, W) at the stored times
                                  · text_tokens (n, L, D) · text_mask (n, L) bool;
                                  header metadata "prompts": JSON list of the n prompts

**Resume and integrity.** A shard is written to ``.shard_XXXXX.safetensors.tmp``, fsynced and
renamed; only then is it entered in the manifest (itself replaced atomically). An interrupted run
leaves at most a temporary file (deleted on the next run) or a renamed shard that the manifest does
not list (regenerated — bit-identical — on the next run); rerunning the same command therefore
continues without duplicates or gaps, and does nothing once the store is complete. Rerunning with
other settings is refused. A listed shard whose size differs from the manifest (truncated,
overwritten) is reported by name; :class:`TrajectoryStore` also checks each shard's sha256 the first
time it reads it.

**Training from a store.** :class:`TrajectorySource` is the engine's data source for a store
(position ``p`` → sample ``p mod N``); its batches carry the stored path in ``Batch.extra``.

Layering: the store itself (manifest, shards) is plain data; :func:`synthesize` runs a
:class:`~fewstep.models.pipeline.VideoPipeline` and :class:`TrajectorySource` builds the engine's
:class:`~fewstep.objectives.base.Batch`, so those two reach above ``data/`` the way
:mod:`fewstep.engine.data` does.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from pydantic import Field, ValidationError
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..config import StrictModel
from ..diffusion.samplers import sample_euler
from ..diffusion.schedules import TIME_GRIDS
from ..errors import UserError
from ..utils.io import check_writable, sha256_file
from .toyworld import ToyWorld

Keep = Literal["keys", "all"]

#: AccVideo §4.2: the key diffusion timesteps t'_5 = 1 > … > t'_0 = 0 (sampler order).
KEY_TIMES: tuple[float, ...] = tuple(TIME_GRIDS["accvideo_keys"])
MANIFEST = "manifest.json"
_SEED_TAG = 0x5E1D  # keeps synth noise seeds apart from other SeedSequence users of (seed, i)


# ---------------------------------------------------------------------------------------------
# The solver grid
# ---------------------------------------------------------------------------------------------

def solver_grid(steps: int, keys: Sequence[float] = KEY_TIMES) -> Tensor:
    """The ``steps + 1`` decreasing times of the teacher's solver, containing every key time.

    Segment ``j`` (from ``keys[j]`` down to ``keys[j + 1]``) gets ``n_j`` uniform steps with
    ``n_j ∝ keys[j] − keys[j + 1]`` (largest-remainder rounding, ``n_j ≥ 1``, ``Σ n_j = steps``).
    """
    keys_t = torch.tensor(keys, dtype=torch.float64)
    lengths = keys_t[:-1] - keys_t[1:]  # (S,) segment lengths, all > 0
    if steps < len(lengths):
        raise UserError(f"--steps {steps}: the solver needs at least {len(lengths)} steps (one per key segment)")
    share = steps * lengths / lengths.sum()  # (S,) ideal real-valued step counts
    counts = share.floor().clamp(min=1).long()
    while counts.sum() < steps:  # largest remainder first
        counts[int((share - counts).argmax())] += 1
    while counts.sum() > steps:  # only after the clamp: take from the most over-served segment
        over = torch.where(counts > 1, counts - share, torch.full_like(share, -torch.inf))
        counts[int(over.argmax())] -= 1
    parts = [torch.linspace(float(keys_t[j]), float(keys_t[j + 1]), int(n) + 1, dtype=torch.float64)[:-1]
             for j, n in enumerate(counts)]
    return torch.cat([*parts, keys_t[-1:]])


def key_indices(grid: Tensor, keys: Sequence[float] = KEY_TIMES) -> list[int]:
    """Positions of the key times in ``grid`` (exact matches, as :func:`solver_grid` builds them)."""
    out = []
    for k in keys:
        (hit,) = torch.nonzero(grid == k, as_tuple=True)
        assert len(hit) == 1, f"key time {k} is not a point of the solver grid"
        out.append(int(hit[0]))
    return out


# ---------------------------------------------------------------------------------------------
# The manifest
# ---------------------------------------------------------------------------------------------

class StoreSettings(StrictModel):
    """What determines a store's samples; a resumed run must match it exactly."""

    teacher: str = Field(description="shipped model name, or the absolute model directory")
    prompts: str = Field(description="'toy' or the prompt file given")
    prompts_sha256: str | None = Field(None, description="sha256 of the prompt file (None for toy)")
    num: int = Field(ge=1)
    seed: int = Field(ge=0)
    steps: int = Field(ge=1)
    cfg_scale: float | None
    keep: Keep
    shard_size: int = Field(ge=1)
    grid: list[float] = Field(description="the solver's times, decreasing, containing the key times")
    times: list[float] = Field(description="the stored times (latents[:, j] is at times[j]), decreasing")
    latent_shape: list[int] = Field(description="(C, T, H, W)")
    text_shape: list[int] = Field(description="(L, D) of the stored caption tokens")


class ShardInfo(StrictModel):
    file: str
    start: int = Field(ge=0, description="first sample index")
    count: int = Field(ge=1)
    bytes: int
    sha256: str


class StoreManifest(StrictModel):
    format: Literal[1] = 1
    settings: StoreSettings
    shards: list[ShardInfo] = Field(default_factory=list)


def _shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def _replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` a temporary sibling of ``path``, fsync it, rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_manifest(directory: Path) -> StoreManifest:
    """The manifest of the store at ``directory`` (missing or unreadable: a one-line error)."""
    path = directory / MANIFEST
    if not path.is_file():
        raise UserError(f"trajectory store {directory}: no {MANIFEST} (make one with `fewstep synth --out {directory}`)")
    try:
        return StoreManifest.model_validate(json.loads(path.read_text()))
    except (ValueError, ValidationError):
        raise UserError(f"trajectory store {directory}: {MANIFEST} is unreadable") from None


# ---------------------------------------------------------------------------------------------
# Reader / writer
# ---------------------------------------------------------------------------------------------

class TrajectoryStore:
    """A store directory: its manifest, verified shards, and samples by index.

    ``TrajectoryStore(dir)`` opens a store (a missing/unreadable manifest or a missing/resized shard
    is a one-line :class:`UserError` naming the file); :meth:`create` starts an empty one and
    :meth:`write_shard` adds a shard. Shards are read lazily, sha256-checked on first read, and the
    last few are cached.
    """

    CACHE_SHARDS = 4

    def __init__(self, directory: str | Path, manifest: StoreManifest | None = None):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory) if manifest is None else manifest
        self._cache: OrderedDict[int, dict] = OrderedDict()
        self._verified: set[str] = set()
        for shard in self.manifest.shards:
            self.check_size(shard)

    # -- opening and creating ------------------------------------------------------------------
    @classmethod
    def create(cls, directory: str | Path, settings: StoreSettings) -> "TrajectoryStore":
        """An empty store with ``settings`` (its manifest written)."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        store = cls(directory, StoreManifest(settings=settings))
        store.save_manifest()
        return store

    @classmethod
    def resume(cls, directory: str | Path) -> "TrajectoryStore":
        """The store at ``directory`` to continue writing: listed shards that were deleted are dropped
        (and so regenerated); a listed shard whose size changed is still an error naming it."""
        manifest = read_manifest(Path(directory))
        manifest.shards = [s for s in manifest.shards if (Path(directory) / s.file).is_file()]
        return cls(directory, manifest)

    def save_manifest(self) -> None:
        text = self.manifest.model_dump_json(indent=1)
        _replace_atomically(self.directory / MANIFEST, lambda p: p.write_text(text))

    def check_size(self, shard: ShardInfo) -> None:
        """A listed shard must exist with the size the manifest recorded (catches truncation)."""
        path = self.directory / shard.file
        if not path.is_file():
            raise UserError(f"trajectory store {self.directory}: {shard.file} is missing; rerun `fewstep synth` "
                            f"with the same arguments to regenerate it")
        size = path.stat().st_size
        if size != shard.bytes:
            raise UserError(f"trajectory store {self.directory}: {shard.file} is truncated or corrupt ({size} bytes, "
                            f"expected {shard.bytes}); delete it and rerun `fewstep synth` to regenerate it")

    def write_shard(self, index: int, tensors: dict[str, Tensor], prompts: list[str]) -> ShardInfo:
        """Write shard ``index`` atomically and list it in the manifest (replacing an older entry)."""
        name = _shard_name(index)
        path = self.directory / name
        data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        _replace_atomically(path, lambda p: save_file(data, p, metadata={"prompts": json.dumps(prompts)}))
        info = ShardInfo(file=name, start=int(data["index"][0]), count=len(prompts), bytes=path.stat().st_size,
                         sha256=sha256_file(path))
        self.manifest.shards = sorted([s for s in self.manifest.shards if s.file != name] + [info],
                                      key=lambda s: s.start)
        self.save_manifest()
        self._verified.add(name)
        return info

    # -- what it holds -------------------------------------------------------------------------
    @property
    def settings(self) -> StoreSettings:
        return self.manifest.settings

    @property
    def times(self) -> Tensor:
        """``(K,)`` float64, decreasing: ``latents[:, j]`` is at ``times[j]``."""
        return torch.tensor(self.settings.times, dtype=torch.float64)

    def __len__(self) -> int:
        """Samples in finished shards."""
        return sum(s.count for s in self.manifest.shards)

    @property
    def complete(self) -> bool:
        return len(self) == self.settings.num

    def load_shard(self, info: ShardInfo) -> dict:
        """``{index, latents, text_tokens, text_mask, prompts}`` of one shard (checked, cached)."""
        key = info.start
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        path = self.directory / info.file
        self.check_size(info)
        where = f"trajectory store {self.directory}: {info.file}"
        if info.file not in self._verified:
            if sha256_file(path) != info.sha256:
                raise UserError(f"{where} does not match its checksum (corrupt); delete it and rerun `fewstep synth` "
                                f"to regenerate it")
            self._verified.add(info.file)
        try:
            shard = dict(load_file(path))
            with safe_open(path, framework="pt") as fh:
                shard["prompts"] = json.loads(fh.metadata()["prompts"])
        except Exception as err:  # safetensors and json raise their own types
            raise UserError(f"{where} is unreadable ({type(err).__name__}); delete it and rerun `fewstep synth`") \
                from None
        self._cache[key] = shard
        while len(self._cache) > self.CACHE_SHARDS:
            self._cache.popitem(last=False)
        return shard

    def samples(self, indices: Sequence[int]) -> dict:
        """Samples ``indices`` stacked: ``latents (B, K, C, T, H, W)``, ``text_tokens (B, L, D)``,
        ``text_mask (B, L)``, ``prompts`` (list)."""
        starts = [s.start for s in self.manifest.shards]
        rows = []
        for i in indices:
            j = int(np.searchsorted(starts, i, side="right")) - 1
            info = self.manifest.shards[j] if j >= 0 else None
            if info is None or not info.start <= i < info.start + info.count:
                raise UserError(f"trajectory store {self.directory}: sample {i} is in no finished shard "
                                f"({len(self)} of {self.settings.num} samples written); finish it with `fewstep synth`")
            rows.append((self.load_shard(info), i - info.start))
        return {
            **{key: torch.stack([shard[key][r] for shard, r in rows]) for key in ("latents", "text_tokens", "text_mask")},
            "prompts": [shard["prompts"][r] for shard, r in rows],
        }


# ---------------------------------------------------------------------------------------------
# Synthesis
# ---------------------------------------------------------------------------------------------

def _noise_seed(seed: int, index: int) -> int:
    """63-bit seed of sample ``index``'s noise, a function of ``(seed, index)`` only."""
    (word,) = np.random.SeedSequence([_SEED_TAG, seed, index]).generate_state(1, dtype=np.uint64)
    return int(word) >> 1


def sample_noise(shape: Sequence[int], seed: int, indices: Sequence[int]) -> Tensor:
    """``(B, *shape)`` float32 noise; row ``b`` drawn from its own generator seeded by ``(seed, indices[b])``."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(_noise_seed(seed, i)))
                        for i in indices])


class PromptSource:
    """Prompt ``i`` of a run: the toy world's training caption ``i`` (``"toy"``) or line ``i mod P`` of a file."""

    def __init__(self, spec: str):
        self.spec = spec
        self.lines: list[tuple[int, str]] = []  # (line number, prompt) of the file's non-empty lines
        self.sha256: str | None = None
        if spec == "toy":
            self.world = ToyWorld("train", length=2**62)
            return
        path = Path(spec)
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
        return self.lines[index % len(self.lines)][1]

    def check(self, pipeline, num: int) -> None:
        """Every prompt the first ``num`` samples use parses (before anything is written)."""
        if self.spec != "toy":
            self.encode(pipeline, range(min(num, len(self.lines))))

    def encode(self, pipeline, indices: Sequence[int]):
        """``(prompts, Conditioning)`` of ``indices`` through ``pipeline``'s text encoder."""
        prompts = [self[i] for i in indices]
        try:
            return prompts, pipeline.encode_prompts(prompts)
        except UserError as err:
            if self.spec == "toy":
                raise
            raise UserError(f"--prompts {self.spec}: {err}") from None


def _check_same(found: StoreSettings, wanted: StoreSettings, out: Path) -> None:
    for name in StoreSettings.model_fields:
        a, b = getattr(found, name), getattr(wanted, name)
        if a != b:
            show = (lambda v: f"{v[:3]}…" if isinstance(v, list) and len(v) > 3 else repr(v))
            raise UserError(f"--out {out} holds a trajectory store made with {name}={show(a)} (this run: {show(b)}); "
                            f"rerun with the same settings to continue it, or choose another --out")


def synthesize(teacher: str | Path, out: str | Path, num: int, *, prompts: str = "toy", steps: int = 50,
               cfg_scale: float | None = None, keep: Keep = "keys", seed: int = 0, batch_size: int = 16,
               shard_size: int = 256, device: str | torch.device = "cpu",
               progress: Callable[[str, int, int, dict], None] | None = None,
               overwrite: bool = False) -> TrajectoryStore:
    """Synthesize (or continue, or verify) the store at ``out``; see the module doc.

    Everything is checked before the first write: ``out`` is writable, every prompt of the run
    parses. A store with no sample written yet is not kept as a store (a corrected rerun starts
    afresh); ``overwrite`` replaces a store (only its manifest and shards; other files are kept).

    ``teacher``: a shipped model name or a model directory (:meth:`VideoPipeline.load`);
    ``cfg_scale``: CFG w in ``uncond + w·(cond − uncond)``, default the teacher's own (1 or None: no CFG);
    ``keep``: ``keys`` (the six key timesteps) or ``all`` (the whole solver path).
    """
    from ..models.pipeline import SHIPPED, VideoPipeline

    for name, value, least in (("--num", num, 1), ("--batch-size", batch_size, 1), ("--shard-size", shard_size, 1),
                               ("--seed", seed, 0)):
        if value < least:
            raise UserError(f"{name} {value} is invalid; expected an integer >= {least}")
    if keep not in ("keys", "all"):
        raise UserError(f"--keep must be 'keys' or 'all', got {keep!r}")
    out = Path(out)
    check_writable(out)
    grid = solver_grid(steps)  # (steps + 1,) decreasing, contains KEY_TIMES
    source = PromptSource(prompts)
    pipe = VideoPipeline.load(teacher, device)
    source.check(pipe, num)
    cfg_scale = pipe.config.sampling.cfg_scale if cfg_scale is None else cfg_scale
    guided = cfg_scale not in (None, 1.0)
    keep_index = list(range(len(grid))) if keep == "all" else key_indices(grid)
    latent_shape = list(pipe.latent_shape(1)[1:])
    text_shape = list(source.encode(pipe, [0])[1].context.shape[1:])
    settings = StoreSettings(
        teacher=str(teacher) if str(teacher) in SHIPPED else str(Path(teacher).resolve()),
        prompts=prompts if prompts == "toy" else str(Path(prompts).resolve()),
        prompts_sha256=source.sha256, num=num, seed=seed, steps=steps, cfg_scale=cfg_scale if guided else None,
        keep=keep, shard_size=shard_size, grid=grid.tolist(), times=grid[keep_index].tolist(),
        latent_shape=latent_shape, text_shape=text_shape)

    # 1. open or create the store; drop leftovers of an interrupted write
    replaced = (out / MANIFEST).is_file() and (overwrite or not read_manifest(out).shards)
    if replaced:
        for f in [out / MANIFEST, *out.glob("shard_*.safetensors"), *out.glob(".*.tmp")]:
            f.unlink()  # only the store's own files
    if (out / MANIFEST).is_file():
        store = TrajectoryStore.resume(out)
        _check_same(store.settings, settings, out)
    elif not replaced and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not a trajectory store (no {MANIFEST}); choose an empty or new "
                        f"directory")
    else:
        store = TrajectoryStore.create(out, settings)
    for leftover in out.glob(".*.tmp"):
        leftover.unlink()

    # 2. generate the shards the manifest does not list, in order
    done = {s.start for s in store.manifest.shards}
    finished = len(store)
    todo = [s for s in range(0, num, shard_size) if s not in done]
    if progress:
        progress("synth", finished, num, {})
    for start in todo:
        stop = min(start + shard_size, num)
        parts: dict[str, list[Tensor]] = {"latents": [], "text_tokens": [], "text_mask": []}
        shard_prompts: list[str] = []
        for first in range(start, stop, batch_size):  # batches aligned to the shard start
            indices = list(range(first, min(first + batch_size, stop)))
            batch_prompts, cond = source.encode(pipe, indices)
            noise = sample_noise(latent_shape, seed, indices).to(device)  # (B, C, T, H, W) = l at t = 1
            uncond = pipe.null_condition(len(indices)) if guided else None
            with torch.no_grad():
                result = sample_euler(pipe.denoiser, noise, grid, cond, cfg_scale=cfg_scale if guided else None,
                                      uncond=uncond, return_trajectory=True)
            path = torch.stack(result.trajectory, dim=1)  # (B, steps + 1, C, T, H, W)
            parts["latents"].append(path[:, keep_index].float().cpu())  # (B, K, C, T, H, W)
            parts["text_tokens"].append(cond.context.float().cpu())  # (B, L, D)
            mask = cond.mask if cond.mask is not None else torch.ones(cond.context.shape[:2], dtype=torch.bool)
            parts["text_mask"].append(mask.cpu())  # (B, L)
            shard_prompts += batch_prompts
            finished += len(indices)
            if progress:
                progress("synth", finished, num, {"shard": start // shard_size})
        tensors = {k: torch.cat(v) for k, v in parts.items()}
        tensors["index"] = torch.arange(start, stop, dtype=torch.int64)
        store.write_shard(start // shard_size, tensors, shard_prompts)
    return store


# ---------------------------------------------------------------------------------------------
# The engine's data source
# ---------------------------------------------------------------------------------------------

class TrajectorySource:
    """A store as the engine's data stream: position ``p`` → sample ``p mod N``.

    ``Batch.latents`` is the final latent ``l_{t=0}`` (the teacher's sample), ``cond`` the stored
    caption tokens, ``uncond`` the pipeline's null caption; ``extra["trajectory"]`` holds the stored
    path ``(B, K, C, T, H, W)`` and ``extra["key_times"]`` its times ``(B, K)`` float64 (decreasing,
    the same in every row). The store must be complete and match the pipeline's latent and caption
    shapes.
    """

    def __init__(self, store: TrajectoryStore | str | Path, pipeline):
        self.store = store if isinstance(store, TrajectoryStore) else TrajectoryStore(store)
        self.pipeline = pipeline  # VideoPipeline; only its text encoder is used (null caption)
        settings, where = self.store.settings, f"trajectory store {self.store.directory}"
        if not self.store.complete:
            raise UserError(f"{where} is incomplete ({len(self.store)} of {settings.num} samples); rerun "
                            f"`fewstep synth` with the same arguments to finish it")
        want = list(pipeline.latent_shape(1)[1:])
        if settings.latent_shape != want:
            raise UserError(f"{where} holds latents of shape {tuple(settings.latent_shape)}; the model's are "
                            f"{tuple(want)} (synthesize the store with this model)")
        null = pipeline.null_condition(1).context
        if settings.text_shape != list(null.shape[1:]):
            raise UserError(f"{where} holds caption tokens of shape {tuple(settings.text_shape)}; the model's text "
                            f"encoder gives {tuple(null.shape[1:])} (synthesize the store with this model)")

    @torch.no_grad()
    def batch(self, positions: Sequence[int], device: torch.device):
        from ..models.backbones import Conditioning
        from ..objectives.base import Batch

        n = self.store.settings.num
        items = self.store.samples([p % n for p in positions])
        trajectory = items["latents"].to(device)  # (B, K, C, T, H, W), decreasing times
        times = self.store.times.to(device).expand(len(positions), -1)  # (B, K)
        cond = Conditioning(items["text_tokens"].to(device), items["text_mask"].to(device))
        return Batch(latents=trajectory[:, -1], cond=cond, uncond=self.pipeline.null_condition(len(positions)),
                     prompts=items["prompts"], sample_ids=torch.as_tensor(list(positions), dtype=torch.int64),
                     extra={"trajectory": trajectory, "key_times": times})
