"""Latent caches: a video dataset (or a caption list) through a model's frozen encoders, once.

A cache holds, per kept sample, the model's normalised latents of one clip and the caption tokens
of its caption, so that training reads them instead of running the VAE and the text encoder
(DESIGN §5). ``fewstep cache`` writes one (:func:`fewstep.cache.build_cache`); the
``latent_cache`` data source (:mod:`fewstep.recipes.sources`) serves it. This module is the format
and the data preparation only (inputs, decoding, resampling, fingerprints); what runs a model
lives above it.

**Inputs** (:func:`read_inputs`): a folder of videos (``.mp4 .webm .mkv .mov .avi .m4v .mpg .mpeg
.ogv .gif``, searched recursively, sorted by path) each with a sidecar caption ``STEM.txt``; a CSV
file with columns ``path, caption``; a JSONL file of ``{"path": …, "caption": …}``; paths relative
to the folder or file. ``--prompts FILE`` (one caption per line) makes a *text-only* cache.

**A clip** (:func:`read_clip`, :func:`fit_frames`): ``T`` frames sampled at ``fps`` from the
start, frame ``k`` being the source frame nearest to time ``k / fps``::

    j_k = floor(k · fps_src / fps + 1/2),  k = 0 … T − 1     (a clip shorter than j_{T−1} + 1 frames is skipped)

then resized (bilinear, antialiased) by ``s = max(H / h, W / w)`` so that it covers ``H × W``,
centre-cropped to ``H × W`` and scaled to [−1, 1] (``x / 127.5 − 1``). A video that cannot be
decoded, is too short or has no caption is skipped and counted by reason; the run goes on.

**On disk** (a directory)::

    manifest.json                CacheManifest: settings (what the samples depend on, incl. the
                                 model fingerprint), null condition, finished shards, counts,
                                 skipped {reason: count} and the skipped items
    null.safetensors             context (1, L, D) bf16 · mask (1, L) bool: the null / negative caption
    shard_00000.safetensors      index (n,) int64 (input item) · latents (n, C, T', H', W') bf16
                                 (absent when text-only) · context (n, L, D) bf16 · mask (n, L) bool ·
                                 extra.<name> bf16: the condition's extra tensors (HunyuanVideo's
                                 pooled CLIP projection), also in null.safetensors; for an
                                 image-to-video model the clip's first-frame condition too
                                 (extra.image_latent, extra.image_mask, extra.image_embeds:
                                 model.encode_images, settings.visual), not in null.safetensors;
                                 header metadata "items": JSON {"captions": […], "paths": […]} of the n
                                 samples (one key: safetensors orders several keys arbitrarily)
    shard_00000.json             ShardRecord: the shard's items, sample count, bytes, sha256, skips

Shard ``k`` covers input items ``[k·S, (k+1)·S)`` (``S`` the shard size), whatever the number of
processes; a shard with every item skipped has a record and no file.

**Resume and integrity.** Files are written under a temporary name, fsynced and renamed; a shard's
record is written after its file, so a shard is finished exactly when its record is there (and its
file has the recorded size). The manifest is written first (settings, no shard) and merged from the
records at the end (:func:`merge_cache`); it says ``complete`` when every shard is finished. A
rerun of the same command therefore continues from the finished shards, and does nothing on a
complete cache; a rerun with another model, geometry, fps or inputs is refused (nothing is
overwritten). :class:`LatentCache` reads a complete cache, checking each shard's sha256 on first
read.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import struct
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from torch import Tensor

from ..config import StrictModel
from ..errors import UserError
from ..utils.frames import to_unit
from ..utils.io import read_json, write_bytes_atomic, write_json_atomic

MANIFEST = "manifest.json"
NULL_FILE = "null.safetensors"
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v", ".mpg", ".mpeg", ".ogv", ".gif")
STORAGE_DTYPE = torch.bfloat16


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Item:
    """One input: a video ``path`` as listed (None for a caption alone), its ``file`` on disk, its
    ``caption`` (None when it has none), and why it is skipped before decoding (``problem``)."""

    path: str | None
    file: Path | None
    caption: str | None
    problem: tuple[str, str] | None = None  # (reason, detail)


@dataclass(frozen=True)
class CacheInputs:
    """What ``--videos`` or ``--prompts`` lists: ``spec`` (the path given) and the items in order."""

    spec: str
    text_only: bool
    items: list[Item]

    def sha256(self) -> str:
        """What the cache's samples depend on of the inputs: the listed paths and captions, in order."""
        data = json.dumps([[item.path, item.caption] for item in self.items], ensure_ascii=False)
        return hashlib.sha256(data.encode()).hexdigest()


