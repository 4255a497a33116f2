"""The server's settings: one dataclass, validated before anything loads."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..errors import UsageError

TRUNCATION_DIRECTIONS = ("right", "left")


@dataclass
class ServeConfig:
    run: str  # a training run or a `lorafit merge` output
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the URL printed names it)
    max_batch_size: int = 32  # texts the worker runs together
    max_wait_ms: float = 5.0  # how long the first queued request waits for companions
    max_client_batch: int = 64  # texts in one request
    max_input_tokens: int | None = None  # None: the model's context length
    max_concurrent: int = 512  # requests admitted (queued or running) before 429
    device: str = "auto"
    precision: str = "auto"
    api_key: str | None = None  # required as `Authorization: Bearer KEY` on every route but /health
    max_request_bytes: int = 1 << 20  # larger bodies get 413 before they are read

    def __post_init__(self) -> None:
        for flag in ("max_batch_size", "max_client_batch", "max_concurrent", "max_request_bytes"):
            if getattr(self, flag) < 1:
                raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(self, flag)}")
        if self.max_input_tokens is not None and self.max_input_tokens < 1:
            raise UsageError(f"--max-input-tokens must be at least 1, got {self.max_input_tokens}")
        if self.max_wait_ms < 0:
            raise UsageError(f"--max-wait-ms must be 0 or more, got {self.max_wait_ms}")
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port must be between 0 and 65535, got {self.port}")
        if self.api_key is not None and not self.api_key.strip():
            raise UsageError("--api-key is empty")

    @property
    def loopback(self) -> bool:
        """Whether only this machine can reach the server."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # a host name: it may resolve to anything
            return False
