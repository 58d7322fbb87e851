"""``dollar``: DOLLAR (papers/001_718f9070c203b500.txt) — ``L = L_VSD + β_CD·L_CD + β_FT·L_FT``.

Alg. 1 of the paper, as roles and objectives of one stage (``dollar.yaml``, defaults of §4.1)::

    roles
      student     G_θ ← model (Alg. 1 l. 4); EMA (0.95 per update; the paper gives none) = the CD
                  target θ⁻ and the exported model;
                  updated every 5th step (fake:student = 5:1, §4.1)
      teacher     v_θ', frozen: VSD's real score (CFG) and CD's m-step solver Denoise^m (CFG)
      fake_score  θ_fake ← model (= the teacher, l. 4), updated every step
      lrm         R^l_φ, ``build: {kind: lrm, …}`` (recipes/builders.py, App. 7.2) (only when
                  the ablation fits a latent reward model); updated every step, so that it tracks
                  the student's samples between student updates (Alg. 1 fits it once per
                  generator step; a fit is cheap next to a student step)
    stages.dollar.objectives, in Alg. 1's order
      vsd   vsd           student     weight 1            Eq. 10–13     l. 8, 10
      cd    cd            student     weight β_CD = 0.5   Eq. 6–9       l. 9–10
      fake  fake_score    fake_score                      Eq. 4 on x̂    l. 13–14
      lrm   lrm_fit       lrm                             Eq. 14        l. 16–17
      ft    lrm_finetune  student     weight β_FT = 0.25  Eq. 15        l. 19  (standardised reward, see below)
      ddpo  ddpo          student     weight 1            App. 7.4      (the VSD+DDPO baseline)

The engine updates each role once per step, roles in order of first appearance: the student
(one gradient step on ``vsd + 0.5·cd + 0.25·ft``), then the fake score, then the LRM. Alg. 1's
separate fine-tuning step (l. 19, after the LRM fit of l. 17) is therefore folded into the
student's step (l. 11) and uses the LRM as fitted up to the previous step.

**β_FT** (deviation: the paper's 1.0 is in its reward's units). ``lrm_finetune`` maximises the
standardised reward (:mod:`fewstep.objectives.reward`, "Standardised rewards"), so β_FT is in
reward standard deviations. On the toy teacher with the JPEG reward (400 steps, batch 8, mean of 4
training seeds, ``benchmarks/ablations.py --seeds 0,1,2,3``), β_FT = 0.1 / 0.2 / 0.25 / 0.3 raised
compressibility by 6.1 / 9.8 / 11.3 / 12.0 % against VSD+CD for 0.6 / 1.6 / 1.9 / 2.7 points of
total; the student buys compressibility by shrinking and simplifying its shapes, so a longer run
moves along the same frontier (1200 steps at 0.25: +16.5 % for 3.7 points). 0.25 is the default.
(At 1.0 in raw reward units, on an earlier teacher, +11 % cost 12 points and most dark
backgrounds.)

**Switches** — top-level keys, each set once (``--set key=value``); the recipe writes them into
the objectives before the config is validated (:meth:`DollarConfig._expand`), so the resolved
config (``--dry-run``, ``RUN/config.yaml``) shows exactly what runs:

``ablation``
    which DOLLAR objectives stay in the stages (§4.2–4.5, Tables 3 and 5); ``fake`` always:

    ====================  ==================  =============================================
    ``vsd``               vsd                 Tab. 3 and 6 "VSD"
    ``vsd_cd`` (default)  vsd, cd             Tab. 3 "VSD+CD": the distillation alone
    ``vsd_lrm``           vsd, lrm, ft        Tab. 5 "VSD+LRM"
    ``vsd_cd_lrm``        vsd, cd, lrm, ft    DOLLAR (Tab. 3, 5): + reward fine-tuning
    ``vsd_ddpo``          vsd, ddpo           Tab. 5 "VSD+DDPO" (needs student_steps >= 2)
    ====================  ==================  =============================================

    The ``lrm`` role is dropped when no remaining objective uses it. Objectives of other kinds
    added to a stage are left alone (mixing objectives across papers stays a config change).
``student_steps``  1 | 2 | 4: the student grid ``dollar1`` [999], ``dollar2`` [999, 499] or
    ``dollar4`` [999, 749, 499, 249] (§4.1, §4.5), written into ``generator.times`` (which every
    objective that samples the student and the exported model read) and, unless given,
    ``train.eval_steps``.
``m``  CD's teacher solver steps (Tab. 7: 1 vs 5) → ``cd.m``.
``parameterization``  ``native`` (homogeneous: x_θ from the student's own prediction type, Eq. 8)
    or ``x0`` (heterogeneous: the raw output is x0) → ``cd.parameterization``.
``reward``  the pixel reward R of ``lrm_fit`` / ``ddpo`` (``jpeg``, ``sharpness``, ``toy-clip``, …);
    their ``decoder`` defaults to the codec of ``model``.

An objective key a switch controls may be left out or given the same value; any other value is
a one-line error naming both keys.

**Guidance.** DOLLAR's CFG weights (its Eq. 9 form ``cond + w·(cond − uncond)``: 7.5 in CD, 3.5
for the real score) are our 8.5 and 4.5 (DESIGN §2) — the values for a VP teacher such as
CogVideoX. The toy flow-matching teacher uses its own sampling CFG, 2.0 (``fewstep pretrain``'s
``teacher.cfg_scale``), for both; see ``dollar.yaml``.

**Export.** ``RUN/student`` is the model with the student's EMA weights and its default sampler
set to ``consistency`` on the student grid followed by ``t = 0``, without CFG (§4.1: "distilled
student inference do not employ CFG"), so ``fewstep generate`` uses ``student_steps`` NFE.
(The engine's periodic evaluation passes a step *count* from ``train.eval_steps``, which samples
on the schedule's default grid of that many steps — the DOLLAR grid for a VP teacher, a slightly
different one for a flow-matching teacher.)

**Decoder.** ``lrm_fit`` and ``ddpo`` decode latents for the pixel reward; the recipe sets their
``decoder`` key to ``model`` and hands them that model's frozen decoder when the run is built
(:meth:`~fewstep.recipes.base.PipelineRecipe.prepare_objective`).
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from ..config import StrictModel, format_validation_error
from ..diffusion.schedules import INDEX_GRIDS, FlowMatching
from ..engine.config import _parse_objective
from ..errors import UserError
from ..models.family import SamplingConfig
from ..objectives.base import ObjectiveConfig, objective_class
from ..objectives.student import StudentGenerator, step_times
from .base import DROP_OBJECTIVE, PipelineRecipe, RecipeConfig, map_stage_objectives, register_recipe

Ablation = Literal["vsd", "vsd_cd", "vsd_lrm", "vsd_cd_lrm", "vsd_ddpo"]

#: The objective kinds the ablation switch manages, and which of them each preset keeps.
MANAGED_KINDS = ("vsd", "fake_score", "cd", "lrm_fit", "lrm_finetune", "ddpo")
ABLATIONS: dict[str, tuple[str, ...]] = {
    "vsd": ("vsd", "fake_score"),
    "vsd_cd": ("vsd", "fake_score", "cd"),
    "vsd_lrm": ("vsd", "fake_score", "lrm_fit", "lrm_finetune"),
    "vsd_cd_lrm": ("vsd", "fake_score", "cd", "lrm_fit", "lrm_finetune"),
    "vsd_ddpo": ("vsd", "fake_score", "ddpo"),
}


def _known_reward(value: str) -> str:
    from ..rewards import REWARDS

    if value not in REWARDS:
        raise ValueError(f"unknown reward {value!r}; expected one of {', '.join(REWARDS)}")
    return value


class DollarKeys(StrictModel):
    """The recipe's own keys (everything but ``train``, ``roles``, ``stages``)."""

    model: str = Field("toy-teacher", description="teacher to distil (student, teacher and fake score start "
                                                  "from it): a shipped name or a model directory")
    ablation: Ablation = Field("vsd_cd", description="DOLLAR objectives kept in the stages (module doc)")
    student_steps: Literal[1, 2, 4] = Field(4, description="student grid dollar1/dollar2/dollar4 (§4.1, §4.5)")
    m: int = Field(5, ge=1, description="CD teacher solver steps Denoise^m (DOLLAR: 5; Tab. 7 ablates 1)")
    parameterization: Literal["native", "x0"] = Field(
        "native", description="CD's x_θ: native = homogeneous (Eq. 8), x0 = heterogeneous")
    reward: str = Field("jpeg", description="pixel reward R of lrm_fit / ddpo (fewstep.rewards name)")

    @field_validator("reward")
    @classmethod
    def _check_reward(cls, value: str) -> str:
        return _known_reward(value)

    @property
    def student_grid(self) -> str:
        return f"dollar{self.student_steps}"


