"""``accvideo``: AccVideo (papers/002_2928ec4f0799f287.txt) — ``L = L_traj + λ_adv·L_adv``.

A 5-step student learns the teacher's denoising path between the key timesteps
``{1, 0.9651, 0.9130, 0.8235, 0.6363, 0}`` (§4.2) from a store of teacher trajectories (SynVid,
§4.1, made by ``fewstep synth``), while timestep-aware heads on frozen teacher features align the
distribution of its intermediate latents with the stored ones (§4.3). Alg. 1 as roles and
objectives of one stage (``accvideo.yaml``)::

    roles
      student        s_β ← model (Alg. 1 l. 1), updated every step; RUN/student
      teacher        v_θ, frozen: the feature extractor of D (Eq. 8; last block, 2/3 depth at t = 0)
      discriminator  the projection heads H_0 … H_4 (``build: {kind: timestep_heads}``: AccVideo Eq. 8's
                     :class:`~fewstep.objectives.adversarial.TimestepHeads` on the model's hidden
                     width), updated every step
    stages.accvideo.objectives, in Alg. 1's order
      traj   trajectory_guidance      student        weight 1            Eq. 6      l. 7–10
      adv_g  queue_gan_generator      student        weight λ_adv = 0.1  Eq. 7–8    l. 11–21
      adv_d  queue_gan_discriminator  discriminator  weight λ_adv = 0.1  Eq. 7–8    l. 20–22

Data: ``data:`` names the trajectory store (``--set data=DIR``, shorthand for ``{kind:
trajectory_store, path: DIR}``); batches come from :class:`~fewstep.recipes.sources.TrajectorySource`
(the final latent as ``latents``, the stored path in ``extra``). The engine updates each role once
per step, the student first: one gradient step on ``traj + 0.1·adv_g`` (Alg. 1 takes two student
steps per inner iteration, l. 10 and l. 21 — folded into one here, as the other recipes fold
theirs), then the heads on ``0.1·adv_d`` (l. 22; with Adam the 0.1 only matters through clipping). The inner loop's k cycles ``4, 3, 2, 1, 0`` over
consecutive steps (the queues' Alg. 1 order); the trajectory term draws k per sample (the
expectation of Eq. 6). See :mod:`fewstep.objectives.trajectory` and
:mod:`fewstep.objectives.adversarial` for the equations and the queues.

**Switches** — top-level keys, each set once (``--set key=value``); the recipe writes them into the
objectives before validation (:meth:`AccVideoConfig._expand`), so the resolved config
(``--dry-run``, ``RUN/config.yaml``) shows what runs:

====================  ========================================================================
``adversarial``       ``false``: trajectory guidance alone — Tab. 3 "w/ L_traj"; the GAN
                      objectives and the discriminator role are dropped
``single_head``       ``true``: one projection head for all timesteps — §5.2 "Timestep-Aware
                      Projection Heads" (Fig. 8 c; Tab. 3 "w/ L_traj and L_adv", as we read it)
``times``             ``keys`` (§4.2) or ``uniform``: ``{1, 0.8, 0.6, 0.4, 0.2, 0}`` — Tab. 4; from a
                      store the nearest stored times are used (the paper's "selected from our
                      synthetic trajectories"), so the store must be made with ``--keep all``
``source``            ``trajectory`` (synthetic trajectories) or ``forward``: toy-world data latents
                      forward-diffused to the key times with fresh noise — §3.2's "useless data
                      points" (the "Real data" setting of Tab. 3, trained with AccVideo's own
                      losses); it sets ``data`` to ``{kind: toy_world}``
====================  ========================================================================

``times`` and ``source`` go into every AccVideo objective; an objective key they control may be
left out or given the same value, any other value is a one-line error naming both keys.

**Generator and export.** ``times`` also sets ``generator: {sampler: euler, times:
accvideo_keys | accvideo_uniform}``; ``RUN/student`` samples with that generator on the grid actually
trained on (the stored times nearest it), without CFG: 5 NFE. Health references are the teacher's samples.

**Toy-world values.** The paper trains HunyuanVideo (13B) at lr 5e-6, batch 32, for 1200
iterations on 38.4K trajectories; ``accvideo.yaml`` uses lr 1e-4 for the toy student and heads and
the paper's λ_adv = 0.1.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, ValidationError, model_validator

from ..config import StrictModel, format_validation_error
from ..data.trajectories import TrajectoryStore, read_manifest
from ..errors import UserError
from ..models.family import SamplingConfig
from ..objectives.trajectory import KeyGrid, KeySource, key_grid
from .base import DROP_OBJECTIVE, PipelineRecipe, RecipeConfig, map_stage_objectives, register_recipe
from .sources import TrajectoryStoreData

#: The objective kinds the switches write into, and the adversarial ones ``adversarial: false`` drops.
ACCVIDEO_KINDS = ("trajectory_guidance", "queue_gan_generator", "queue_gan_discriminator")
ADVERSARIAL_KINDS = ("queue_gan_generator", "queue_gan_discriminator")
STUDENT_STEPS = 5  # m (§4.2)


class AccVideoKeys(StrictModel):
    """The recipe's own keys (everything but ``train``, ``roles``, ``stages``)."""

    model: str = Field("toy-teacher", description="teacher to distil (the student starts from it): a shipped name "
                                                  "or a model directory")
    adversarial: bool = Field(True, description="keep L_adv (false: Tab. 3 'w/ L_traj')")
    single_head: bool = Field(False, description="one projection head for all timesteps (§5.2 ablation)")
    times: KeyGrid = Field("keys", description="key timesteps (§4.2) or the uniform grid (Tab. 4)")
    source: KeySource = Field("trajectory", description="synthetic trajectories, or data + forward diffusion (§3.2)")


