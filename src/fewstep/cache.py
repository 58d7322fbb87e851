"""``fewstep cache``: run a model's frozen encoders over a video dataset (or a caption list) once.

For every input item ``i`` (:func:`~fewstep.data.cache.read_inputs`) the clip is decoded and fitted
to the model's geometry (:func:`~fewstep.data.cache.read_clip`, :func:`~fewstep.data.cache.fit_frames`),
encoded by ``model.encode`` and its caption by ``model.encode_prompts``, in batches aligned to the
start of the item's shard, so a shard is a function of its items and the model alone and a resumed
run writes it again bit for bit. The null (negative) caption is stored once. The format, resume and
integrity rules are :mod:`fewstep.data.cache`'s.

**Image-to-video models** (``model.image_conditioned``): each clip's first frame is the condition, so the
cache also stores ``model.encode_images(frames[:, 0])`` — the visual extras (``image_latent``, ``image_mask``,
``image_embeds``) — per sample, which the ``latent_cache`` source hands to objectives in ``cond.extra``.
A text-only cache (``--prompts``) of such a model is a one-line error: it has no frames to condition on,
and a condition image invented for a caption would be a different training distribution.

**Processes.** With a ``torch.distributed`` process group (``torchrun``), or ``RANK`` and
``WORLD_SIZE`` set, process ``r`` of ``W`` makes the shards ``k`` with ``k mod W = r`` — whole shards
rather than items ``i mod W``, so that shards and their files do not depend on ``W`` and a run may
resume with another number of processes. Rank 0 writes the null condition and the first manifest,
and after a barrier merges every shard's record into the final one. Without a process group there is
no barrier: rank 0 merges what is finished when it is done, and running the same command once more
(any process) completes the manifest.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor

from .data.cache import (MANIFEST, NULL_FILE, STORAGE_DTYPE, CacheInputs, CacheManifest, CacheSettings, Item,
                         ShardRecord, Skipped, SkipItem, check_file, fit_frames, merge_cache, model_fingerprint,
                         read_clip, read_manifest, read_record, record_name, shard_name, write_safetensors)
from .errors import UserError
from .utils.io import check_writable, write_json_atomic

Progress = Callable[[str, int, int, dict], None]


@dataclass
class CacheRun:
    """What a call of :func:`build_cache` did: ``written`` shards by this process; ``manifest`` as merged
    (None on ranks other than 0); ``nothing_to_do`` when the cache was complete already."""

    directory: Path
    manifest: CacheManifest | None
    written: int
    nothing_to_do: bool
    rank: int = 0
    world_size: int = 1

    def summary(self) -> str:
        """One line for the user."""
        where = f"cache {self.directory}"
        if self.manifest is None:
            return f"rank {self.rank}/{self.world_size}: wrote {self.written} shards of {where}"
        m = self.manifest
        what = "captions" if m.settings.text_only else "clips"
        skipped = sum(m.skipped.values())
        reasons = f" ({', '.join(f'{n} {r}' for r, n in m.skipped.items())})" if skipped else ""
        if self.nothing_to_do:
            return f"{where} is complete ({m.count} {what}, {skipped} skipped); nothing to do"
        if not m.complete:
            return (f"{where}: {len(m.shards)} of {m.settings.num_shards} shards finished ({m.count} {what}); the "
                    f"other processes' shards are not finished yet: rerun the same command to complete it")
        return f"{where}: {m.count} {what} in {len(m.shards)} shards, {skipped} skipped{reasons}"


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------

@contextmanager
def process_group() -> Iterator[None]:
    """Join torchrun's processes (a gloo group, for the barrier) when ``WORLD_SIZE > 1`` says there are
    several and none is joined yet; leave it at the end."""
    import torch.distributed as dist

    started = False
    if (int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ and dist.is_available()
            and not dist.is_initialized()):
        dist.init_process_group("gloo")
        started = True
    try:
        yield
    finally:
        if started:
            dist.destroy_process_group()


def process_split(rank: int | None, world_size: int | None) -> tuple[int, int, Callable[[], None] | None]:
    """``(rank, world size, barrier)``: as given (no barrier), else the process group's, else ``RANK`` /
    ``WORLD_SIZE`` (no barrier), else one process."""
    import torch.distributed as dist

    if rank is not None or world_size is not None:
        rank, world_size = rank or 0, world_size or 1
        barrier = None
    elif dist.is_available() and dist.is_initialized():
        rank, world_size, barrier = dist.get_rank(), dist.get_world_size(), dist.barrier
    else:
        rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        barrier = None
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is not one of the {world_size} processes (RANK, WORLD_SIZE)")
    return rank, world_size, barrier


# ---------------------------------------------------------------------------------------------
# Settings and the --out directory
# ---------------------------------------------------------------------------------------------

def check_out(out: str | Path) -> None:
    """``--out`` is writable and new, empty, or a latent cache (checked before the model loads)."""
    out = Path(out)
    check_writable(out)
    if (out / MANIFEST).is_file():
        read_manifest(out, "--out")
    elif out.is_dir() and any(not _cache_file(p.name) for p in out.iterdir()):  # another process may be starting it
        raise UserError(f"--out {out} exists and is not a latent cache (no {MANIFEST}); choose an empty or new "
                        f"directory")


def _cache_file(name: str) -> bool:
    """A name the cache writes: its own files, or a temporary one (a dot file)."""
    return (name.startswith(".") or name == NULL_FILE
            or re.fullmatch(r"shard_\d{5}\.(safetensors|json)", name) is not None)


def cache_settings(model, inputs: CacheInputs, fps: float, shard_size: int):
    """``(CacheSettings, null Conditioning (1, L, D))`` of a cache of ``inputs`` made with ``model``."""
    null = model.null_condition(1)
    frames, height, width = model.geometry
    clips = not inputs.text_only
    visual = None
    if getattr(model, "image_conditioned", False):
        if not clips:
            raise UserError(f"--prompts {inputs.spec}: the model is image-to-video; a text-only cache has no first "
                            f"frames to condition it on: cache video clips (--videos), whose first frames are stored")
        probe = model.encode_images(torch.zeros(1, height, width, 3, device=_param(model).device))
        visual = {name: list(value.shape[1:]) for name, value in sorted(probe.items())}
    settings = CacheSettings(
        text_only=inputs.text_only, fingerprint=model_fingerprint(model),
        frames=frames if clips else None, height=height if clips else None, width=width if clips else None,
        fps=float(fps) if clips else None, latent_shape=list(model.latent_shape(1)[1:]),
        text_shape=list(null.context.shape[1:]), dtype=str(_param(model).dtype).removeprefix("torch."),
        inputs_sha256=inputs.sha256(), num_items=len(inputs.items), shard_size=shard_size, visual=visual)
    return settings, null


def _param(model) -> Tensor:
    return next(model.parameters())


def _difference(found: CacheManifest, wanted: CacheSettings, out: Path) -> UserError:
    """The first setting in which the cache at ``out`` differs from this run's, as one line."""
    a, b = found.settings, wanted
    end = "; rerun with the same settings to continue it, or choose another --out"
    if a.text_only != b.text_only:
        kinds = {True: "a text-only cache", False: "a cache of video clips"}
        return UserError(f"--out {out} holds {kinds[a.text_only]} (this run: {kinds[b.text_only][2:]}){end}")
    for part, name in (("latents", "VAE"), ("text", "text encoder")):
        if a.fingerprint.get(part) != b.fingerprint.get(part):
            return UserError(f"--out {out} holds a latent cache built with another model ({found.model}: its {name} "
                             f"differs from this model's){end}")
    if (a.frames, a.height, a.width) != (b.frames, b.height, b.width):
        return UserError(f"--out {out} holds a cache of {a.frames}×{a.height}×{a.width} clips (frames × height × "
                         f"width; this run: {b.frames}×{b.height}×{b.width}){end}")
    if a.inputs_sha256 != b.inputs_sha256:
        return UserError(f"--out {out} holds a cache of other inputs ({found.inputs}: {a.num_items} items; this run: "
                         f"{b.num_items} items, other paths or captions){end}")
    for name in CacheSettings.model_fields:
        if getattr(a, name) != getattr(b, name):
            return UserError(f"--out {out} holds a cache made with {name}={getattr(a, name)!r} (this run: "
                             f"{getattr(b, name)!r}){end}")
    raise AssertionError("settings differ in no field")


