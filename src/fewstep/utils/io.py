"""Atomic model directories, file checksums and checked weight loading (safetensors + JSON; never pickle)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from safetensors.torch import load_file
from torch import nn

from ..errors import UserError


def replace_directory(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, replacing an existing ``dst`` with at most a moment of absence."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Write a directory atomically: fill the yielded temporary sibling; on success its files are
    fsynced and it replaces ``target``; on error it is removed and ``target`` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        replace_directory(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_weights(module: nn.Module, path: Path, owner: str, config_name: str) -> None:
    """Load ``path`` (safetensors) into ``module``; unreadable or mismatched files are one-line errors
    naming ``owner`` (e.g. ``"model runs/x/student"``) and the file."""
    try:
        state = load_file(path)
    except FileNotFoundError:
        raise UserError(f"{owner}: missing {path.name}") from None
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise UserError(f"{owner}: cannot read {path.name} ({type(err).__name__})") from None
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{owner}: {path.name} does not match {config_name} "
                        f"(missing {len(missing)}, unexpected {len(unexpected)} tensors)")