class DollarConfig(RecipeConfig, DollarKeys):
    """``dollar.yaml``'s keys; the switches are expanded into the stages before validation."""

    @model_validator(mode="before")
    @classmethod
    def _expand(cls, data: Any) -> Any:
        """Apply the switches to the raw mapping (module doc).

        A subclass's before-validator runs before :class:`EngineConfig`'s, which parses the
        objectives and checks roles against them: this one hands it the expanded stages (as parsed
        objective configs) and roles. Applied again to a resolved config it changes nothing, so
        ``--resume`` re-reads ``RUN/config.yaml`` as it was written.
        """
        if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
            return data
        try:
            keys = DollarKeys.model_validate({k: data[k] for k in DollarKeys.model_fields if k in data})
        except ValidationError as err:
            raise UserError(format_validation_error(err, DollarKeys)) from None
        data = copy.deepcopy(data)
        kept, found = set(ABLATIONS[keys.ablation]), set()
        used_roles: set[str] = set()
        def rewrite(key: str, raw: Any) -> Any:
            if isinstance(raw, dict) and isinstance(raw.get("kind"), str) and objective_class(raw["kind"]):
                raw = _apply_switches(raw, keys, key)
            obj = _parse_objective(raw, key)  # validated even when dropped: a typo is an error
            if not isinstance(obj, ObjectiveConfig):
                return obj  # not a mapping: the engine's own validation reports it
            if obj.kind in MANAGED_KINDS and obj.kind not in kept:
                return DROP_OBJECTIVE
            found.add(obj.kind)
            used_roles.update({obj.role} | obj.reads())
            return obj

        map_stage_objectives(data, rewrite)
        missing = [k for k in ABLATIONS[keys.ablation] if k not in found]
        if missing:
            raise UserError(f"config key 'ablation': {keys.ablation!r} needs an objective of kind {missing[0]!r} "
                            f"under stages.*.objectives (found: {', '.join(sorted(found)) or 'none'})")
        roles = data.get("roles")
        if isinstance(roles, dict) and "lrm" in roles and "lrm" not in used_roles:
            data["roles"] = {name: spec for name, spec in roles.items() if name != "lrm"}
        generator = data.setdefault("generator", {})
        if isinstance(generator, dict):
            given = generator.get("times", keys.student_grid)
            if given not in (keys.student_grid, INDEX_GRIDS[keys.student_grid]):
                raise UserError(f"config key 'generator.times': {given!r} disagrees with student_steps="
                                f"{keys.student_steps} (which sets {keys.student_grid!r}); set student_steps instead")
            data["generator"] = {"sampler": "consistency", "cfg_scale": None, **generator, "times": keys.student_grid}
        train = data.setdefault("train", {})
        if isinstance(train, dict) and "eval_steps" not in train:
            train["eval_steps"] = [keys.student_steps]
        return data


