"""``lorafit serve``: load the runs (one base, its adapters), bind the port, serve until SIGINT/SIGTERM, exit 0.

Everything that can fail on the user's input fails before the port is bound, as one line: the run
directory (missing, corrupt, for another base), the flags, a port already in use. On a signal,
uvicorn stops accepting, lets the requests in flight finish, then the app's worker drains its queue.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import sys
import threading
import warnings

from ..errors import FieldError, LorafitError
from .app import create_app
from .config import ServeConfig
from .model import ServedModel

log = logging.getLogger("lorafit.serve")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or a one-line error (port in use, host not on this machine)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise FieldError("{host} {}: cannot resolve it ({})", host, e.strerror) from e
    family, _, _, _, address = infos[0]
    # proto named: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets whose proto is TCP, and
    # with it on, a response's body waits for the client's delayed ACK of its headers: 40 ms a request
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise FieldError("{port} {}: already in use on {} (stop what uses it or pick another port)", port, host) from e
        raise FieldError("{host} {} {port} {}: cannot listen there ({})", host, port, e.strerror) from e
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(config: ServeConfig, announce=print) -> None:
    """Run the server in this (main) thread until a signal stops it."""
    try:
        import fastapi  # noqa: F401  (what create_app needs; checked before the model loads)
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise LorafitError(f"lorafit serve needs {e.name}: pip install 'lorafit[serve]'") from e
    if not config.loopback and not config.api_key:
        warnings.warn(f"--host {config.host} is reachable from other machines and no --api-key is set: "
                      f"anyone who can reach it can use the model", stacklevel=2)
    served = ServedModel.load(config)
    sock = bind(config.host, config.port)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("lorafit serve: %(levelname)s: %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    server = uvicorn.Server(uvicorn.Config(create_app(served, config), log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=60, lifespan="on"))
    names = ", ".join(f"{a.name} ({', '.join(a.labels)})" for a in served.adapters.values())
    announce(f"serving {names} at {url_of(sock)}  (Ctrl-C to stop)")
    sys.stdout.flush()
    with _signals_end_cleanly():
        server.run(sockets=[sock])
    announce("stopped: every request in flight was answered")


class _signals_end_cleanly:
    """uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again for the handler it
    found in place; with a no-op there, a requested stop ends the process with status 0."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, lambda *_: None) for s in self.SIGNALS}

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
