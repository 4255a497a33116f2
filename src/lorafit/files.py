"""Atomic file writes: a crash or Ctrl-C never leaves a half-written artefact behind."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import LorafitError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield Path(tmp)
        # mkstemp makes 0600, and so do writers that replace the file themselves (safetensors does):
        # the final file gets ordinary permissions
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def load_safetensors(path: str | os.PathLike) -> dict:
    """Load a safetensors file; a corrupt or truncated file becomes a one-line LorafitError."""
    if not Path(path).is_file():
        raise LorafitError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise LorafitError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from e
