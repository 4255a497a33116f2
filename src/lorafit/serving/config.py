"""The server's settings: one dataclass, validated before anything loads."""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import SettingError

TRUNCATION_DIRECTIONS = ("right", "left")
API_KEY_ENV = "LORAFIT_API_KEY"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # an adapter's name: what requests send as "model"
RUN_FILES = ("adapter.json", "classifier.json")  # what makes a folder a run (adapter or merged model)


def check_name(name: str, field: str, source: str | None = None) -> str:
    """``name`` if it can name an adapter; else refused, naming the setting (``field``, and ``source`` when
    the name came from a folder or item rather than the setting itself)."""
    if not NAME.fullmatch(name):
        where = "{%s}" % field + (" {}" if source is not None else "")
        raise SettingError(where + ": adapter name {!r} must be letters, digits, '.', '_' or '-' (at most 64, not "
                           "starting with a symbol)", *((source,) if source is not None else ()), name)
    return name


def named_run(item: str) -> tuple[str, Path]:
    """``NAME=DIR`` or ``DIR`` (named after its folder) -> (name, folder)."""
    name, sep, path = item.partition("=")
    if not sep or "/" in name or not name:
        name, path = Path(item.rstrip("/")).name or item, item
    return check_name(name, "runs", item), Path(path)


@dataclass
class ServeConfig:
    runs: tuple[str, ...] = ()  # NAME=DIR or DIR: training runs (adapters) or `lorafit merge` outputs
    runs_dir: str | None = None  # a folder whose subfolders are runs, each served under its folder's name
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the URL printed names it)
    max_batch_size: int = 32  # texts the worker runs together
    max_wait_ms: float = 5.0  # how long the first queued request waits for companions
    max_client_batch: int = 64  # texts in one request
    max_input_tokens: int | None = None  # None: the model's context length
    max_concurrent: int = 512  # requests admitted (queued or running) before 429
    device: str = "auto"
    precision: str = "auto"
    api_key: str | None = None  # required as `Authorization: Bearer KEY` on every route but /health; None: $LORAFIT_API_KEY
    max_request_bytes: int = 1 << 20  # larger bodies get 413 before they are read

    def __post_init__(self) -> None:
        if self.api_key is None:  # from the environment: a key given so stays out of the process list
            self.api_key = os.environ.get(API_KEY_ENV) or None
        self.runs = (self.runs,) if isinstance(self.runs, (str, Path)) else tuple(map(str, self.runs))
        if not self.runs and not self.runs_dir:
            raise SettingError("nothing to serve: give {runs} DIR (or NAME=DIR, repeated) or {runs_dir} DIR")
        for name in ("max_batch_size", "max_client_batch", "max_concurrent", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise SettingError("{%s} must be at least 1, got {}" % name, getattr(self, name))
        if self.max_input_tokens is not None and self.max_input_tokens < 1:
            raise SettingError("{max_input_tokens} must be at least 1, got {}", self.max_input_tokens)
        if self.max_wait_ms < 0:
            raise SettingError("{max_wait_ms} must be 0 or more, got {}", self.max_wait_ms)
        if not 0 <= self.port <= 65535:
            raise SettingError("{port} must be between 0 and 65535, got {}", self.port)
        if self.api_key is not None and not self.api_key.strip():
            raise SettingError("{api_key} is empty")

    def named_runs(self) -> dict[str, Path]:
        """Every run to serve by name, in order (``runs`` first, then ``runs_dir``'s subfolders sorted): the first is
        the default."""
        out: dict[str, Path] = {}
        pairs = [named_run(r) for r in self.runs]
        if self.runs_dir:
            folder = Path(self.runs_dir)
            if not folder.is_dir():
                raise SettingError("{runs_dir} {}: not a folder", folder)
            found = sorted(d for d in folder.iterdir() if any((d / f).is_file() for f in RUN_FILES))
            if not found:
                raise SettingError("{runs_dir} {}: no run in it (subfolders with {})", folder, " or ".join(RUN_FILES))
            pairs += [(check_name(d.name, "runs_dir", folder), d) for d in found]
        for name, path in pairs:
            if name in out:
                raise SettingError("two runs are named {!r} ({} and {}): name them, {runs} NAME=DIR", name, out[name], path)
            out[name] = path
        return out

    @property
    def loopback(self) -> bool:
        """Whether only this machine can reach the server."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # a host name: it may resolve to anything
            return False
