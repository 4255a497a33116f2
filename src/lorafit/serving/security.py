"""What the server refuses before any work: a body over the size cap, and a request without the API key.

The key is compared with ``hmac.compare_digest``, whose time does not depend on where two strings
differ, so response timing does not leak the key. The size cap is applied from Content-Length before
a byte of the body is read, and again while a chunked body streams in.
"""

from __future__ import annotations

import hmac
import json

from .model import RequestError
from .schema import error_body

OPEN_PATHS = ("/health",)  # what a load balancer probes
PAGE = "/"  # GET only (POST / classifies, as text-embeddings-inference's): the page holds no data, it sends the key
OPEN_PREFIX = "/static/"  # the page's script and style sheet


async def read_body(request, max_bytes: int) -> bytes:
    """The request body, or 413 as soon as it is known to pass ``max_bytes`` (nothing parsed yet)."""
    too_large = RequestError(413, "Validation", f"request body over {max_bytes} bytes (--max-request-bytes)")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise too_large
    chunks, seen = [], 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > max_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


class ApiKey:
    """ASGI middleware: 401 unless ``Authorization: Bearer <key>``, on every route but /health and the page."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    @staticmethod
    def is_open(method: str, path: str) -> bool:
        return path in OPEN_PATHS or path.startswith(OPEN_PREFIX) or (path == PAGE and method in ("GET", "HEAD"))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.is_open(scope["method"], scope["path"]):
            return await self.app(scope, receive, send)
        scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        body = json.dumps(error_body(RequestError(
            401, "Unauthorized", "missing or wrong API key: send the header Authorization: Bearer <key>"))).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