def _apply_switches(raw: dict, keys: DollarKeys, key: str) -> dict:
    """``raw`` (one objective's mapping) with the switch-controlled keys its kind has filled in."""
    fields = objective_class(raw["kind"]).Config.model_fields
    controlled = {"reward": ("reward", keys.reward)}
    if raw["kind"] == "cd":
        controlled.update(m=("m", keys.m), parameterization=("parameterization", keys.parameterization))
    out = dict(raw)
    for field, (switch, value) in controlled.items():
        if field not in fields:
            continue
        given = raw.get(field, value)
        same = given == value
        if not same:
            raise UserError(f"config key '{key}.{field}': {given!r} disagrees with {switch}={getattr(keys, switch)!r} "
                            f"(which sets {value!r}); set {switch} instead")
        out[field] = value
    if "decoder" in fields and out.get("decoder") is None:
        out["decoder"] = keys.model  # R(Dec(x)) with the codec of the model being distilled
    return out


@register_recipe
class Dollar(PipelineRecipe):
    """DOLLAR Alg. 1 (module doc). The student, teacher and fake score start from ``model``."""

    name = "dollar"
    Config = DollarConfig

    @classmethod
    def check(cls, config: DollarConfig) -> None:
        super().check(config)
        for name in ("student", "teacher", "fake_score"):
            if name not in config.roles:
                raise UserError(f"config key 'roles.{name}': the dollar recipe needs a {name} role")
        for sname, stage in config.stages.items():
            for oname, obj in stage.objectives.items():
                key = f"stages.{sname}.objectives.{oname}"
                if obj.kind == "ddpo" and config.student_steps < 2:
                    raise UserError(f"config key 'student_steps': objective {key} (ddpo) needs at least 2 student "
                                    f"steps (a stochastic transition), got {config.student_steps}")
                if obj.kind == "cd" and obj.m > (n := len(step_times(obj.grid, FlowMatching()))):
                    raise UserError(f"config key 'm': {obj.m} teacher steps exceed the {n} steps of {key}.grid "
                                    f"({obj.grid!r})")

    def student_pipeline(self):
        """The exported model samples with the run's generator: its sampler, times + t = 0 and CFG."""
        if self._export is None:
            pipe = super().student_pipeline()
            gen = StudentGenerator(self.config.generator)
            times = gen.sampling_times(pipe.denoiser.schedule)
            pipe.sampling = SamplingConfig(sampler=gen.config.sampler, steps=len(times) - 1, times=times,
                                           cfg_scale=gen.config.cfg_scale)
        return self._export
