"""Typed configuration: pydantic models loaded from YAML, with dotted command-line overrides.

Each component owns a small pydantic model with its defaults next to the code (STYLE §6).
Every model derives from :class:`StrictModel`, so an unknown key or a wrong type is an error
that names the key and what was expected — never a silently ignored typo.

    cfg = load_config(MyConfig, "run.yaml", ["train.lr=1e-5", "train.steps=200"])
    print(dump_config(cfg))   # the resolved config, as saved with a run

Override values are parsed as YAML scalars/lists (``1e-5`` → float, ``[1, 2]`` → list,
``null`` → None, ``true`` → bool). Error messages name keys by their config path; the tag of a
discriminated union (e.g. ``schedule: {kind: vp}``) is left out of that path.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import UserError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# ---------------------------------------------------------------------------------------------
# Loading, overriding, validating
# ---------------------------------------------------------------------------------------------

def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file, bad YAML or a non-mapping is a :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(f"config file {path} is not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise UserError(f"config file {path}: cannot read ({err.strerror or type(err).__name__})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise UserError(f"config file {path} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-5"`` → ``(["train", "lr"], 1e-5)``."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(f"override {item!r} must look like key.subkey=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """A copy of ``data`` with each ``key.subkey=value`` set (intermediate mappings created)."""
    data = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise UserError(f"override {item!r}: {'.'.join(path[:i + 1])} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def _describe_input(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _clean_loc(model: type[BaseModel], loc: tuple) -> tuple:
    """Drop the tags pydantic inserts for discriminated unions (``schedule.vp.shift`` → ``schedule.shift``)."""
    out, candidates = [], [model]
    for part in loc:
        if len(candidates) > 1:  # inside a union of models: ``part`` may be the tag
            tagged = [m for m in candidates if getattr(m.model_fields.get("kind"), "default", None) == part]
            if tagged:
                candidates = tagged
                continue
        out.append(part)
        fields = candidates[0].model_fields if len(candidates) == 1 else {}
        candidates = _model_classes(fields[part].annotation) if part in fields else []
    return tuple(out)


def _model_classes(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic model classes an annotation refers to (through Annotated/Union/Optional)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out = []
    for arg in getattr(annotation, "__args__", ()) or ():
        out += _model_classes(arg)
    origin = getattr(annotation, "__origin__", None)
    if origin is not None and not out and hasattr(annotation, "__metadata__"):
        out = _model_classes(origin)
    return out


def format_validation_error(err: ValidationError, model: type[BaseModel]) -> str:
    """One line naming the first offending key and what was expected."""
    errors = err.errors()
    first = errors[0]
    first = {**first, "loc": _clean_loc(model, first["loc"])}
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    more = f" (and {len(errors) - 1} more problem{'s' * (len(errors) > 2)})" if len(errors) > 1 else ""
    if first["type"] == "extra_forbidden":
        section = _section_fields(model, first["loc"][:-1])
        allowed = f"; allowed keys here: {', '.join(section)}" if section else ""
        return f"unknown config key '{key}'{allowed}{more}"
    if first["type"] == "missing":
        return f"missing config key '{key}'{more}"
    return f"config key '{key}': {first['msg']}, got {_describe_input(first.get('input'))}{more}"


def _section_fields(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the (nested) model at ``loc``; empty when it cannot be resolved."""
    current: Any = model
    for part in loc:
        fields = getattr(current, "model_fields", None)
        if fields is None or part not in fields:
            return []
        current = fields[part].annotation
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
    return list(getattr(current, "model_fields", {}))


def parse_config(model: type[M], data: dict[str, Any]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise UserError(format_validation_error(err, model)) from None


def load_config(model: type[M], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: dict[str, Any] | None = None) -> M:
    """``base`` (defaults of a recipe) ← YAML file ``path`` ← ``overrides``, validated as ``model``."""
    data = copy.deepcopy(base) if base else {}
    if path is not None:
        data = deep_merge(data, load_yaml(path))
    data = apply_overrides(data, list(overrides))
    return parse_config(model, data)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict update (mappings merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML (what ``--dry-run`` prints and runs save as config.yaml); the keys a
    model lists in its ``dump_first`` class attribute come first."""
    data = cfg.model_dump(mode="json")
    first = [k for k in getattr(cfg, "dump_first", ()) if k in data]
    data = {**{k: data[k] for k in first}, **{k: v for k, v in data.items() if k not in first}}
    return yaml.safe_dump(data, sort_keys=False)


class KindRegistry(dict):
    """``kind → config class`` for config blocks chosen by a ``kind:`` key (data sources, evaluators, …):
    :meth:`register` (a class decorator) and :meth:`parse` (one-line errors naming the key)."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what  # "data source", "evaluator": named in errors

    def register(self, cls):
        kind = cls.model_fields["kind"].default
        assert self.get(kind, cls) is cls, f"{self.what} {kind!r} registered twice"
        self[kind] = cls
        return cls

    def parse(self, raw: Any, key: str, also: str = ""):
        """A raw mapping → the config of its ``kind`` (``also``: what else the key may be, for the error)."""
        known = ", ".join(self)
        if not isinstance(raw, dict):
            raise UserError(f"config key '{key}': expected a mapping with a 'kind' (one of {known}){also}, "
                            f"got {type(raw).__name__}")
        kind = raw.get("kind")
        if kind is None:
            raise UserError(f"missing config key '{key}.kind' (one of {known})")
        if kind not in self:
            raise UserError(f"config key '{key}.kind': unknown {self.what} {kind!r}; known: {known}")
        cls = self[kind]
        try:
            return cls.model_validate(raw)
        except ValidationError as err:
            raise UserError(format_validation_error(err, cls).replace("config key '", f"config key '{key}.", 1)) from None
