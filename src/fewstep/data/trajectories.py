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

**On disk** (a directory, format 2)::

    manifest.json                 StoreManifest: the settings below, the text table's entry and one entry per
                                  finished shard (file, first index, count, bytes, sha256)
    texts.safetensors             the caption table, one row per distinct caption of the run (P rows):
                                  context (P, L, D) · mask (P, L) bool · extra.<name> (P, …) (the condition's
                                  extra tensors, e.g. HunyuanVideo's pooled_projections) · captions (bytes,)
                                  uint8, the UTF-8 JSON list of the P captions
    shard_00000.safetensors       index (n,) int64 · latents (n, K, C, T, H, W) at the stored times ·
                                  text_index (n,) int64, each sample's row of the text table ·
                                  visual.<name> (n, …) for an image-to-video teacher: each sample's own
                                  visual extras (image_latent, image_mask, …; models/family.py), which
                                  the reader returns among the caption's ``extra``

Latents, context and extras are stored in the settings' ``dtype`` (``fewstep synth --dtype``: bfloat16
for a real teacher, float32 for the toy one); the reader returns float32. A caption's tokens are stored
once however many samples use it: a real Wan store of ``N`` samples over ``P`` captions holds
``P·L·D·2`` bytes of text (L = 512, D = 4096: 4 MiB a caption) where format 1 held ``N·L·D·4``.

**Format 1** (older stores, still read): no text table; each shard holds ``text_tokens (n, L, D)``
float32 and ``text_mask (n, L)`` per sample and the prompts as header metadata, latents in float32,
and no extra tensors (a format-1 store of HunyuanVideo does not train: synthesize it again).

**Resume and integrity.** Every file is written to ``.NAME.tmp``, fsynced and renamed; only then is it
entered in the manifest (itself replaced atomically). The text table is written and checksummed right
after the empty manifest, before any shard, so every listed shard indexes a complete table; a store
with no finished shard is started afresh by the next run. An interrupted run leaves at most a temporary
file (deleted on the next run) or a renamed shard that the manifest does not list (regenerated —
bit-identical — on the next run); rerunning the same command therefore continues without duplicates
or gaps, and does nothing once the store is complete. Rerunning with other settings, other prompts or
with a text table that is missing or differs from its checksum is refused. A listed file whose size
differs from the manifest (truncated, overwritten) is reported by name; :class:`TrajectoryStore` also
checks each file's sha256 the first time it reads it.

This module is the store format only (plain data: the solver grid, manifest, text table, shards). What runs a
model lives above it: :func:`fewstep.synth.synthesize` writes a store with a teacher, and the
``trajectory_store`` data source (:mod:`fewstep.recipes.sources`) serves one to the engine
(position ``p`` → sample ``p mod N``, the stored path in ``Batch.extra``).
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Callable, ClassVar, Literal, Sequence

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
StoreDtype = Literal["bfloat16", "float32"]

#: AccVideo §4.2: the key diffusion timesteps t'_5 = 1 > … > t'_0 = 0 (sampler order).
#: Copied from diffusion.schedules.TIME_GRIDS["accvideo_keys"] (data/ sits below diffusion/ and
#: may not import it; tests/test_trajectories.py checks that the two agree).
KEY_TIMES: tuple[float, ...] = (1.0, 0.9651, 0.9130, 0.8235, 0.6363, 0.0)
MANIFEST = "manifest.json"
TEXTS = "texts.safetensors"
FORMAT = 2  # the format this code writes; format 1 is still read (module doc)
DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float32": torch.float32}
_SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64",
                       torch.int64: "I64", torch.uint8: "U8", torch.bool: "BOOL"}


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
    dtype: StoreDtype = Field("float32", description="of the stored latents, caption tokens and extras (format 1: "
                                                     "float32); the reader returns float32")
    num_texts: int | None = Field(None, ge=1, description="P, the distinct captions of the run: rows of the text "
                                                          "table (format 1: None, tokens stored per sample)")
    extra_shapes: dict[str, list[int]] = Field(default_factory=dict, description="shape of one caption's extra "
                                               "tensors by name (HunyuanVideo: pooled_projections); format 1: none")
    visual_shapes: dict[str, list[int]] = Field(default_factory=dict, description="shape of one sample's visual "
                                                "extras by name (an image-to-video teacher's; stored per sample)")


class ShardInfo(StrictModel):
    file: str
    start: int = Field(ge=0, description="first sample index")
    count: int = Field(ge=1)
    bytes: int
    sha256: str


