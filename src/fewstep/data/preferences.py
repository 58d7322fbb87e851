"""Synthetic preference stores: SwiftVideo's trajectory-alignment dataset (papers/003, §3 "Trajectory Alignment").

Each sample ``i`` is a prompt ``y`` and two videos the distribution-aligned student made from the *same*
prompt and noise: ``x0^w`` with more sampling steps (preferred, e.g. 8) and ``x0^l`` with fewer
(dispreferred, e.g. 4) — or, for the paper's "real data as preferred" comparison, the toy world's real
clip of that prompt as ``x0^w``. Written by ``fewstep pairs`` (:func:`fewstep.synth.synthesize_pairs`).

The format is the trajectory store's (:mod:`fewstep.data.trajectories`, format 2: manifest, caption
text table, shards written atomically and listed only when complete, sha256-checked, resumable with
bit-identical shards) with its own settings; a shard's ``latents`` are ``(n, 2, C, T, H, W)``: index 0
the preferred latent, 1 the dispreferred one; an image-to-video model's pairs share their condition image,
whose visual extras the shard keeps per sample (``visual.<name>``, as a trajectory store).
"""

from __future__ import annotations

from typing import Literal, Sequence

from pydantic import Field

from ..config import StrictModel
from .trajectories import StoreDtype, StoreManifest, TrajectoryStore


class PreferenceSettings(StrictModel):
    """What determines a preference store's samples; a resumed run must match it exactly."""

    model: str = Field(description="the model that sampled the pairs: shipped name or absolute directory")
    prompts: str = Field(description="'toy' or the prompt file given")
    prompts_sha256: str | None = Field(None, description="sha256 of the prompt file (None for toy)")
    num: int = Field(ge=1)
    seed: int = Field(ge=0)
    preferred: int | Literal["real"] = Field(description="sampling steps of x0^w, or 'real': the toy world's clip")
    dispreferred: int = Field(ge=1, description="sampling steps of x0^l")
    cfg_scale: float | None = Field(description="CFG of both samples (None: none, as a distilled student)")
    shard_size: int = Field(ge=1)
    latent_shape: list[int] = Field(description="(C, T, H, W)")
    text_shape: list[int] = Field(description="(L, D) of the stored caption tokens")
    dtype: StoreDtype = "float32"
    num_texts: int = Field(ge=1, description="P, rows of the caption text table")
    extra_shapes: dict[str, list[int]] = Field(default_factory=dict)
    visual_shapes: dict[str, list[int]] = Field(default_factory=dict, description="an image-to-video model's "
                                                "per-sample visual extras (shards: visual.<name>)")


class PreferenceManifest(StoreManifest):
    format: Literal[2] = 2
    settings: PreferenceSettings


class PreferenceStore(TrajectoryStore):
    """A preference store directory (module doc); :meth:`pairs` reads samples."""

    Manifest = PreferenceManifest
    WHAT = "preference store"
    MAKE = "fewstep pairs"

    def pairs(self, indices: Sequence[int]) -> dict:
        """Samples ``indices`` in float32: ``preferred`` and ``dispreferred`` ``(B, C, T, H, W)``, the caption's
        ``context``, ``mask`` and ``extra``, and ``prompts``."""
        items = self.samples(indices)
        latents = items.pop("latents")  # (B, 2, C, T, H, W)
        return {"preferred": latents[:, 0], "dispreferred": latents[:, 1], **items}