# ---------------------------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------------------------

def build_cache(model, inputs: CacheInputs, out: str | Path, *, fps: float = 16.0, batch_size: int = 4,
                shard_size: int = 64, model_name: str = "", rank: int | None = None, world_size: int | None = None,
                progress: Progress | None = None) -> CacheRun:
    """Make, continue, or verify the cache of ``inputs`` at ``out`` with ``model`` (module doc).

    ``model``: a :class:`~fewstep.models.family.VideoModel` at the geometry and dtype to cache with;
    ``rank``/``world_size``: this process's share (default: the process group's or ``RANK``/``WORLD_SIZE``);
    ``progress(stage, done, total, metrics)``: called per item of this process's shards.
    Everything is checked before the first write; a cache made with other settings is refused.
    """
    for name, value in (("--fps", fps), ("--batch-size", batch_size), ("--shard-size", shard_size)):
        if not value > 0:
            raise UserError(f"{name} {value} is invalid; expected a number > 0")
    out = Path(out)
    check_out(out)
    rank, world_size, barrier = process_split(rank, world_size)
    with torch.no_grad():
        settings, null = cache_settings(model, inputs, fps, shard_size)

    # 1. continue a cache made with the same settings; refuse another (one with no finished shard is replaced)
    manifest = read_manifest(out, "--out") if (out / MANIFEST).is_file() else None
    if manifest is not None and manifest.settings != settings:
        if any(out.glob("shard_*.json")):
            raise _difference(manifest, settings, out)
        manifest = None  # nothing finished yet: start afresh (rank 0 writes the new manifest)
    if (manifest is not None and manifest.complete and check_file(out, manifest.null, "latent cache")
            and all(read_record(out, k) is not None for k in range(settings.num_shards))):
        return CacheRun(out, manifest if rank == 0 else None, 0, True, rank, world_size)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        for leftover in [*out.glob(f".{MANIFEST}.*"), *out.glob(f".{NULL_FILE}.*")]:
            leftover.unlink(missing_ok=True)
        if manifest is None or not check_file(out, manifest.null, "latent cache"):
            mask = null.mask if null.mask is not None else torch.ones(null.context.shape[:2], dtype=torch.bool)
            null_info = write_safetensors(out / NULL_FILE, {"context": null.context.to(STORAGE_DTYPE),
                                                            "mask": mask.bool(), **_extras(null.extra)})
            manifest = CacheManifest(model=model_name, inputs=inputs.spec, settings=settings, null=null_info)
            write_json_atomic(out / MANIFEST, manifest.model_dump(mode="json"))

    # 2. this process's shards that are not finished, in order
    mine = [k for k in range(settings.num_shards) if k % world_size == rank]
    todo = [k for k in mine if read_record(out, k) is None]
    for k in todo:  # what an interrupted write of this shard left
        for leftover in [*out.glob(f".{shard_name(k)}.*"), *out.glob(f".{record_name(k)}.*")]:
            leftover.unlink(missing_ok=True)
    size = {k: len(range(*settings.shard_range(k))) for k in mine}
    done, total, skipped = sum(size.values()) - sum(size[k] for k in todo), sum(size.values()), 0
    if progress:
        progress("cache", done, total, {})
    for k in todo:
        def advance(n: int, skips: int, k=k) -> None:
            nonlocal done, skipped
            done, skipped = done + n, skipped + skips
            if progress:
                progress("cache", done, total, {"shard": k, "skipped": skipped})

        make_shard(model, inputs, settings, out, k, batch_size, advance)

    # 3. the manifest, once every process is done
    if barrier is not None:
        barrier()
    return CacheRun(out, merge_cache(out) if rank == 0 else None, len(todo), False, rank, world_size)


