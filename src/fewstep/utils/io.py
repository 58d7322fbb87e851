"""The one writer of outputs: atomic files and directories, ``--out`` ownership, permissions.

Every file or directory fewstep publishes goes through here, so three promises hold everywhere:

* **Atomic.** Content is written under a temporary name *on the destination's own filesystem*
  (inside the destination directory, or its nearest existing ancestor when it does not exist
  yet), fsynced, then renamed into place: a reader never sees half a file, and an ``--out``
  that is a mount point or on another filesystem than its parent works (``rename`` across
  filesystems fails with ``EXDEV``).
* **Nothing lost.** :class:`OutputDir` refuses a non-empty ``--out`` unless ``--overwrite``;
  it records what it wrote in ``OUT/.fewstep.json`` and, when overwriting, replaces or deletes
  only those files, never one it did not write. Writability is checked before any compute.
* **The umask decides permissions.** ``mkdtemp``/``mkstemp`` create 0700/0600; we re-apply
  ``0777 & ~umask`` / ``0666 & ~umask`` so colleagues on a shared cluster can read results.

Weight files are safetensors + JSON (never pickle); :func:`load_weights` and :func:`read_json`
turn unreadable files into one-line :class:`~fewstep.errors.UserError`\\ s.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from safetensors.torch import load_file
from torch import nn

from ..errors import UserError

#: Written into every ``--out`` that :class:`OutputDir` published: which command, which files.
OWNER_FILE = ".fewstep.json"
_STAGE_PREFIX = ".fewstep-stage-"


# --- permissions ---------------------------------------------------------------------------------


def current_umask() -> int:
    """The process umask (read by setting and restoring it; there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | Path) -> None:
    """Give ``path`` (recursively for a directory) the mode a plain ``open``/``mkdir`` would have."""
    path, mask = Path(path), current_umask()
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            os.chmod(root, 0o777 & ~mask)
            for f in files:
                p = os.path.join(root, f)
                if not os.path.islink(p):
                    os.chmod(p, 0o666 & ~mask)
    elif path.exists():
        os.chmod(path, 0o666 & ~mask)


def make_temp_dir(parent: str | Path, prefix: str) -> Path:
    """``mkdtemp`` in ``parent`` with umask permissions; a one-line error if ``parent`` is not writable."""
    parent = Path(parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    except OSError as err:
        raise UserError(f"cannot write in {parent} ({err.strerror or type(err).__name__})") from None
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


def nearest_existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (where a new ``path`` would be created)."""
    path = Path(os.path.abspath(path))
    while not path.exists():
        path = path.parent
    return path


def check_writable(path: str | Path, what: str = "--out") -> None:
    """Fail now, before any compute, if ``path`` (or where it would be created) cannot be written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} exists and is not a directory")
    base = nearest_existing(path)
    if not base.is_dir():
        raise UserError(f"{what} {path}: {base} is a file, not a directory")
    try:
        probe = tempfile.mkdtemp(prefix=".fewstep-probe-", dir=base)
    except OSError as err:
        raise UserError(f"{what} {path} is not writable ({err.strerror or type(err).__name__} in {base})") from None
    os.rmdir(probe)


# --- atomic files -----------------------------------------------------------------------------------


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temporary sibling, fsync, rename over ``path`` (umask permissions)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, data) -> Path:
    """JSON with non-finite floats written as null (strict JSON readers reject NaN)."""
    return write_text_atomic(path, json.dumps(_finite(data), indent=2) + "\n")


