"""Atomic file writes: a crash or Ctrl-C never leaves a half-written artefact behind."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import FieldError, LorafitError, WriteError

TEMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds.

    The temporary file is fsynced before the rename and the folder after it, so the new file is whole on
    disk before it replaces the old one: a kill or a power cut at any moment leaves one or the other.
    A full disk or a read-only folder becomes a :class:`WriteError` naming ``path``.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        os.close(fd)
        umask = _umask()
        yield Path(tmp)
        # mkstemp makes 0600, and so do writers that replace the file themselves (safetensors does):
        # the final file gets ordinary permissions
        os.chmod(tmp, 0o666 & ~umask)
        _fsync(tmp)
        os.replace(tmp, path)
        if os.name == "posix":  # the rename itself reaches the disk only with its folder
            _fsync(path.parent, os.O_RDONLY)
    except OSError as e:
        raise WriteError(path, e.strerror or str(e)) from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _fsync(path: str | os.PathLike, flags: int = os.O_RDWR) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_temp_files(directory: str | os.PathLike) -> None:
    """Delete what :func:`atomic_path` left behind when its process was killed mid-write."""
    for tmp in Path(directory).glob(f".*{TEMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; it replaces ``path`` only if the block succeeds.

    An existing non-empty ``path`` is refused unless ``overwrite``.
    """
    path = Path(path)
    refuse_nonempty(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def refuse_nonempty(path: Path, overwrite: bool) -> None:
    """An existing non-empty ``path`` is refused unless ``overwrite``: checked before any work."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise FieldError("{out} {}: already exists and is not empty; pass {overwrite} to replace it", path)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: str | os.PathLike):
    """A JSON file's content; a malformed file becomes a one-line LorafitError naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LorafitError(f"{path}: not valid JSON ({e})") from e


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> None:
    with atomic_path(path) as tmp:
        try:
            save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        except SafetensorError as e:  # its I/O errors (a full disk) come in its own exception type
            raise WriteError(path, str(e).removeprefix("Error while serializing: ")) from e


def load_safetensors(path: str | os.PathLike) -> dict:
    """Load a safetensors file; a corrupt or truncated file becomes a one-line LorafitError."""
    with _reading_safetensors(path):
        return load_file(str(path))


def iter_safetensors(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """A safetensors file's tensors one at a time, so a loader can convert and place each before the next
    is read (peak memory: the model plus one tensor, not the model plus the whole file)."""
    with _reading_safetensors(path), safe_open(str(path), "pt") as f:
        for key in f.keys():
            yield key, f.get_tensor(key)


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata in a safetensors file's header (no tensor is read)."""
    with _reading_safetensors(path), safe_open(str(path), "pt") as f:
        return f.metadata() or {}


@contextlib.contextmanager
def _reading_safetensors(path: str | os.PathLike) -> Iterator[None]:
    if not Path(path).is_file():
        raise LorafitError(f"{path}: file not found")
    try:
        yield
    except (SafetensorError, OSError, ValueError) as e:
        raise LorafitError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from e


def from_known_fields(cls, saved: dict):
    """The dataclass ``cls`` from a saved dict, its keys that ``cls`` does not have left out (a file written
    by another version of lorafit)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in saved.items() if k in names})