def make_shard(model, inputs: CacheInputs, settings: CacheSettings, out: Path, k: int, batch_size: int,
               advance: Callable[[int, int], None]) -> ShardRecord:
    """Encode the items of shard ``k`` in batches of ``batch_size`` kept items; write its file and record."""
    start, stop = settings.shard_range(k)
    device, dtype = _param(model).device, _param(model).dtype
    kept: list[tuple[int, Item]] = []
    parts: dict[str, list[Tensor]] = {"latents": [], "context": [], "mask": []}
    skipped: list[Skipped] = []
    pending: list[tuple[int, Item, Tensor | None]] = []  # (item index, item, frames (T, H, W, 3))

    def skip(item: Item, reason: str, detail: str) -> None:
        skipped.append(Skipped(path=item.path, reason=reason, detail=detail))

    def flush() -> None:
        if not pending:
            return
        before = len(skipped)
        rows, cond, why = _encode_captions(model, [item.caption for _, item, _ in pending])
        for r, detail in why.items():
            skip(pending[r][1], "bad caption", detail)
        batch = [pending[r] for r in rows]
        if batch:
            context, mask, extra = cond  # (b, L, D), (b, L), {name: (b, ...)}
            assert list(context.shape[1:]) == settings.text_shape, (tuple(context.shape), settings.text_shape)
            parts["context"].append(context.to("cpu", STORAGE_DTYPE))
            parts["mask"].append(mask.to("cpu", torch.bool))
            for key, value in _extras(extra).items():
                parts.setdefault(key, []).append(value)
            if not settings.text_only:
                frames = torch.stack([f for _, _, f in batch]).to(device=device, dtype=dtype)  # (b, T, H, W, 3)
                latents = model.encode(frames)  # (b, C, T', H', W')
                assert list(latents.shape[1:]) == settings.latent_shape, (tuple(latents.shape), settings.latent_shape)
                parts["latents"].append(latents.to("cpu", STORAGE_DTYPE))
                if settings.visual is not None:  # an I2V model: the first frame's condition (module doc)
                    visual = model.encode_images(frames[:, 0])  # (b, H, W, 3) → {name: (b, ...)}
                    assert {k: list(v.shape[1:]) for k, v in visual.items()} == settings.visual, settings.visual
                    for key, value in _extras(visual).items():
                        parts.setdefault(key, []).append(value)
            kept.extend((i, item) for i, item, _ in batch)
        advance(len(pending), len(skipped) - before)
        pending.clear()

    with torch.no_grad():
        for i in range(start, stop):
            item = inputs.items[i]
            if item.problem is not None:
                skip(item, *item.problem)
                advance(1, 1)
                continue
            frames = None
            if not settings.text_only:
                try:
                    clip = read_clip(item.file, settings.frames, settings.fps)  # (T, h, w, 3) uint8
                    frames = fit_frames(clip, settings.height, settings.width)  # (T, H, W, 3) in [−1, 1]
                except SkipItem as why:
                    skip(item, why.reason, why.detail)
                    advance(1, 1)
                    continue
            pending.append((i, item, frames))
            if len(pending) == batch_size:
                flush()
        flush()

    file = None
    if kept:
        tensors = {"index": torch.tensor([i for i, _ in kept], dtype=torch.int64),
                   **{key: torch.cat(value) for key, value in parts.items() if value}}
        metadata = {"items": json.dumps({"captions": [item.caption for _, item in kept],
                                         "paths": [item.path for _, item in kept]}, ensure_ascii=False)}
        file = write_safetensors(out / shard_name(k), tensors, metadata)
    record = ShardRecord(shard=k, start=start, stop=stop, count=len(kept), file=file, skipped=skipped)
    write_json_atomic(out / record_name(k), record.model_dump(mode="json"))
    return record


