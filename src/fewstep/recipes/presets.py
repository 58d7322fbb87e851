"""Presets: named YAML overlays of a recipe, applied before the config is validated.

A recipe's YAML (or a ``--config`` file) may declare ``presets:``; a run picks some with
``preset: [a, b]`` (``--preset a --preset b``, or ``--set preset=a,b``)::

    presets:
      vsd:                                    # DOLLAR Tab. 3 "VSD"
        about: VSD alone: no consistency distillation
        remove: [stages.dollar.objectives.cd]
      steps2:
        about: the 2-step student (dollar2)
        set: {generator: {times: dollar2}}

Each preset is an overlay: ``remove`` deletes dotted keys, then ``set`` is deep-merged (mappings
merge, anything else replaces). The order of precedence is

    recipe defaults ← presets, in the order given ← --config FILE ← --set key=value

so an explicit key always wins over a preset. ``presets:`` itself never reaches the validated
config; ``preset:`` stays in it as the record of what was applied, which is why ``--dry-run``
and ``RUN/config.yaml`` show the resolved result. A resumed run re-reads that resolved config
and applies nothing again; asking it for other presets is an error.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import Field, ValidationError

from ..config import StrictModel, deep_merge, format_validation_error
from ..errors import UserError


class Preset(StrictModel):
    """One entry of ``presets:``."""

    about: str = Field("", description="one line: what the preset is (paper table and row)")
    remove: list[str] = Field(default_factory=list, description="dotted keys deleted first")
    set: dict[str, Any] = Field(default_factory=dict, description="an overlay deep-merged after the removals")


def preset_names(value: Any) -> list[str]:
    """``preset:`` as a list of names: a list, or one string of comma-separated names."""
    if value is None:
        return []
    if isinstance(value, str):
        return [name.strip() for name in value.split(",") if name.strip()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise UserError(f"config key 'preset': expected a list of preset names, got {value!r}")


def parse_presets(raw: Any) -> dict[str, Preset]:
    """A ``presets:`` mapping → ``{name: Preset}`` (one-line errors naming the key)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"config key 'presets': expected a mapping of preset names, got {type(raw).__name__}")
    out = {}
    for name, spec in raw.items():
        try:
            out[str(name)] = Preset.model_validate(spec if spec is not None else {})
        except ValidationError as err:
            message = format_validation_error(err, Preset).replace("config key '", f"config key 'presets.{name}.", 1)
            raise UserError(message) from None
    return out


def _remove(data: dict[str, Any], dotted: str, name: str) -> None:
    node, parts = data, dotted.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            raise UserError(f"config key 'presets.{name}.remove': {dotted!r} is not in the config "
                            f"(no {'.'.join(parts[:i + 1])!r})")
        if i == len(parts) - 1:
            del node[part]
        else:
            node = node[part]


def apply_presets(base: dict[str, Any], names: list[str], presets: dict[str, Preset], recipe: str) -> dict[str, Any]:
    """``base`` with each named preset's overlay applied in order (module doc)."""
    data = copy.deepcopy(base)
    for name in names:
        if name not in presets:
            known = ", ".join(presets) or "none"
            raise UserError(f"config key 'preset': unknown preset {name!r} of recipe {recipe!r}; known: {known}")
        for dotted in presets[name].remove:
            _remove(data, dotted, name)
        data = deep_merge(data, presets[name].set)
    return data


def describe(presets: dict[str, Preset]) -> list[str]:
    """``name — about`` lines, for ``fewstep recipes``."""
    width = max((len(name) for name in presets), default=0)
    return [f"{name:<{width}}  {preset.about}" for name, preset in presets.items()]