class TextTableInfo(StrictModel):
    file: str = TEXTS
    count: int = Field(ge=1, description="rows: the distinct captions")
    bytes: int
    sha256: str


class StoreManifest(StrictModel):
    format: Literal[1, 2] = FORMAT
    settings: StoreSettings
    texts: TextTableInfo | None = Field(None, description="the caption table (format 2; listed before any shard)")
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


def read_manifest(directory: Path, manifest: type[StoreManifest] = StoreManifest, what: str = "trajectory store",
                  make: str = "fewstep synth") -> StoreManifest:
    """The manifest of the store at ``directory`` (missing or unreadable: a one-line error). ``manifest``,
    ``what`` and ``make``: the manifest type, the store's name and command of a store built on this format
    (:class:`TrajectoryStore`'s class attributes)."""
    path = directory / MANIFEST
    if not path.is_file():
        raise UserError(f"{what} {directory}: no {MANIFEST} (make one with `{make} --out {directory}`)")
    try:
        return manifest.model_validate(json.loads(path.read_text()))
    except (ValueError, ValidationError):
        raise UserError(f"{what} {directory}: {MANIFEST} is unreadable") from None


# ---------------------------------------------------------------------------------------------
# The text table
# ---------------------------------------------------------------------------------------------

def write_text_table(path: Path, captions: list[str], encode: Callable[[list[str]], dict[str, Tensor]],
                     batch_size: int) -> TextTableInfo:
    """Write the caption table of ``captions`` to ``path`` (atomically), ``batch_size`` captions at a time.

    ``encode(captions)`` gives those captions' rows ``{context (b, L, D), mask (b, L), extra.<name> (b, …)}``
    in the dtypes to store. The file is plain safetensors, streamed: its header is laid out from the
    first batch's row shapes and ``P = len(captions)``, and each batch is written at its rows' offsets,
    so the table never sits in memory whole (``P·L·D`` is tens of GB for a real teacher's captions).
    """
    assert sys.byteorder == "little", "safetensors is little-endian"
    names = json.dumps(captions, ensure_ascii=False).encode("utf-8")  # the captions, as a uint8 tensor (module doc)
    first = encode(captions[:batch_size])
    layout = {key: (t.dtype, [len(captions), *t.shape[1:]]) for key, t in first.items()}
    layout["captions"] = (torch.uint8, [len(names)])
    header, end = {}, 0
    for key, (dtype, shape) in layout.items():  # tensors back to back, as safetensors requires
        size = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": shape, "data_offsets": [end, end + size]}
        end += size
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # data aligned to 8 bytes, as safetensors' own writer pads it
    base = 8 + len(head)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(head)) + head)
            for start in range(0, len(captions), batch_size):
                rows = first if start == 0 else encode(captions[start:start + batch_size])
                assert rows.keys() == first.keys(), (sorted(rows), sorted(first))
                for key, t in rows.items():
                    dtype, shape = layout[key]
                    assert t.dtype == dtype and list(t.shape[1:]) == shape[1:], (key, t.dtype, tuple(t.shape), shape)
                    fh.seek(base + header[key]["data_offsets"][0] + start * math.prod(shape[1:]) * dtype.itemsize)
                    fh.write(_raw_bytes(t))
            fh.seek(base + header["captions"]["data_offsets"][0])
            fh.write(names)
            assert fh.tell() == base + end

    _replace_atomically(path, write)
    return TextTableInfo(file=path.name, count=len(captions), bytes=path.stat().st_size, sha256=sha256_file(path))


def _raw_bytes(t: Tensor) -> bytes:
    """A tensor's elements in row-major order, as stored by safetensors (little-endian)."""
    return t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes()