def _extras(extra: dict[str, Tensor]) -> dict[str, Tensor]:
    """A condition's extra tensors (HunyuanVideo's pooled CLIP projection, …) as ``extra.<name>`` entries."""
    return {f"extra.{name}": value.to("cpu", STORAGE_DTYPE) for name, value in extra.items()}


def _encode_captions(model, captions: list[str]) -> tuple[list[int], tuple[Tensor, Tensor, dict] | None,
                                                          dict[int, str]]:
    """``(rows kept, (context (b, L, D), mask (b, L), extra {name: (b, ...)}) of those rows, {row: why} of
    the others)``: the
    batch at once, or caption by caption when the text encoder refuses one (e.g. a word outside a toy
    model's vocabulary)."""
    rows, conds, why = list(range(len(captions))), [], {}
    try:
        conds.append(model.encode_prompts(captions))
    except UserError:
        rows = []
        for r, caption in enumerate(captions):
            try:
                conds.append(model.encode_prompts([caption]))
                rows.append(r)
            except UserError as err:
                why[r] = str(err)
    if not rows:
        return rows, None, why
    context = torch.cat([c.context for c in conds])
    mask = torch.cat([c.mask if c.mask is not None else torch.ones(c.context.shape[:2], dtype=torch.bool,
                                                                   device=c.context.device) for c in conds])
    extra = {name: torch.cat([c.extra[name] for c in conds]) for name in conds[0].extra}
    return rows, (context, mask, extra), why