def read_inputs(videos: str | Path | None = None, prompts: str | Path | None = None) -> CacheInputs:
    """The items of ``--videos DIR|CSV|JSONL`` or ``--prompts FILE`` (exactly one); one-line errors."""
    if (videos is None) == (prompts is None):
        raise UserError("give exactly one of --videos (a folder, .csv or .jsonl file) or --prompts (a text file, "
                        "one caption per line, for a text-only cache)")
    if prompts is not None:
        lines = _read_text(Path(prompts), "--prompts").splitlines()
        items = [Item(None, None, line.strip()) for line in lines if line.strip()]
        if not items:
            raise UserError(f"--prompts {prompts}: the file holds no caption (one caption per line)")
        return CacheInputs(str(prompts), True, items)
    path = Path(videos)
    if path.is_dir():
        items = _folder_items(path)
    elif path.is_file() and path.suffix.lower() == ".csv":
        items = _csv_items(path)
    elif path.is_file() and path.suffix.lower() == ".jsonl":
        items = _jsonl_items(path)
    elif path.exists():
        raise UserError(f"--videos {videos}: expected a folder of videos, a .csv or a .jsonl file")
    else:
        raise UserError(f"--videos {videos}: no such folder or file")
    if not items:
        raise UserError(f"--videos {videos} lists no video (extensions {' '.join(VIDEO_EXTENSIONS)})")
    return CacheInputs(str(videos), False, items)


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise UserError(f"{what} {path}: no such file")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {err.start})") from None


def _item(root: Path, path: str, caption: str | None) -> Item:
    file = root / path
    caption = caption.strip() if caption is not None else None
    if not file.is_file():
        return Item(path, file, caption or None, ("missing file", f"{file} does not exist"))
    if not caption:
        return Item(path, file, None, ("no caption", "empty caption"))
    return Item(path, file, caption)


def _folder_items(root: Path) -> list[Item]:
    items = []
    for file in sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file()):
        rel, sidecar = file.relative_to(root).as_posix(), file.with_suffix(".txt")
        if not sidecar.is_file():
            items.append(Item(rel, file, None, ("no caption", f"no {sidecar.name}")))
            continue
        try:
            caption = sidecar.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as err:
            items.append(Item(rel, file, None, ("no caption", f"{sidecar.name} is not UTF-8 (byte {err.start})")))
            continue
        items.append(_item(root, rel, caption))
    return items


def _csv_items(path: Path) -> list[Item]:
    rows = csv.DictReader(_read_text(path, "--videos").splitlines())
    if rows.fieldnames is None or not {"path", "caption"} <= set(rows.fieldnames):
        raise UserError(f"--videos {path}: the CSV needs a header with columns 'path' and 'caption' "
                        f"(got {', '.join(rows.fieldnames or []) or 'none'})")
    items = []
    for row in rows:
        if not (row.get("path") or "").strip():
            raise UserError(f"--videos {path} line {rows.line_num}: empty 'path'")
        items.append(_item(path.parent, row["path"].strip(), row.get("caption")))
    return items


