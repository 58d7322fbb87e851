"""Recipes: named training plans in a registry (STYLE §7). A recipe is its YAML, at most plus a short
Python class for what YAML cannot say.

A recipe's YAML (``recipes/<name>.yaml``; ``fewstep recipes`` lists them) declares the model every role
starts from, the data source, the student's generator, *which roles exist* and *which objectives
update them, how often, in which stages*; :class:`RecipeConfig` validates it. A YAML file with no
module of the same name is a :class:`PipelineRecipe` as it stands (``dollar``, ``accvideo``,
``accvideo_lrm``, ``finetune``)::

    model: models/my-teacher                 # a shipped model name or a model directory
    data: runs/synvid                        # recipes/sources.py: a trajectory store, or {kind: ...}
    generator: {sampler: consistency, times: dollar4, cfg_scale: null}   # how the student samples
    train: {steps: 2000, batch_size: 8, eval_every: 500}
    roles:
      student:       {optim: {lr: 1.0e-5, warmup_steps: 100}, every: 5, ema: 0.999}
      fake_score:    {optim: {lr: 1.0e-5}}
      discriminator: {build: {kind: timestep_heads, heads: 4}, optim: {lr: 1.0e-4, betas: [0.0, 0.99]}}
      teacher:       {}
    stages:
      main:
        objectives:
          vsd:   {kind: vsd, role: student, real_cfg_scale: 4.5}
          fake:  {kind: fake_score, role: fake_score}
    presets:                                 # named overlays (recipes/presets.py): --preset no_vsd
      no_vsd: {about: "...", remove: [stages.main.objectives.vsd]}

Every role is a copy of the model's denoiser unless it says ``build: {kind: …}`` (a registered
builder of recipes/builders.py); objectives are looked up by ``kind`` in
:data:`fewstep.objectives.base.OBJECTIVES` and name the roles they use by key. Several stages run
in sequence, each with its own objectives, ``steps`` and ``every`` overrides. A Python recipe
subclasses :class:`PipelineRecipe` (``name``, ``Config``: a :class:`RecipeConfig` subclass with its
own typed keys) for what YAML cannot say, e.g. :meth:`Recipe.start_stage` adding LoRA adapters when
a stage begins; its defaults are the YAML file of the same name next to its module.

``check`` (run on ``--dry-run`` too) refuses, in one line, what the types cannot: a role builder's
keys, an objective whose batches need what the data source does not give (``needs``/``provides``),
an objective that cannot train the generator (``check_generator``), a generator that cannot snap to
the stored times.
"""

from __future__ import annotations

import copy
import importlib
import pkgutil
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from pydantic import Field, SerializeAsAny, field_validator
from torch import nn

from ..config import apply_overrides, deep_merge, load_yaml, parse_config
from ..engine.config import EngineConfig
from ..engine.data import DataSource
from ..engine.evaluation import Evaluator
from ..engine.health import HealthMonitor
from ..engine.lora import merge_adapters, shared_copy
from ..engine.roles import Roles
from ..errors import UserError
from ..diffusion.schedules import FlowMatching
from ..models.family import SamplingConfig, load_model
from ..objectives.student import StudentGenerator
from .builders import parse_build
from .evaluators import DEFAULT_EVALUATOR, EvaluatorConfig, parse_evaluator_config
from .presets import Preset, apply_presets, parse_presets, preset_names
from .sources import DEFAULT_DATA, DataConfig, parse_data_config


