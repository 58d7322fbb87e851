"""The layers of DESIGN §1: no module imports a higher layer (imports inside functions count), and the
engine and the recipes' base know no toy-world name."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "fewstep"

#: Top-level package or module of fewstep → its layer (higher imports lower, never the reverse).
LAYERS: dict[str, int] = {
    "__init__": 0, "errors": 0, "config": 0, "utils": 0,  # foundations
    "data": 1,
    "diffusion": 2,
    "models": 3,
    "rewards": 4, "eval": 4,
    "objectives": 5,
    "engine": 6,
    "recipes": 7,
    "cli": 8, "demo": 8, "pretrain": 8, "synth": 8, "cache": 8, "bench": 8, "export": 8,  # commands
}
TOY_NAMES = re.compile(r"Toy|toyworld|render_clip|VideoPipeline")


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def top_level(path: Path) -> str:
    """``src/fewstep/engine/data.py`` → ``engine``; ``src/fewstep/cli.py`` → ``cli``."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def imported(path: Path) -> list[tuple[str, int]]:
    """``(top-level fewstep module, line)`` of every fewstep import in ``path``, at any depth."""
    package = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)[:-1]  # e.g. [fewstep, engine]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from package, minus level − 1 parents
                base = package[:len(package) - node.level + 1]
                target = base + (node.module.split(".") if node.module else [])
            else:
                target = (node.module or "").split(".")
            if target[0] != "fewstep":
                continue
            if len(target) == 1:  # from fewstep import x (x: a module or a name of __init__)
                out += [(alias.name if alias.name in LAYERS else "__init__", node.lineno) for alias in node.names]
            else:
                out.append((target[1], node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "fewstep":
                    out.append((parts[1] if len(parts) > 1 else "__init__", node.lineno))
    return out


def test_every_module_has_a_layer():
    missing = sorted({top_level(p) for p in modules()} - set(LAYERS))
    assert not missing, f"add these to LAYERS (and to DESIGN §1): {missing}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_upward_imports(path):
    own = LAYERS[top_level(path)]
    upward = [f"line {line}: imports fewstep.{target} (layer {LAYERS[target]} > {own})"
              for target, line in imported(path) if LAYERS[target] > own]
    assert not upward, f"{path.relative_to(PACKAGE)} (layer {own}): " + "; ".join(upward)


def test_the_import_walker_sees_function_local_and_relative_imports(tmp_path):
    """The parser above on a known file: what it must find, so the layer test cannot pass vacuously."""
    found = dict(imported(PACKAGE / "recipes" / "base.py"))
    assert {"config", "engine", "errors", "models"} <= set(found)
    assert "recipes" in found  # `from .. import recipes as package`, inside recipe_class()


@pytest.mark.parametrize("path", [*sorted((PACKAGE / "engine").rglob("*.py")), PACKAGE / "recipes" / "base.py"],
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_engine_and_recipe_base_know_no_toy_world(path):
    hits = [f"line {n}: {line.strip()}" for n, line in enumerate(path.read_text().splitlines(), 1)
            if TOY_NAMES.search(line)]
    assert not hits, f"{path.relative_to(PACKAGE)} names the toy world: " + "; ".join(hits)