def _jsonl_items(path: Path) -> list[Item]:
    items = []
    for n, line in enumerate(_read_text(path, "--videos").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"--videos {path} line {n}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("path"), str) or not row["path"].strip():
            raise UserError(f"--videos {path} line {n}: expected an object with a string 'path' and 'caption'")
        caption = row.get("caption")
        if caption is not None and not isinstance(caption, str):
            raise UserError(f"--videos {path} line {n}: 'caption' must be a string")
        items.append(_item(path.parent, row["path"].strip(), caption))
    return items


# ---------------------------------------------------------------------------------------------
# Clips
# ---------------------------------------------------------------------------------------------

class SkipItem(Exception):
    """An input the cache leaves out: ``reason`` (counted in the manifest) and ``detail``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def frame_indices(frames: int, fps: float, source_fps: float) -> list[int]:
    """Source frames ``j_k = floor(k · fps_src / fps + 1/2)`` of the ``frames`` output frames (module doc)."""
    return [int(math.floor(k * source_fps / fps + 0.5)) for k in range(frames)]


def _rgb(frame) -> np.ndarray:
    """A decoded frame as ``(h, w, 3)`` uint8 (grey replicated, alpha dropped)."""
    frame = np.asarray(frame)
    if frame.dtype != np.uint8:
        raise SkipItem("unreadable", f"frames of type {frame.dtype} (expected 8-bit)")
    if frame.ndim == 2:
        frame = frame[..., None]
    if frame.ndim != 3 or frame.shape[-1] not in (1, 3, 4):
        raise SkipItem("unreadable", f"frames of shape {frame.shape}")
    return np.repeat(frame, 3, axis=-1) if frame.shape[-1] == 1 else frame[..., :3]


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def read_clip(file: Path, frames: int, fps: float) -> np.ndarray:
    """``(T, h, w, 3)`` uint8: the clip's frames at :func:`frame_indices` (decoding stops after the last).

    Raises :class:`SkipItem` (``unreadable`` or ``too short``) instead of the decoder's errors.
    """
    import imageio.v2 as imageio

    try:
        reader = imageio.get_reader(file)
    except Exception as err:  # each decoder raises its own types (OSError, ValueError, RuntimeError, …)
        raise SkipItem("unreadable", _first_line(err)) from None
    try:
        meta = reader.get_meta_data()
        source_fps = meta.get("fps") or (1000.0 / meta["duration"] if meta.get("duration") else None)  # GIF: ms/frame
        if not source_fps or not math.isfinite(source_fps) or source_fps <= 0:
            raise SkipItem("unreadable", "no frame rate")
        wanted = frame_indices(frames, fps, source_fps)
        needed, last, got, count = set(wanted), wanted[-1], {}, 0
        for j, frame in enumerate(reader):
            count = j + 1
            if j in needed:
                got[j] = _rgb(frame)
            if j >= last:
                break
    except SkipItem:
        raise
    except Exception as err:
        raise SkipItem("unreadable", _first_line(err)) from None
    finally:
        reader.close()
    if last not in got:
        raise SkipItem("too short", f"{count} frames at {source_fps:g} fps; {frames} frames at {fps:g} fps need "
                                    f"{last + 1}")
    return np.stack([got[j] for j in wanted])


def fit_frames(clip: np.ndarray, height: int, width: int) -> Tensor:
    """``(T, h, w, 3)`` uint8 → ``(T, H, W, 3)`` float32 in [−1, 1]: cover ``H × W`` (bilinear,
    antialiased), centre-crop."""
    x = to_unit(torch.from_numpy(np.ascontiguousarray(clip))).permute(0, 3, 1, 2)  # (T, 3, h, w)
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))  # covers H × W
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    x = x[:, :, top:top + height, left:left + width]  # (T, 3, H, W)
    return x.clamp(-1, 1).permute(0, 2, 3, 1).contiguous()  # (T, H, W, 3)


# ---------------------------------------------------------------------------------------------
# Model fingerprint
# ---------------------------------------------------------------------------------------------

#: Config keys that say how a module was loaded or saved, not what it computes.
_VOLATILE_KEYS = {"transformers_version", "torch_dtype", "dtype", "architectures"}


def _config_dict(config) -> Any:
    if config is None:
        return None
    if hasattr(config, "to_dict"):  # transformers
        config = config.to_dict()
    elif hasattr(config, "model_dump"):  # pydantic (the toy family)
        config = config.model_dump(mode="json")
    if isinstance(config, dict):  # diffusers' FrozenDict too
        return {k: v for k, v in sorted(config.items()) if not k.startswith("_") and k not in _VOLATILE_KEYS}
    return repr(config)


def tensor_checksum(names: Sequence[str], get: Callable[[str, int], tuple[Tensor, Sequence[int]]], tensors: int = 4,
                    elements: int = 1024) -> str:
    """sha256 of ``tensors`` evenly spaced entries of the sorted ``names``: each one's name, shape and ≤
    ``elements`` evenly spaced values of its first rows, rounded to bf16 (so a module loaded in bf16 or
    fp32 checks the same). ``get(name, rows)`` returns the tensor's first ``rows`` rows (all of a 0-/1-D
    tensor) and its full shape — what a safetensors file gives without reading the whole tensor."""
    names = sorted(names)
    h = hashlib.sha256()
    for i in sorted({round(j * (len(names) - 1) / max(tensors - 1, 1)) for j in range(tensors)} if names else ()):
        head, shape = get(names[i], elements)
        value = head.detach().flatten()
        if not value.is_floating_point():
            value = value.to(torch.float32)
        pick = torch.linspace(0, value.numel() - 1, min(elements, value.numel())).round().long().to(value.device)
        sample = value[pick].to(device="cpu", dtype=torch.float32).to(torch.bfloat16).view(torch.int16)
        h.update(f"{names[i]}{tuple(shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def _weights_checksum(module: torch.nn.Module) -> str:
    """:func:`tensor_checksum` of a loaded module's state dict."""
    state = module.state_dict()
    return tensor_checksum(list(state), lambda name, rows: (state[name][:rows] if state[name].ndim else state[name],
                                                            state[name].shape))


