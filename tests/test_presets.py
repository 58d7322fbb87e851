"""Presets (recipes/presets.py): named overlays applied before validation, in order, under --config / --set."""

from __future__ import annotations

import pytest
import yaml

from fewstep.errors import UserError
from fewstep.recipes.base import recipe_class
from fewstep.recipes.presets import apply_presets, parse_presets, preset_names

BASE = {"a": {"b": 1, "c": {"d": 2}}, "e": [1, 2]}


def test_remove_then_set_in_order():
    presets = parse_presets({"drop": {"remove": ["a.c"]}, "add": {"set": {"a": {"c": {"x": 3}}, "e": [9]}},
                             "b2": {"set": {"a": {"b": 2}}}})
    assert apply_presets(BASE, ["drop", "add"], presets, "r") == {"a": {"b": 1, "c": {"x": 3}}, "e": [9]}
    assert apply_presets(BASE, ["add", "drop"], presets, "r") == {"a": {"b": 1}, "e": [9]}  # order matters
    assert apply_presets(BASE, ["b2"], presets, "r")["a"] == {"b": 2, "c": {"d": 2}}  # mappings merge
    assert BASE == {"a": {"b": 1, "c": {"d": 2}}, "e": [1, 2]}  # the input is left alone


def test_names_and_errors():
    assert preset_names("x, y") == ["x", "y"] and preset_names(["x"]) == ["x"] and preset_names(None) == []
    with pytest.raises(UserError, match="config key 'preset': expected a list"):
        preset_names({"x": 1})
    with pytest.raises(UserError, match="config key 'presets.bad.sett'"):
        parse_presets({"bad": {"sett": {}}})
    presets = parse_presets({"drop": {"remove": ["a.z"]}})
    with pytest.raises(UserError, match=r"'presets.drop.remove': 'a.z' is not in the config"):
        apply_presets(BASE, ["drop"], presets, "r")
    with pytest.raises(UserError, match="unknown preset 'nope' of recipe 'r'; known: drop"):
        apply_presets(BASE, ["nope"], presets, "r")


def test_a_config_file_may_declare_and_pick_presets(teacher_dir, tmp_path):
    """A user's --config adds presets of its own beside the recipe's and picks them."""
    overlay = tmp_path / "mine.yaml"
    overlay.write_text(yaml.safe_dump({"presets": {"short": {"about": "a short run", "set": {"train": {"steps": 7}}}},
                                       "preset": ["vsd", "short"]}))
    cfg = recipe_class("dollar").load_config(overlay, [f"model={teacher_dir}"])
    assert cfg.preset == ["vsd", "short"] and cfg.train.steps == 7
    assert list(cfg.stages["dollar"].objectives) == ["vsd", "fake"]