class TextTable:
    """The caption table of a format-2 store: ``captions`` and rows by index, read lazily from the
    memory-mapped file (its size checked on opening, its sha256 on first use)."""

    def __init__(self, directory: Path, info: TextTableInfo, what: str = "trajectory store",
                 make: str = "fewstep synth"):
        self.path, self.info = directory / info.file, info
        self.where = f"{what} {directory}: {info.file}"
        self.make = make
        self._file = None
        self._captions: list[str] | None = None
        if not self.path.is_file():
            raise UserError(f"{self.where} is missing (the caption table its shards index); synthesize the store "
                            f"again with `{self.make} --overwrite`")
        size = self.path.stat().st_size
        if size != info.bytes:
            raise UserError(f"{self.where} is truncated or corrupt ({size} bytes, expected {info.bytes}); synthesize "
                            f"the store again with `{self.make} --overwrite`")

    def _open(self):
        if self._file is None:
            if sha256_file(self.path) != self.info.sha256:
                raise UserError(f"{self.where} does not match its checksum (corrupt); synthesize the store again "
                                f"with `{self.make} --overwrite`")
            try:
                handle = safe_open(self.path, framework="pt")
                captions = json.loads(bytes(handle.get_tensor("captions").numpy()).decode("utf-8"))
            except Exception as err:  # safetensors and json raise their own types
                raise UserError(f"{self.where} is unreadable ({type(err).__name__}); synthesize the store again "
                                f"with `{self.make} --overwrite`") from None
            self._file, self._captions = handle, captions
        return self._file

    @property
    def captions(self) -> list[str]:
        """The ``P`` captions, row ``j`` of the table being caption ``j``."""
        self._open()
        return self._captions

    def rows(self, index: Sequence[int]) -> dict[str, Tensor]:
        """Rows ``index`` stacked, as stored: ``{context (B, L, D), mask (B, L), extra.<name> (B, …)}``."""
        handle = self._open()
        out = {}
        for key in handle.keys():
            if key != "captions":
                table = handle.get_slice(key)
                out[key] = torch.cat([table[j:j + 1] for j in index])  # (B, …): only these rows are read
        return out


# ---------------------------------------------------------------------------------------------
# Reader / writer
# ---------------------------------------------------------------------------------------------