def _part(module, extra: dict, config=None, checksum: str | None = None) -> str | None:
    if module is None and checksum is None:
        return None
    config = getattr(module, "config", None) if config is None else config
    data = {"config": _config_dict(config), "weights": checksum or _weights_checksum(module), **extra}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_fingerprint(model) -> dict[str, str | None]:
    """What determines a cache's values, per part: ``latents`` — the latent encoder (``model.vae`` of
    a diffusers model, ``model.codec`` of a toy one): its config and :func:`_weights_checksum`;
    ``text`` — ``model.text_encoder``'s config and checksum, the caption length and the negative
    caption (``model.settings``, when the model has them). Shapes, geometry and fps are compared
    separately (:class:`CacheSettings`). The denoiser is not part of it: a teacher and its students
    share a cache. A part the model lacks is None. A diffusers model checks its encoders' safetensors
    files (``component_checksum``: the same values as the loaded modules, read without loading them).
    A model with an image encoder (Wan 2.1 I2V's CLIP) adds ``image``: that encoder's config and checksum
    (the key is absent otherwise, so the fingerprints of existing caches are unchanged)."""
    settings = getattr(model, "settings", None)
    text_extra = {"max_sequence_length": getattr(settings, "max_sequence_length", None),
                  "negative_prompt": getattr(settings, "negative_prompt", "")}
    if hasattr(model, "component_checksum"):  # a diffusers model: from its files, without loading the encoders
        parts = {"latents": _part(None, {}, model.config_of("vae"), model.component_checksum("vae")),
                 "text": _part(None, text_extra, model.config_of("text_encoder"),
                               model.component_checksum("text_encoder"))}
        if model.has_component("image_encoder"):
            parts["image"] = _part(None, {}, model.config_of("image_encoder"),
                                   model.component_checksum("image_encoder"))
        return parts
    encoder = getattr(model, "vae", None) or getattr(model, "codec", None)
    return {"latents": _part(encoder, {}), "text": _part(getattr(model, "text_encoder", None), text_extra)}