class RecipeConfig(EngineConfig):
    """Base of every recipe's config: ``model``, ``preset``, ``data``, ``evaluator``, and the engine's
    ``train``, ``generator``, ``roles``, ``stages``."""

    dump_first: ClassVar[tuple[str, ...]] = ("model", "preset", "data", "evaluator", "generator")

    model: str = Field(description="the model every role starts from (student, teacher, fake score, …): a "
                                   "shipped name or a model directory")
    preset: list[str] = Field(default_factory=list, description=(
        "presets applied when the run started, in order (the recipe YAML's presets:; recipes/presets.py)"))
    data: SerializeAsAny[DataConfig] = Field(
        default_factory=lambda: parse_data_config(DEFAULT_DATA),
        description="data source (recipes/sources.py): {kind: ..., ...}; a plain string is a trajectory store path")
    evaluator: SerializeAsAny[EvaluatorConfig] = Field(
        default_factory=lambda: parse_evaluator_config(DEFAULT_EVALUATOR),
        description="periodic evaluation (recipes/evaluators.py): {kind: ...}")

    @field_validator("data", mode="before")
    @classmethod
    def _data_kind(cls, value: Any) -> DataConfig:
        if value is None:  # a recipe whose YAML leaves the data to the user (accvideo: the trajectory store)
            raise UserError("config key 'data': this recipe trains on data you give: --set data=DIR (a trajectory "
                            "store made by `fewstep synth --out DIR`) or data: {kind: ...} (recipes/sources.py)")
        return parse_data_config(value)

    @field_validator("evaluator", mode="before")
    @classmethod
    def _evaluator_kind(cls, value: Any) -> EvaluatorConfig:
        return parse_evaluator_config(value)


