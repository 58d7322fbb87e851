"""Data sources by config: a recipe's ``data:`` block names one, the recipe builds it and hands it
to the engine (:class:`~fewstep.engine.data.DataSource`; the engine imports none of them).

They live here, above the engine, because a source turns stored or rendered data into the
objectives' :class:`~fewstep.objectives.base.Batch` through the model (its codec and text
encoder); ``data/`` below only holds the formats. Registered kinds::

    data: {kind: toy_world}                            toy-world clips through the model (the default)
    data: {kind: trajectory_store, path: runs/synvid}  a teacher trajectory store (fewstep synth)
    data: runs/synvid                                  shorthand for the line above
    data: {kind: latent_cache, path: runs/cache}       a latent cache (fewstep cache): no VAE or text encoder runs

A new source is a config class with ``kind`` and ``build(model, seed)``, registered with
:func:`register_source`.

Image-to-video models (``model.image_conditioned``): every sample's condition carries the visual extras of
its *own* first frame (``cond.with_extra(model.encode_images(first frames))`` for toy clips; stored per
sample in trajectory and preference stores by ``fewstep synth`` / ``fewstep pairs``), and ``uncond`` keeps
them (``null.with_visual_of(cond)``: CFG and caption dropout drop the caption, not the image).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from ..config import KindRegistry, StrictModel
from ..data.cache import LatentCache
from ..data.toyworld import ToyWorld
from ..data.trajectories import TrajectoryStore, read_manifest
from ..engine.data import DataSource
from ..errors import UserError, warn
from ..models.backbones import Conditioning
from ..models.family import VideoModel
from ..objectives.base import Batch


class DataConfig(StrictModel):
    """Base of a data source's config: ``kind`` is its registered name."""

    kind: str

    def build(self, model: VideoModel, seed: int) -> DataSource:
        raise NotImplementedError

    def provides(self) -> set[str]:
        """What its batches carry beyond latents and captions (``Batch.extra``; objectives' ``needs()``)."""
        return set()

    def stored_times(self) -> list[float] | None:
        """The diffusion times its samples are stored at (a generator may snap to them), or None."""
        return None


DATA_SOURCES = KindRegistry("data source")
register_source = DATA_SOURCES.register
#: A recipe's ``data:`` when it gives none.
DEFAULT_DATA = {"kind": "toy_world"}


def parse_data_config(raw: Any, key: str = "data") -> DataConfig:
    """A ``data:`` value → its kind's config (a plain string is a trajectory store path); one-line errors."""
    if isinstance(raw, DataConfig):
        return raw
    if isinstance(raw, (str, Path)):
        raw = {"kind": "trajectory_store", "path": str(raw)}
    return DATA_SOURCES.parse(raw, key, also=" or a trajectory store path")


# ---------------------------------------------------------------------------------------------
# toy_world
# ---------------------------------------------------------------------------------------------

@register_source
class ToyWorldData(DataConfig):
    """Toy-world training clips (DESIGN §4) at the model's geometry; ``train.seed = s`` starts the
    stream at toy-world index ``s · 2³²``."""

    kind: Literal["toy_world"] = "toy_world"

    def build(self, model: VideoModel, seed: int) -> DataSource:
        return ToyWorldSource(model, seed)


class ToyWorldSource:
    """Toy-world clips → ``Batch(latents, cond, uncond, …)`` through the model's frozen encoders."""

    STREAM_STRIDE = 2**32

    def __init__(self, model: VideoModel, seed: int):
        frames, height, width = model.geometry
        if height != width:
            raise UserError(f"config key 'data': the toy world renders square clips; the model's are {height}×{width}")
        self.model = model  # only its codec encoder and text encoder are used
        self.offset = seed * self.STREAM_STRIDE
        self.world = ToyWorld("train", frames=frames, size=height, length=2**62)

    @torch.no_grad()
    def batch(self, positions: Sequence[int], device: torch.device) -> Batch:
        items = self.world.batch([self.offset + p for p in positions])
        frames = items["frames"].to(device)  # (B, T, H, W, 3) in [−1, 1]
        latents = self.model.encode(frames)  # (B, C, T', H', W')
        cond = self.model.encode_prompts(items["prompts"])
        if self.model.image_conditioned:  # each clip conditioned on its own first frame
            cond = cond.with_extra(self.model.encode_images(frames[:, 0]))
        uncond = self.model.null_condition(len(positions)).with_visual_of(cond)
        return Batch(latents=latents, cond=cond, uncond=uncond, prompts=items["prompts"],
                     sample_ids=torch.as_tensor(list(positions), dtype=torch.int64))


def visual_shapes(model: VideoModel) -> dict[str, list[int]]:
    """Shape of one sample's visual extras of ``model`` by name (``{}`` for a text-to-video model)."""
    if not model.image_conditioned:
        return {}
    _, height, width = model.geometry
    device = next(model.parameters()).device
    with torch.no_grad():
        visual = model.encode_images(torch.zeros(1, height, width, 3, device=device))
    return {name: list(value.shape[1:]) for name, value in visual.items()}