class TrajectoryStore:
    """A store directory: its manifest, verified text table and shards, and samples by index.

    ``TrajectoryStore(dir)`` opens a store (a missing/unreadable manifest or a missing/resized file
    is a one-line :class:`UserError` naming it); :meth:`create` starts an empty one, :meth:`write_texts`
    adds its text table and :meth:`write_shard` a shard. Files are read lazily, sha256-checked on first
    read, and the last few shards are cached. Format-1 stores are read (not written).
    """

    CACHE_SHARDS = 4
    #: what a store of this class is: its manifest type, its name and the command that makes it (in messages)
    Manifest: ClassVar[type[StoreManifest]] = StoreManifest
    WHAT: ClassVar[str] = "trajectory store"
    MAKE: ClassVar[str] = "fewstep synth"

    def __init__(self, directory: str | Path, manifest: StoreManifest | None = None):
        self.directory = Path(directory)
        self.manifest = self.read_manifest(self.directory) if manifest is None else manifest
        self._cache: OrderedDict[int, dict] = OrderedDict()
        self._verified: set[str] = set()
        self._texts: TextTable | None = None
        if self.manifest.format == 2 and self.manifest.shards and self.manifest.texts is None:
            raise UserError(f"{self.WHAT} {self.directory}: {MANIFEST} lists shards but no text table; "
                            f"synthesize the store again with `{self.MAKE} --overwrite`")
        if self.manifest.texts is not None:
            self._texts = TextTable(self.directory, self.manifest.texts, self.WHAT, self.MAKE)
        for shard in self.manifest.shards:
            self.check_size(shard)

    # -- opening and creating ------------------------------------------------------------------
    @classmethod
    def create(cls, directory: str | Path, settings: StoreSettings) -> "TrajectoryStore":
        """An empty store with ``settings`` (its manifest written; the text table comes next)."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        store = cls(directory, cls.Manifest(settings=settings))
        store.save_manifest()
        return store

    @classmethod
    def resume(cls, directory: str | Path) -> "TrajectoryStore":
        """The store at ``directory`` to continue writing: listed shards that were deleted are dropped
        (and so regenerated); a listed shard whose size changed is still an error naming it, and so is a
        missing or resized text table."""
        manifest = cls.read_manifest(Path(directory))
        manifest.shards = [s for s in manifest.shards if (Path(directory) / s.file).is_file()]
        return cls(directory, manifest)

    @classmethod
    def read_manifest(cls, directory: Path) -> StoreManifest:
        """The manifest of a store of this class at ``directory`` (:func:`read_manifest`)."""
        return read_manifest(directory, cls.Manifest, cls.WHAT, cls.MAKE)

    def save_manifest(self) -> None:
        text = self.manifest.model_dump_json(indent=1)
        _replace_atomically(self.directory / MANIFEST, lambda p: p.write_text(text))

    def check_size(self, shard: ShardInfo) -> None:
        """A listed shard must exist with the size the manifest recorded (catches truncation)."""
        path = self.directory / shard.file
        if not path.is_file():
            raise UserError(f"{self.WHAT} {self.directory}: {shard.file} is missing; rerun `{self.MAKE}` "
                            f"with the same arguments to regenerate it")
        size = path.stat().st_size
        if size != shard.bytes:
            raise UserError(f"{self.WHAT} {self.directory}: {shard.file} is truncated or corrupt ({size} bytes, "
                            f"expected {shard.bytes}); delete it and rerun `{self.MAKE}` to regenerate it")

    def write_texts(self, captions: list[str], encode: Callable[[list[str]], dict[str, Tensor]],
                    batch_size: int) -> TextTableInfo:
        """Write the text table (:func:`write_text_table`) and list it in the manifest; before any shard."""
        assert self.manifest.format == FORMAT and not self.manifest.shards
        assert len(captions) == self.settings.num_texts, (len(captions), self.settings.num_texts)
        info = write_text_table(self.directory / TEXTS, captions, encode, batch_size)
        self.manifest.texts = info
        self.save_manifest()
        self._texts = TextTable(self.directory, info, self.WHAT, self.MAKE)
        return info

    def write_shard(self, index: int, tensors: dict[str, Tensor]) -> ShardInfo:
        """Write shard ``index`` (``index``, ``latents``, ``text_index``) atomically and list it in the
        manifest (replacing an older entry)."""
        assert self.manifest.format == FORMAT and self.manifest.texts is not None, "the text table comes first"
        name = _shard_name(index)
        path = self.directory / name
        data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        _replace_atomically(path, lambda p: save_file(data, p))
        info = ShardInfo(file=name, start=int(data["index"][0]), count=len(data["index"]), bytes=path.stat().st_size,
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
    def texts(self) -> TextTable:
        """The text table (format 2)."""
        assert self._texts is not None, f"{self.WHAT} {self.directory} has no text table (format 1?)"
        return self._texts

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
        """One shard's tensors as stored (checked, cached); format 1 adds its ``prompts``."""
        key = info.start
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        path = self.directory / info.file
        self.check_size(info)
        where = f"{self.WHAT} {self.directory}: {info.file}"
        if info.file not in self._verified:
            if sha256_file(path) != info.sha256:
                raise UserError(f"{where} does not match its checksum (corrupt); delete it and rerun `{self.MAKE}` "
                                f"to regenerate it")
            self._verified.add(info.file)
        try:
            shard = dict(load_file(path))
            if self.manifest.format == 1:
                with safe_open(path, framework="pt") as fh:
                    shard["prompts"] = json.loads(fh.metadata()["prompts"])
        except Exception as err:  # safetensors and json raise their own types
            raise UserError(f"{where} is unreadable ({type(err).__name__}); delete it and rerun `{self.MAKE}`") \
                from None
        self._cache[key] = shard
        while len(self._cache) > self.CACHE_SHARDS:
            self._cache.popitem(last=False)
        return shard

    def samples(self, indices: Sequence[int]) -> dict:
        """Samples ``indices`` stacked, in float32: ``latents (B, K, C, T, H, W)``, the caption's
        ``context (B, L, D)``, ``mask (B, L)`` bool and ``extra {name: (B, …)}``, and ``prompts`` (list)."""
        starts = [s.start for s in self.manifest.shards]
        rows = []
        for i in indices:
            j = int(np.searchsorted(starts, i, side="right")) - 1
            info = self.manifest.shards[j] if j >= 0 else None
            if info is None or not info.start <= i < info.start + info.count:
                raise UserError(f"{self.WHAT} {self.directory}: sample {i} is in no finished shard "
                                f"({len(self)} of {self.settings.num} samples written); finish it with `{self.MAKE}`")
            rows.append((self.load_shard(info), i - info.start))
        latents = torch.stack([shard["latents"][r] for shard, r in rows]).float()  # (B, K, C, T, H, W)
        if self.manifest.format == 1:  # caption tokens stored per sample, float32, no extras
            return {"latents": latents, "context": torch.stack([shard["text_tokens"][r] for shard, r in rows]).float(),
                    "mask": torch.stack([shard["text_mask"][r] for shard, r in rows]), "extra": {},
                    "prompts": [shard["prompts"][r] for shard, r in rows]}
        text_index = [int(shard["text_index"][r]) for shard, r in rows]
        table = self.texts.rows(text_index)
        visual = {name: torch.stack([shard[f"visual.{name}"][r] for shard, r in rows]).float()  # (B, …) per sample
                  for name in self.settings.visual_shapes}
        return {"latents": latents, "context": table["context"].float(), "mask": table["mask"],
                "extra": {**{k.removeprefix("extra."): v.float() for k, v in table.items() if k.startswith("extra.")},
                          **visual},
                "prompts": [self.texts.captions[j] for j in text_index]}