def _finite(value):
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def read_json(path: str | Path, what: str | None = None):
    """Parse a JSON file; missing, non-UTF-8 or invalid files are one-line errors naming the file."""
    path = Path(path)
    name = what or str(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"{name}: file not found") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{name} is not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise UserError(f"{name}: cannot read ({err.strerror or type(err).__name__})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{name} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None


# --- atomic directories -----------------------------------------------------------------------------


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


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                os.fsync(fh.fileno())


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Write a directory atomically: fill the yielded temporary sibling; on success its files are
    fsynced and it replaces ``target``; on error it is removed and ``target`` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(target.parent, f".{target.name}.")
    try:
        yield tmp
        _fsync_tree(tmp)
        apply_umask(tmp)
        replace_directory(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- --out directories ---------------------------------------------------------------------------------


def _relative_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink())


def read_owner(out: Path) -> dict | None:
    """What ``OUT/.fewstep.json`` says fewstep wrote there (None if it holds none)."""
    path = Path(out) / OWNER_FILE
    if not path.is_file():
        return None
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
        return owner if isinstance(owner, dict) and isinstance(owner.get("files"), list) else None
    except (ValueError, OSError):
        return None


def user_entries(out: Path) -> list[str]:
    """Entries of ``out`` other than our stage directories and owner file."""
    if not Path(out).is_dir():
        return []
    return sorted(p.name for p in Path(out).iterdir() if p.name != OWNER_FILE and not p.name.startswith(_STAGE_PREFIX))


class OutputDir:
    """``with OutputDir(out, "eval", overwrite) as stage:`` — compute, write into ``stage``, publish.

    On entry (before any compute): ``out`` must be writable and either absent, empty, or
    ``overwrite`` given. The stage lives on ``out``'s filesystem. On success every staged file
    is renamed into ``out`` and ``OUT/.fewstep.json`` lists them; files a previous fewstep
    command wrote there and this one did not are deleted; a file fewstep did not write is never
    replaced or deleted (a clash is refused before any compute for ``names``, the top-level
    entries the command will write, and again at publish time). On error ``out`` is as it was.
    """

    def __init__(self, out: str | Path, command: str, overwrite: bool = False, names: Iterable[str] = (),
                 what: str = "--out"):
        self.out, self.command, self.overwrite, self.what = Path(out), command, overwrite, what
        self.names = list(names)
        self.stage: Path | None = None
        self._checked = False

    def check(self) -> None:
        """The checks of entry; call it early (before loading models) and entry will not repeat it,
        so a command may write a sub-directory of its own into ``out`` in between (the demo's run)."""
        self._checked = True
        out, what = self.out, self.what
        check_writable(out, what)
        if not user_entries(out):
            return
        owner = read_owner(out)
        if not self.overwrite:
            whose = f"the output of a fewstep {owner.get('command')!r}" if owner else "files fewstep did not write"
            raise UserError(f"{what} {out} is not empty (it holds {whose}); pass --overwrite to write into it "
                            f"(files fewstep did not write are kept) or choose another {what}")
        ours = set(owner["files"]) if owner else set()
        for name in self.names:
            target = out / name
            if (target.is_file() or target.is_symlink()) and name not in ours:
                raise UserError(f"{what} {out}: {name} was not written by fewstep and would be replaced; "
                                f"move it or choose another {what}")

    def __enter__(self) -> Path:
        if not self._checked:
            self.check()
        base = self.out if self.out.is_dir() else nearest_existing(self.out)
        self.stage = make_temp_dir(base, _STAGE_PREFIX)
        return self.stage

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._publish()
        finally:
            shutil.rmtree(self.stage, ignore_errors=True)

    def _publish(self) -> None:
        out, stage = self.out, self.stage
        new = _relative_files(stage)
        owner = read_owner(out) if out.is_dir() else None
        ours = set(owner["files"]) if owner else set()
        clash = [f for f in new if (out / f).exists() and f not in ours and not (out / f).is_dir()]
        if clash:
            raise UserError(f"{self.what} {out}: {clash[0]} appeared meanwhile and was not written by fewstep; "
                            f"nothing was published")
        _fsync_tree(stage)
        apply_umask(stage)
        out.mkdir(parents=True, exist_ok=True)  # a new directory gets the umask's mode
        for rel in new:
            src, dst = stage / rel, out / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
        for rel in sorted(ours - set(new)):  # our stale outputs from an earlier run
            (out / rel).unlink(missing_ok=True)
            parent = (out / rel).parent
            while parent != out and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
        write_json_atomic(out / OWNER_FILE, {"command": self.command, "files": new})


# --- files -----------------------------------------------------------------------------------------------


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