# ---------------------------------------------------------------------------------------------
# trajectory_store
# ---------------------------------------------------------------------------------------------

@register_source
class TrajectoryStoreData(DataConfig):
    """A teacher trajectory store (:mod:`fewstep.data.trajectories`, made by ``fewstep synth``)."""

    kind: Literal["trajectory_store"] = "trajectory_store"
    path: str = Field(description="store directory (fewstep synth --out)")

    def build(self, model: VideoModel, seed: int) -> DataSource:
        return TrajectorySource(self.path, model)

    def provides(self) -> set[str]:
        return {"trajectory"}

    def stored_times(self) -> list[float]:
        return list(read_manifest(Path(self.path)).settings.times)


class TrajectorySource:
    """A store as the engine's data stream: position ``p`` → sample ``p mod N``.

    ``Batch.latents`` is the final latent ``l_{t=0}`` (the teacher's sample), ``cond`` the stored
    caption's ``Conditioning(context, mask, extra)`` (from the store's text table; float32 whatever the
    store dtype), ``uncond`` the model's null caption; ``extra["trajectory"]`` holds the stored path
    ``(B, K, C, T, H, W)`` float32 and ``extra["key_times"]`` its times ``(B, K)`` float64 (decreasing,
    the same in every row). The store must be complete and match the model's latent and caption
    shapes, extra caption tensors included (HunyuanVideo's ``pooled_projections``).
    """

    def __init__(self, store: TrajectoryStore | str | Path, model: VideoModel):
        self.store = store if isinstance(store, TrajectoryStore) else TrajectoryStore(store)
        self.model = model  # only its text encoder is used (null caption)
        settings, where = self.store.settings, f"{self.store.WHAT} {self.store.directory}"
        if not self.store.complete:
            raise UserError(f"{where} is incomplete ({len(self.store)} of {settings.num} samples); rerun "
                            f"`{self.store.MAKE}` with the same arguments to finish it")
        want = list(model.latent_shape(1)[1:])
        if settings.latent_shape != want:
            raise UserError(f"{where} holds latents of shape {tuple(settings.latent_shape)}; the model's are "
                            f"{tuple(want)} (synthesize the store with this model)")
        null = model.null_condition(1)
        if settings.text_shape != list(null.context.shape[1:]):
            raise UserError(f"{where} holds caption tokens of shape {tuple(settings.text_shape)}; the model's text "
                            f"encoder gives {tuple(null.context.shape[1:])} (synthesize the store with this model)")
        extras = {name: list(value.shape[1:]) for name, value in null.extra.items()}
        if settings.extra_shapes != extras:
            old = " (a format-1 store keeps none: synthesize it again)" if self.store.manifest.format == 1 else ""
            raise UserError(f"{where} holds caption extras {settings.extra_shapes}; the model's text encoder gives "
                            f"{extras}{old}")
        visual = visual_shapes(model)
        if getattr(settings, "visual_shapes", {}) != visual:
            raise UserError(f"{where} holds visual extras {getattr(settings, 'visual_shapes', {})}; the model "
                            f"{'takes ' + str(visual) if visual else 'is text-to-video and takes none'} (synthesize "
                            f"the store with this model)")

    @torch.no_grad()
    def batch(self, positions: Sequence[int], device: torch.device) -> Batch:
        n = self.store.settings.num
        items = self.store.samples([p % n for p in positions])
        trajectory = items["latents"].to(device)  # (B, K, C, T, H, W), decreasing times
        times = self.store.times.to(device).expand(len(positions), -1)  # (B, K)
        cond = Conditioning(items["context"].to(device), items["mask"].to(device),
                            {name: value.to(device) for name, value in items["extra"].items()})  # (B, L, D), (B, L)
        uncond = self.model.null_condition(len(positions)).with_visual_of(cond)
        return Batch(latents=trajectory[:, -1], cond=cond, uncond=uncond,
                     prompts=items["prompts"], sample_ids=torch.as_tensor(list(positions), dtype=torch.int64),
                     extra={"trajectory": trajectory, "key_times": times})


# ---------------------------------------------------------------------------------------------
# latent_cache
# ---------------------------------------------------------------------------------------------

@register_source
class LatentCacheData(DataConfig):
    """A latent cache (:mod:`fewstep.data.cache`, made by ``fewstep cache``) of the recipe's model."""

    kind: Literal["latent_cache"] = "latent_cache"
    path: str = Field(description="cache directory (fewstep cache --out)")
    shuffle: bool = Field(False, description="visit the samples in a new seeded order every epoch "
                                             "(default: position p is sample p mod N)")

    def build(self, model: VideoModel, seed: int) -> DataSource:
        return LatentCacheSource(self.path, model, seed, self.shuffle)


