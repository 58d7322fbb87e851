"""Teacher trajectory stores: the format of AccVideo's SynVid (papers/002, §4.1) for any teacher.

A store holds, per sample ``i``, a teacher's denoising path from seeded noise at AccVideo's key
timesteps ``{1, 0.9651, 0.9130, 0.8235, 0.6363, 0}`` (§4.2; ``--keep all``: every solver time),
written by ``fewstep synth`` (:mod:`fewstep.synth`, AccVideo Eq. 5).

**The solver grid contains the key timesteps** (:func:`solver_grid`): the ``N`` steps are split
among the five key segments ``[t'_{k+1}, t'_k]`` in proportion to their length (largest-remainder
rounding, at least one step each), and every segment is subdivided uniformly. With ``N = 50`` the
segments get ``[2, 3, 4, 9, 32]`` steps of ≈0.02 each, close to a uniform 50-step grid, and every
key timestep is a grid point exactly — the paper reads its key latents off a 50-step trajectory
the same way.

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

This module is the store format only (plain data: the solver grid, manifest, shards). What runs a
model lives above it: :func:`fewstep.synth.synthesize` writes a store with a teacher, and the
``trajectory_store`` data source (:mod:`fewstep.recipes.sources`) serves one to the engine
(position ``p`` → sample ``p mod N``, the stored path in ``Batch.extra``).
"""

from __future__ import annotations

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
from ..errors import UserError
from ..utils.io import sha256_file

Keep = Literal["keys", "all"]

#: AccVideo §4.2: the key diffusion timesteps t'_5 = 1 > … > t'_0 = 0 (sampler order).
#: Copied from diffusion.schedules.TIME_GRIDS["accvideo_keys"] (data/ sits below diffusion/ and
#: may not import it; tests/test_trajectories.py checks that the two agree).
KEY_TIMES: tuple[float, ...] = (1.0, 0.9651, 0.9130, 0.8235, 0.6363, 0.0)
MANIFEST = "manifest.json"


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