# ---------------------------------------------------------------------------------------------
# The manifest and shard records
# ---------------------------------------------------------------------------------------------

class CacheSettings(StrictModel):
    """What determines a cache's samples; a resumed run must match it exactly."""

    text_only: bool
    fingerprint: dict[str, str | None] = Field(description="model_fingerprint: latents / text parts")
    frames: int | None = Field(None, description="clip geometry T, H, W (None when text-only)")
    height: int | None = None
    width: int | None = None
    fps: float | None = Field(None, description="sampling rate of the clips' frames (None when text-only)")
    latent_shape: list[int] | None = Field(description="(C, T', H', W') of the stored latents (the model's "
                                                       "when text-only)")
    text_shape: list[int] = Field(description="(L, D) of the stored caption tokens")
    visual: dict[str, list[int]] | None = Field(
        None, description="an image-to-video model's first-frame condition stored per sample: visual extra → its "
                          "shape without the batch (None: a text-to-video model's cache)")
    dtype: str = Field(description="dtype the encoders ran in")
    inputs_sha256: str = Field(description="CacheInputs.sha256 of the listed paths and captions")
    num_items: int = Field(ge=1)
    shard_size: int = Field(ge=1)

    @property
    def num_shards(self) -> int:
        return -(-self.num_items // self.shard_size)

    def shard_range(self, shard: int) -> tuple[int, int]:
        return shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_items)


class FileInfo(StrictModel):
    file: str
    bytes: int
    sha256: str


class Skipped(StrictModel):
    path: str | None = Field(description="the video as listed (None: a caption of --prompts)")
    reason: str
    detail: str = ""


class ShardInfo(StrictModel):
    shard: int = Field(ge=0)
    start: int = Field(ge=0, description="first input item")
    stop: int = Field(description="one past the last input item")
    count: int = Field(ge=0, description="samples kept")
    file: FileInfo | None = Field(description="None when every item was skipped")


class ShardRecord(ShardInfo):
    """``shard_XXXXX.json``: a finished shard and the items it skipped."""

    skipped: list[Skipped] = Field(default_factory=list)


class CacheManifest(StrictModel):
    format: Literal[1] = 1
    kind: Literal["latent_cache"] = "latent_cache"
    model: str = Field(description="the model it was built with, as given (for the reader; not compared)")
    inputs: str = Field(description="--videos or --prompts, as given (not compared)")
    settings: CacheSettings
    null: FileInfo
    complete: bool = False
    count: int = Field(0, description="samples in finished shards")
    shards: list[ShardInfo] = Field(default_factory=list)
    skipped: dict[str, int] = Field(default_factory=dict, description="reason → items skipped")
    skipped_items: list[Skipped] = Field(default_factory=list)


def shard_name(shard: int) -> str:
    return f"shard_{shard:05d}.safetensors"


def record_name(shard: int) -> str:
    return f"shard_{shard:05d}.json"


def read_manifest(directory: Path, what: str = "latent cache") -> CacheManifest:
    """The manifest at ``directory`` (missing, unreadable or not a latent cache's: a one-line error)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise UserError(f"{what} {directory}: no {MANIFEST} (make one with `fewstep cache --out {directory}`)")
    raw = read_json(path, f"{what} {path}")
    if not isinstance(raw, dict) or raw.get("kind") != "latent_cache":
        raise UserError(f"{what} {directory}: its {MANIFEST} is not a latent cache's (made by `fewstep cache`)")
    try:
        return CacheManifest.model_validate(raw)
    except ValidationError:
        raise UserError(f"{what} {directory}: {MANIFEST} is unreadable") from None


def check_file(directory: Path, info: FileInfo, what: str) -> bool:
    """Whether ``info.file`` is there (False when missing); a size other than recorded is an error."""
    path = directory / info.file
    if not path.is_file():
        return False
    if path.stat().st_size != info.bytes:
        raise UserError(f"{what} {directory}: {info.file} is truncated or corrupt ({path.stat().st_size} bytes, "
                        f"expected {info.bytes}); delete it and rerun `fewstep cache` to regenerate it")
    return True


def read_record(directory: Path, shard: int) -> ShardRecord | None:
    """Shard ``shard``'s record if the shard is finished (record and file present), else None."""
    path = directory / record_name(shard)
    if not path.is_file():
        return None
    try:
        record = ShardRecord.model_validate(read_json(path))
    except (UserError, ValidationError):
        return None  # a record we cannot read: the shard is made again
    if record.file is not None and not check_file(directory, record.file, "latent cache"):
        return None
    return record