class Recipe:
    """A training plan: typed config + builders for roles and data (the engine's ``Plan``)."""

    name: ClassVar[str]
    Config: ClassVar[type[RecipeConfig]]

    def __init__(self, config: RecipeConfig):
        self.config = config

    # -- configuration ---------------------------------------------------------------------------
    @classmethod
    def defaults_path(cls) -> Path:
        """``<module dir>/<name>.yaml``."""
        module = importlib.import_module(cls.__module__)
        return Path(module.__file__).with_name(f"{cls.name}.yaml")

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        path = cls.defaults_path()
        return load_yaml(path) if path.is_file() else {}

    @classmethod
    def load_config(cls, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                    base: dict[str, Any] | None = None) -> RecipeConfig:
        """The YAML defaults ← the presets asked for ← ``path`` ← ``overrides``, validated and checked
        (:mod:`fewstep.recipes.presets`). ``base``: a resumed run's resolved config, which replaces the
        defaults and gets no preset again."""
        user = load_yaml(path) if path is not None else {}
        start = cls.defaults() if base is None else base
        merged = apply_overrides(deep_merge(start, user), list(overrides))
        names = preset_names(merged.get("preset"))
        if base is not None:
            applied = preset_names(base.get("preset"))
            if names != applied:
                raise UserError(f"config key 'preset': presets are applied when a run starts (this run started "
                                f"with {applied or 'none'}); start a new run for {names or 'none'}")
            data = merged
        else:
            presets = parse_presets(merged.get("presets"))
            defaults = {k: v for k, v in start.items() if k != "presets"}
            data = apply_presets(defaults, names, presets, cls.name)
            data = apply_overrides(deep_merge(data, user), list(overrides))
        data = {k: v for k, v in data.items() if k != "presets"}
        data["preset"] = names
        config = parse_config(cls.Config, data)
        cls.check(config)
        return config

    @classmethod
    def presets(cls) -> dict[str, Preset]:
        """The presets the recipe's YAML declares."""
        return parse_presets(cls.defaults().get("presets"))

    @classmethod
    def check(cls, config: RecipeConfig) -> None:
        """Validation beyond the config types (runs on --dry-run too): every role's ``build`` names a
        registered builder with valid keys; the data source gives every objective what its batches need;
        a generator that snaps to stored times finds them."""
        for name, spec in config.roles.items():
            if spec.build is not None:
                parse_build(spec.build, name)
        provided = config.data.provides()
        for sname, stage in config.stages.items():
            for oname, obj in stage.objectives.items():
                if missing := sorted(obj.needs() - provided):
                    raise UserError(f"config key 'stages.{sname}.objectives.{oname}': objective {obj.kind!r} needs "
                                    f"batches with {missing[0]!r}, which data kind {config.data.kind!r} does not give "
                                    f"(a trajectory store does: --set data=DIR, made by `fewstep synth`)")
        if config.generator is not None and config.generator.snap_to_data:
            stored = config.data.stored_times()
            try:
                StudentGenerator(config.generator, stored).step_times(FlowMatching())
            except UserError as err:
                raise UserError(f"config key 'generator.times': {config.generator.times!r} on {config.data.kind} "
                                f"data: {err}") from None

    def student_generator(self) -> StudentGenerator:
        """The run's one ``G_θ(ε)`` (the engine hands it to every objective as ``ctx.student``); its times
        snapped to the data's stored ones when ``generator.snap_to_data`` is set."""
        return StudentGenerator(self.config.generator, self.config.data.stored_times())

    # -- what the engine calls -----------------------------------------------------------------------
    def build_modules(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def prepare_objective(self, objective, device: torch.device) -> None:
        """Hand a freshly built objective what it needs beyond its config (called for every objective)."""

    def data_source(self, device: torch.device) -> DataSource:
        raise NotImplementedError

    def evaluator(self, monitor: HealthMonitor) -> Evaluator:
        raise NotImplementedError

    def student_pipeline(self):
        """A plain (unwrapped) model whose ``denoiser`` takes the student's weights, or None."""
        return None

    def load_student(self, pipe, weights: dict[str, torch.Tensor]) -> None:
        """Put the student role's (EMA) weights into ``student_pipeline()``'s denoiser."""
        pipe.denoiser.load_state_dict(weights)

    def example_prompt(self) -> str:
        return self.config.evaluator.example_prompt()

    def example_image(self) -> str | None:
        """``fewstep generate --image`` value for the end-of-run hint (an image-to-video model), or None."""
        return None

    def start_stage(self, index: int, roles: Roles) -> None:
        """Called when stage ``index`` begins (and replayed in order on resume, before loading)."""


class PipelineRecipe(Recipe):
    """A recipe whose networks start from one model (:func:`~fewstep.models.family.load_model`).

    ``config.model`` (a shipped name or a model directory, of any family) is loaded once. Every
    declared role without a ``build`` starts as a copy of its denoiser (trainable or frozen per the
    role's ``optim``; frozen and LoRA roles share its weights, :meth:`shares_base`); its frozen encoders feed the ``data`` source; its decoder is handed to
    objectives that score decoded samples; the student is exported as a copy of the model that
    samples with the run's generator. The evaluator's health references are the model's own samples
    when there is a teacher role.
    """

    def __init__(self, config: RecipeConfig):
        super().__init__(config)
        self._pipeline = None
        self._export = None
        self._decoders: dict[str, Callable] = {}

    @property
    def pipeline(self):
        """The loaded model (frozen); a :class:`~fewstep.models.family.VideoModel`."""
        if self._pipeline is None:
            self._pipeline = load_model(self.config.model).requires_grad_(False)
            if self.config.train.frozen_dtype == "bfloat16":  # the shared frozen base; copies that train go fp32
                self._pipeline.denoiser.to(torch.bfloat16)
        return self._pipeline

    def build_modules(self) -> dict[str, nn.Module]:
        """Every declared role: ``build: {kind: …}`` by its registered builder, else a copy of the model's
        denoiser (trainable or frozen per the role's ``optim``)."""
        modules = {}
        for name, spec in self.config.roles.items():
            if spec.build is not None:
                modules[name] = parse_build(spec.build, name).build(self.pipeline)
            elif self.shares_base(spec):
                modules[name] = shared_copy(self.pipeline.denoiser)  # frozen, or LoRA adapters added by the engine
            else:
                module = copy.deepcopy(self.pipeline.denoiser).requires_grad_(spec.trainable)
                modules[name] = module.float() if spec.trainable else module
        return modules

    def example_image(self) -> str | None:
        if not self.pipeline.image_conditioned:
            return None
        toy = getattr(self.pipeline, "prompt_grammar", None) == "toy"
        return f"toy:{self.example_prompt()}" if toy else "FIRST_FRAME.png"

    def shares_base(self, spec) -> bool:
        """Frozen and LoRA roles share the model's weights (one copy in memory); under FSDP the engine makes
        them views of one sharded base with an adapter per LoRA role (engine/roles.shared_bases)."""
        return not spec.trainable or spec.lora is not None

    def load_student(self, pipe, weights: dict[str, torch.Tensor]) -> None:
        """The student's weights into ``pipe``; a LoRA student's adapters merged into the model's base,
        ``W' = W + (α / r)·B A`` (engine/lora.py) — the base its ``build`` starts from where the builder names one
        (``source``: Wan 2.2's one expert of a ``single`` student, recipes/builders.py)."""
        spec = self.config.roles["student"]
        if spec.lora is not None:
            build = None if spec.build is None else parse_build(spec.build, "student")
            base = self.pipeline.denoiser if not hasattr(build, "source") else build.source(self.pipeline)
            weights = merge_adapters(base.state_dict(), weights, spec.lora.scale)
        pipe.denoiser.load_state_dict(weights)

    def prepare_objective(self, objective, device: torch.device) -> None:
        """Objectives that score decoded samples (``R(Dec(x))``: ``lrm_fit``, ``ddpo``) get the frozen
        decoder of the model their ``decoder`` key names — this model's when it names none."""
        if not hasattr(objective, "decoder") or objective.decoder is not None:
            return
        name = getattr(objective.config, "decoder", None) or self.config.model
        if name not in self._decoders:
            model = self.pipeline if name == self.config.model else load_model(name).requires_grad_(False)
            self._decoders[name] = model.to(device).decode
        objective.decoder = self._decoders[name]

    def data_source(self, device: torch.device) -> DataSource:
        return self.config.data.build(self.pipeline.to(device), self.config.train.seed)

    def evaluator(self, monitor: HealthMonitor) -> Evaluator:
        teacher = self.pipeline if "teacher" in self.config.roles else None
        return self.config.evaluator.build(self.config.train, monitor, self.pipeline, teacher)

    def student_pipeline(self):
        """A copy of the model that samples as the run's generator does (its sampler, its times + t = 0,
        its CFG), so ``fewstep generate`` and the periodic evaluation use the steps the student was trained
        on; with ``generator: null`` (fine-tuning) the model's own sampler. It lives in CPU memory (the
        accelerator holds the roles; the evaluation moves it there while it samples)."""
        if self._export is None:
            pipe = cpu_copy(self.pipeline).eval()
            if self.config.generator is not None:
                times = self.student_generator().sampling_times(pipe.denoiser.schedule)
                gen = self.config.generator
                pipe.sampling = SamplingConfig(sampler=gen.sampler, steps=len(times) - 1, times=times,
                                               cfg_scale=gen.cfg_scale)
            self._export = pipe
        return self._export


def cpu_copy(module: nn.Module) -> nn.Module:
    """A deep copy whose parameters and buffers are new CPU tensors, made without a second copy on the
    module's own device."""
    memo = {}
    for t in (*module.parameters(), *module.buffers()):
        if id(t) not in memo:
            c = t.detach().to("cpu", copy=True)
            memo[id(t)] = nn.Parameter(c, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else c
    return copy.deepcopy(module, memo)


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

RECIPES: dict[str, type[Recipe]] = {}


def register_recipe(cls: type[Recipe]) -> type[Recipe]:
    assert cls.name not in RECIPES or RECIPES[cls.name] is cls, f"recipe {cls.name!r} registered twice"
    RECIPES[cls.name] = cls
    return cls


def yaml_recipe(name: str, path: Path) -> type[Recipe]:
    """A recipe that is its YAML alone: a :class:`PipelineRecipe` with the base config."""
    return type(f"YamlRecipe_{name}", (PipelineRecipe,), {
        "name": name, "Config": RecipeConfig, "__module__": __name__, "__doc__": recipe_summary(path),
        "defaults_path": classmethod(lambda cls: path)})


def recipe_summary(path: Path) -> str:
    """The first comment line of a recipe's YAML (what ``fewstep recipes`` shows)."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def _discover() -> None:
    """Register every recipe module and every YAML-only recipe (``<name>.yaml`` with no module)."""
    from .. import recipes as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")
    for path in sorted(Path(package.__path__[0]).glob("*.yaml")):
        if path.stem not in RECIPES:
            RECIPES[path.stem] = yaml_recipe(path.stem, path)


def all_recipes() -> dict[str, type[Recipe]]:
    """Every recipe by name (modules and YAML-only ones)."""
    _discover()
    return dict(sorted(RECIPES.items()))


def recipe_class(name: str) -> type[Recipe]:
    """The recipe registered as ``name``: ``fewstep.recipes.<name>`` if that module exists, else
    ``<name>.yaml`` alone; unknown names list the known ones."""
    from .. import recipes as package

    if name not in RECIPES:
        try:
            importlib.import_module(f"{package.__name__}.{name}")
        except ModuleNotFoundError:
            pass
    if name not in RECIPES:
        _discover()
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}; known recipes: {', '.join(sorted(RECIPES)) or 'none'}")
    return RECIPES[name]
