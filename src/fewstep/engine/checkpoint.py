"""Checkpoints: safetensors + JSON, written atomically, verified on load. Never pickle.

Layout of one checkpoint (``RUN/checkpoints/step_000500/``)::

    manifest.json              written last: every file's size and sha256 (what "complete" means)
    trainer.json               step, stage, data position, bad-step streak, role update counts,
                               health history, recipe name, world size
    config.yaml                the resolved config of the run
    roles/<role>.safetensors   weights of each trainable role (frozen roles are rebuilt from config)
    ema/<role>.safetensors     EMA weights
    optim/<role>.safetensors   optimizer tensors (``<param>::exp_avg`` …), once the role has stepped
    optim/<role>.json          the rest of the optimizer state (param groups, non-tensor values)
    objectives/<stage>.<name>.safetensors   objective state (e.g. latent queues), if any
    rng/rank<r>.json           torch / CUDA / numpy / python RNG states of every process

**Atomicity.** Everything is written into ``checkpoints/.tmp-step_000500-*``, each file
fsynced, the directory fsynced, then renamed to ``step_000500`` (``rename`` is atomic on POSIX)
and the parent fsynced. A process killed mid-write leaves only a ``.tmp-*`` directory, which
readers ignore and the next run deletes, so the previous checkpoint stays the latest one. A
complete directory that was damaged later (truncated, edited) fails the manifest check with a
one-line :class:`~fewstep.errors.UserError`.

Test hook (only for the crash test): ``FEWSTEP_TEST_CRASH_IN_CHECKPOINT=<step>`` makes the writer
``os._exit(137)`` halfway through writing that step's checkpoint — like ``kill -9``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..utils.io import make_temp_dir
from ..utils.io import sha256_file as _sha256

_STEP_DIR = re.compile(r"^step_(\d{6,})$")
CRASH_ENV = "FEWSTEP_TEST_CRASH_IN_CHECKPOINT"
_SEP = "::"  # between a parameter name and an optimizer state key (names never contain it)


@dataclass
class CheckpointData:
    """What one checkpoint holds: file stem → tensors, file stem → JSON value, and the config."""

    trainer: dict[str, Any]
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    json: dict[str, Any] = field(default_factory=dict)
    config_yaml: str = ""


# ---------------------------------------------------------------------------------------------
# Finding checkpoints
# ---------------------------------------------------------------------------------------------

def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoint directories ``(step, path)``, oldest first (``.tmp-*`` ignored)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def remove_partial(run_dir: Path) -> None:
    """Delete ``.tmp-*`` leftovers of an interrupted write."""
    root = checkpoints_dir(run_dir)
    if root.is_dir():
        for p in root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(run_dir: Path, step: int, data: CheckpointData, keep: int) -> Path:
    """Write ``data`` as ``checkpoints/step_<step>`` atomically; keep the newest ``keep``."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = make_temp_dir(root, f".tmp-{final.name}-")
    crash = os.environ.get(CRASH_ENV) == str(step)
    try:
        files: list[Path] = []
        for i, (stem, tensors) in enumerate(sorted(data.tensors.items())):
            path = tmp / f"{stem}.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path)
            files.append(path)
            if crash and i == len(data.tensors) // 2:
                os._exit(137)  # test hook: die mid-write, as kill -9 would
        for stem, value in sorted({**data.json, "trainer": data.trainer}.items()):
            path = tmp / f"{stem}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(value))
            files.append(path)
        (tmp / "config.yaml").write_text(data.config_yaml)
        files.append(tmp / "config.yaml")
        for path in files:
            _fsync(path)
        manifest = {"format": 1, "step": step,
                    "files": {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                              for p in files}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        _fsync(tmp / "manifest.json")
        for d in {p.parent for p in files} | {tmp}:
            _fsync(d)
        if final.exists():  # re-saving the same step (e.g. the end of a resumed run)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for _, old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

def read_checkpoint(path: Path) -> CheckpointData:
    """Load and verify a checkpoint directory; any damage is a one-line :class:`UserError`."""
    path = Path(path)
    hint = "; delete it to resume from the previous checkpoint"
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} is incomplete (no manifest.json){hint}") from None
    except (ValueError, KeyError, TypeError):
        raise UserError(f"checkpoint {path} is corrupt (unreadable manifest.json){hint}") from None
    for rel, meta in files.items():
        f = path / rel
        if not f.is_file():
            raise UserError(f"checkpoint {path} is corrupt: {rel} is missing{hint}")
        size = f.stat().st_size
        if size != meta["bytes"]:
            raise UserError(f"checkpoint {path} is corrupt: {rel} is truncated or altered "
                            f"({size} bytes, expected {meta['bytes']}){hint}")
        if _sha256(f) != meta["sha256"]:
            raise UserError(f"checkpoint {path} is corrupt: {rel} does not match its checksum{hint}")
    data = CheckpointData(trainer={})
    for rel in files:
        stem, ext = rel.rsplit(".", 1)
        try:
            if ext == "safetensors":
                data.tensors[stem] = load_file(path / rel)
            elif ext == "json":
                value = json.loads((path / rel).read_text())
                if stem == "trainer":
                    data.trainer = value
                else:
                    data.json[stem] = value
            elif rel == "config.yaml":
                data.config_yaml = (path / rel).read_text()
        except Exception as err:  # safetensors/json raise their own types
            raise UserError(f"checkpoint {path} is corrupt: cannot read {rel} ({type(err).__name__}){hint}") from None
    if not data.trainer:
        raise UserError(f"checkpoint {path} is corrupt: no trainer.json{hint}")
    return data


# ---------------------------------------------------------------------------------------------
# Optimizer state ⇄ (tensors, JSON)
# ---------------------------------------------------------------------------------------------

def flatten_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """A full optimizer state dict (param names as keys) → safetensors-able tensors + JSON rest."""
    tensors, rest = {}, {}
    for param, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param}{_SEP}{key}"] = value
            else:
                rest.setdefault(param, {})[key] = value
    return tensors, {"state": rest, "param_groups": state["param_groups"]}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict] = {param: dict(values) for param, values in meta["state"].items()}
    for key, value in tensors.items():
        param, name = key.split(_SEP, 1)
        state.setdefault(param, {})[name] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------------------------------
# RNG states (JSON)
# ---------------------------------------------------------------------------------------------

def capture_rng() -> dict:
    """This process's torch / CUDA / numpy / python RNG states as JSON-able lists."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {"torch": torch.get_rng_state().tolist(),
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
             "python": [py_state[0], list(py_state[1]), py_state[2]]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