def write_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> FileInfo:
    """Write ``tensors`` atomically (temporary name, fsync, rename) and describe the file."""
    data = save_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    write_bytes_atomic(path, data)
    return FileInfo(file=path.name, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def merge_cache(directory: str | Path) -> CacheManifest:
    """Collect the finished shards' records into the manifest (written atomically); ``complete`` once
    every shard is finished. Safe to call at any time, any number of times."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    records = [r for k in range(manifest.settings.num_shards) if (r := read_record(directory, k)) is not None]
    skipped = [s for r in records for s in r.skipped]
    manifest.shards = [ShardInfo.model_validate(r.model_dump(exclude={"skipped"})) for r in records]
    manifest.count = sum(r.count for r in records)
    manifest.skipped = dict(sorted(Counter(s.reason for s in skipped).items()))
    manifest.skipped_items = skipped
    manifest.complete = len(records) == manifest.settings.num_shards and check_file(directory, manifest.null,
                                                                                      "latent cache")
    write_json_atomic(directory / MANIFEST, manifest.model_dump(mode="json"))
    return manifest


# ---------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------

class LatentCache:
    """A complete cache: its manifest, the null condition, and samples by index ``0 … N − 1`` (the kept
    samples in input order). Missing, incomplete or resized files are one-line errors naming them;
    shards are read lazily, sha256-checked on first read, and the last few kept in memory."""

    CACHE_SHARDS = 4

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.where = f"latent cache {self.directory}"
        self.manifest = read_manifest(self.directory)
        settings = self.manifest.settings
        if not self.manifest.complete:
            raise UserError(f"{self.where} is incomplete ({len(self.manifest.shards)} of {settings.num_shards} "
                            f"shards); rerun `fewstep cache` with the same arguments to finish it")
        if not self.manifest.count:
            raise UserError(f"{self.where} holds no sample (every input was skipped: "
                            f"{', '.join(f'{n} {r}' for r, n in self.manifest.skipped.items())})")
        self.shards = [s for s in self.manifest.shards if s.count]
        for info in [self.manifest.null] + [s.file for s in self.shards]:
            if not check_file(self.directory, info, "latent cache"):
                raise UserError(f"{self.where}: {info.file} is missing; rerun `fewstep cache` with the same "
                                f"arguments to regenerate it")
        self._starts = np.cumsum([0] + [s.count for s in self.shards])[:-1]  # first sample of each shard
        self._loaded: OrderedDict[int, dict] = OrderedDict()
        self._verified: set[str] = set()
        null = self._read(self.manifest.null)
        self.null_context, self.null_mask = null["context"], null["mask"]  # (1, L, D) bf16, (1, L) bool
        self.null_extra = {k.removeprefix("extra."): v for k, v in null.items() if k.startswith("extra.")}

    @property
    def settings(self) -> CacheSettings:
        return self.manifest.settings

    @property
    def text_only(self) -> bool:
        return self.settings.text_only

    def __len__(self) -> int:
        return self.manifest.count

    def _read(self, info: FileInfo) -> dict:
        """A file's tensors and its JSON metadata values (sha256-checked on first read)."""
        data = (self.directory / info.file).read_bytes()
        if info.file not in self._verified:
            if hashlib.sha256(data).hexdigest() != info.sha256:
                raise UserError(f"{self.where}: {info.file} does not match its checksum (corrupt); delete it and "
                                f"rerun `fewstep cache` to regenerate it")
            self._verified.add(info.file)
        try:
            out = dict(load_bytes(data))
            (size,) = struct.unpack("<Q", data[:8])  # safetensors: u64 header length, then the JSON header
            metadata = json.loads(data[8:8 + size]).get("__metadata__") or {}
            out.update(json.loads(metadata.get("items", "{}")))  # captions, paths
        except Exception as err:  # safetensors and json raise their own types
            raise UserError(f"{self.where}: {info.file} is unreadable ({type(err).__name__})") from None
        return out

    def load_shard(self, j: int) -> dict:
        """Shard ``j`` of the non-empty shards: ``index``, [``latents``], ``context``, ``mask``, ``captions``,
        ``paths``."""
        if j in self._loaded:
            self._loaded.move_to_end(j)
            return self._loaded[j]
        shard = self._read(self.shards[j].file)
        self._loaded[j] = shard
        while len(self._loaded) > self.CACHE_SHARDS:
            self._loaded.popitem(last=False)
        return shard

    def samples(self, indices: Sequence[int]) -> dict:
        """Samples ``indices`` stacked (stored dtypes): ``latents (B, C, T', H', W')`` (not when text-only),
        ``context (B, L, D)``, ``mask (B, L)``, ``index (B,)``, ``extra.<name>`` (a condition's extra tensors,
        e.g. HunyuanVideo's pooled projection); ``captions`` and ``paths`` lists."""
        rows = []
        for i in indices:
            assert 0 <= i < len(self), f"sample {i} of a cache of {len(self)}"
            j = int(np.searchsorted(self._starts, i, side="right")) - 1
            rows.append((self.load_shard(j), i - int(self._starts[j])))
        keys = ("context", "mask", "index") + (() if self.text_only else ("latents",))
        keys += tuple(k for k in rows[0][0] if k.startswith("extra.")) if rows else ()
        return {**{k: torch.stack([shard[k][r] for shard, r in rows]) for k in keys},
                "captions": [shard["captions"][r] for shard, r in rows],
                "paths": [shard["paths"][r] for shard, r in rows]}

    def check_model(self, model) -> None:
        """The cache fits ``model``: same latent encoder (unless text-only) and text encoder
        (:func:`model_fingerprint`), its latent shape and caption width; else a one-line error."""
        settings, built = self.settings, self.manifest.model
        found = model_fingerprint(model)
        parts = (("text", "text encoder"),) if self.text_only else (("latents", "VAE"), ("text", "text encoder"))
        parts += (("image", "image encoder"),) if "image" in found else ()
        for part, name in parts:
            if found[part] is not None and found[part] != settings.fingerprint.get(part):
                raise UserError(f"{self.where} was built with another model ({built}: its {name} differs from this "
                                f"model's); rebuild it with `fewstep cache --model` of this model")
        want = list(model.latent_shape(1)[1:])
        if not self.text_only and settings.latent_shape != want:
            raise UserError(f"{self.where} holds latents of shape {tuple(settings.latent_shape)} ({settings.frames}×"
                            f"{settings.height}×{settings.width} clips); the model's are {tuple(want)} "
                            f"({'×'.join(map(str, model.geometry))} clips)")
        if getattr(model, "image_conditioned", False) and settings.visual is None:
            raise UserError(f"{self.where} holds no first-frame condition ({built} is not image-to-video, or the "
                            f"cache is text-only); this model is image-to-video: rebuild it with `fewstep cache "
                            f"--videos … --model` of this model")
        if settings.text_shape[1] != model.text_dim:
            raise UserError(f"{self.where} holds caption tokens of width {settings.text_shape[1]}; the model's text "
                            f"width is {model.text_dim}")