class LatentCacheSource:
    """A cache as the engine's data stream: position ``p`` → sample ``p mod N`` (with ``shuffle``:
    sample ``π_e(p mod N)`` of epoch ``e = p div N``, ``π_e`` a permutation seeded by ``(seed, e)``).

    ``Batch.latents`` are the stored latents (float32), ``cond`` the stored caption tokens and mask,
    ``uncond`` the stored null caption repeated; the model's VAE and text encoder are not called.
    The cache must be complete and built with this model's VAE and text encoder at its geometry
    (:meth:`~fewstep.data.cache.LatentCache.check_model`).

    A *text-only* cache has no clips: ``Batch.latents`` is then zeros of the model's latent shape,
    which objectives that draw their samples from the generator (VSD/DMD, TDM, DDPO, reward
    fine-tuning, student sampling) read only for its shape and dtype. Objectives that noise data
    latents (flow matching, consistency distillation, LRM fit on real latents) need a cache of clips.
    """

    def __init__(self, cache: LatentCache | str | Path, model: VideoModel, seed: int = 0, shuffle: bool = False):
        self.cache = cache if isinstance(cache, LatentCache) else LatentCache(cache)
        self.cache.check_model(model)
        if self.cache.text_only:
            warn(f"{self.cache.where} is text-only: Batch.latents are zeros, fit only for objectives that sample "
                 f"the generator (not flow_matching, consistency or lrm_fit on real latents)")
        self.seed, self.shuffle = seed, shuffle
        self.latent_shape = tuple(model.latent_shape(1)[1:])  # (C, T', H', W')
        self._order: tuple[int, Tensor] | None = None  # (epoch, permutation) of the last epoch read

    def sample_index(self, position: int) -> int:
        n = len(self.cache)
        if not self.shuffle:
            return position % n
        epoch = position // n
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
            self._order = (epoch, torch.randperm(n, generator=generator))
        return int(self._order[1][position % n])

    @torch.no_grad()
    def batch(self, positions: Sequence[int], device: torch.device) -> Batch:
        items = self.cache.samples([self.sample_index(p) for p in positions])
        B = len(positions)
        if self.cache.text_only:
            latents = torch.zeros((B, *self.latent_shape), device=device)  # shape only (class doc)
        else:
            latents = items["latents"].to(device=device, dtype=torch.float32)  # (B, C, T', H', W')
        extra = {k.removeprefix("extra."): v.to(device=device, dtype=torch.float32)
                 for k, v in items.items() if k.startswith("extra.")}
        cond = Conditioning(items["context"].to(device=device, dtype=torch.float32), items["mask"].to(device), extra)
        null = Conditioning(self.cache.null_context.to(device=device, dtype=torch.float32),
                            self.cache.null_mask.to(device),
                            {k: v.to(device=device, dtype=torch.float32) for k, v in self.cache.null_extra.items()})
        return Batch(latents=latents, cond=cond, uncond=null.repeat(B).with_visual_of(cond), prompts=items["captions"],
                     sample_ids=torch.as_tensor(list(positions), dtype=torch.int64))


def _epoch_seed(seed: int, epoch: int) -> int:
    """63-bit seed of epoch ``epoch``'s sample order."""
    (word,) = np.random.SeedSequence([0xCAC4E, seed, epoch]).generate_state(1, dtype=np.uint64)
    return int(word) >> 1


# ---------------------------------------------------------------------------------------------
# preference_store
# ---------------------------------------------------------------------------------------------

@register_source
class PreferenceStoreData(DataConfig):
    """A synthetic preference store (:mod:`fewstep.data.preferences`, made by ``fewstep pairs``): SwiftVideo's
    trajectory-alignment pairs."""

    kind: Literal["preference_store"] = "preference_store"
    path: str = Field(description="store directory (fewstep pairs --out)")

    def build(self, model: VideoModel, seed: int) -> DataSource:
        return PreferenceSource(self.path, model)

    def provides(self) -> set[str]:
        return {"preferred", "dispreferred"}


class PreferenceSource(TrajectorySource):
    """A preference store as the engine's data stream: position ``p`` → pair ``p mod N``.

    ``Batch.latents`` is the preferred latent ``x0^w``; ``extra["preferred"]`` and ``extra["dispreferred"]``
    hold ``x0^w`` and ``x0^l`` ``(B, C, T, H, W)`` float32; ``cond`` the stored caption. The store must be
    complete and match the model's latent and caption shapes (as a trajectory store)."""

    def __init__(self, store, model: VideoModel):
        from ..data.preferences import PreferenceStore

        super().__init__(store if isinstance(store, PreferenceStore) else PreferenceStore(store), model)

    @torch.no_grad()
    def batch(self, positions: Sequence[int], device: torch.device) -> Batch:
        items = self.store.pairs([p % self.store.settings.num for p in positions])
        cond = Conditioning(items["context"].to(device), items["mask"].to(device),
                            {name: value.to(device) for name, value in items["extra"].items()})
        win, lose = items["preferred"].to(device), items["dispreferred"].to(device)  # (B, C, T, H, W) each
        uncond = self.model.null_condition(len(positions)).with_visual_of(cond)
        return Batch(latents=win, cond=cond, uncond=uncond, prompts=items["prompts"],
                     sample_ids=torch.as_tensor(list(positions), dtype=torch.int64),
                     extra={"preferred": win, "dispreferred": lose})