class AccVideoConfig(RecipeConfig, AccVideoKeys):
    """``accvideo.yaml``'s keys; the switches are expanded into the stages before validation."""

    @model_validator(mode="before")
    @classmethod
    def _expand(cls, data: Any) -> Any:
        """Apply the switches to the raw mapping (module doc); a fixed point on a resolved config."""
        if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
            return data
        try:
            keys = AccVideoKeys.model_validate({k: data[k] for k in AccVideoKeys.model_fields if k in data})
        except ValidationError as err:
            raise UserError(format_validation_error(err, AccVideoKeys)) from None
        data = copy.deepcopy(data)
        if keys.source == "forward":  # §3.2: toy-world data latents, forward-diffused by the objectives
            data["data"] = {"kind": "toy_world"}
        elif data.get("data") is None:
            raise UserError("config key 'data': give the trajectory store to train on (--set data=DIR, made by "
                            "`fewstep synth --out DIR`), or set source=forward to train on toy-world data")
        def rewrite(key: str, raw: Any) -> Any:
            kind = raw.get("kind") if isinstance(raw, dict) else None
            if kind in ADVERSARIAL_KINDS and not keys.adversarial:
                return DROP_OBJECTIVE
            return _write_switches(raw, keys, key) if kind in ACCVIDEO_KINDS else raw

        map_stage_objectives(data, rewrite)
        roles = data.get("roles")
        if not keys.adversarial and isinstance(roles, dict):
            data["roles"] = {name: spec for name, spec in roles.items() if name != "discriminator"}
        heads = roles.get("discriminator") if keys.adversarial and isinstance(roles, dict) else None
        if isinstance(heads, dict) and isinstance(heads.get("build"), dict):
            build = heads["build"]
            if build.get("single_head", keys.single_head) != keys.single_head:
                raise UserError(f"config key 'roles.discriminator.build.single_head': {build['single_head']!r} "
                                f"disagrees with single_head={keys.single_head!r}; set single_head instead")
            heads["build"] = {**build, "single_head": keys.single_head}
        generator = data.setdefault("generator", {})
        if isinstance(generator, dict):
            grid = f"accvideo_{keys.times}"
            if generator.get("times", grid) != grid:
                raise UserError(f"config key 'generator.times': {generator['times']!r} disagrees with times="
                                f"{keys.times!r} (which sets {grid!r}); set times instead")
            data["generator"] = {"sampler": "euler", "cfg_scale": None, **generator, "times": grid}
        train = data.setdefault("train", {})
        if isinstance(train, dict) and "eval_steps" not in train:
            train["eval_steps"] = [STUDENT_STEPS]
        return data


def _write_switches(raw: dict, keys: AccVideoKeys, key: str) -> dict:
    """``raw`` (one AccVideo objective's mapping) with ``times`` and ``source`` set from the switches."""
    out = dict(raw)
    for field in ("times", "source"):
        value = getattr(keys, field)
        if raw.get(field, value) != value:
            raise UserError(f"config key '{key}.{field}': {raw[field]!r} disagrees with {field}={value!r}; set "
                            f"{field} instead")
        out[field] = value
    return out


@register_recipe
class AccVideo(PipelineRecipe):
    """AccVideo Alg. 1 (module doc). The student and teacher start from ``model``."""

    name = "accvideo"
    Config = AccVideoConfig

    def __init__(self, config: AccVideoConfig):
        super().__init__(config)
        self._store = None

    @classmethod
    def check(cls, config: AccVideoConfig) -> None:
        super().check(config)  # roles the objectives use are checked by the engine's config
        if config.source == "trajectory":
            if not isinstance(config.data, TrajectoryStoreData):
                raise UserError(f"config key 'data.kind': source=trajectory trains on a trajectory store "
                                f"(kind trajectory_store), got {config.data.kind!r}")
            stored = torch.tensor(read_manifest(Path(config.data.path)).settings.times, dtype=torch.float64)
            try:
                key_grid(config.times, stored)
            except UserError as err:
                raise UserError(f"config key 'times': {config.times!r} on store {config.data.path}: {err}") from None

    @property
    def store(self) -> TrajectoryStore:
        if self._store is None:
            self._store = TrajectoryStore(self.config.data.path)
        return self._store

    def student_grid(self) -> list[float]:
        """The student's step times followed by 0 (decreasing): the key grid this run trains on."""
        stored = self.store.times if self.config.source == "trajectory" else None
        return key_grid(self.config.times, stored)[0].tolist()

    def student_pipeline(self):
        """The exported model: the run's generator (Euler, no CFG: 5 NFE) on the grid trained on (from a
        store, the stored times nearest ``generator.times``)."""
        if self._export is None:
            pipe = super().student_pipeline()
            grid, gen = self.student_grid(), self.config.generator
            pipe.sampling = SamplingConfig(sampler=gen.sampler, steps=len(grid) - 1, times=grid, cfg_scale=gen.cfg_scale)
        return self._export
