"""The HTTP application: routes over a :class:`ServedModel` and its :class:`Batcher`.

``create_app`` builds everything a server needs from a loaded model and the settings; the inference
worker starts with the app (lifespan) and stops after the last request in flight is answered. FastAPI
is an optional extra (``lorafit[serve]``), imported when an app is made. (No postponed annotations
here: FastAPI reads the handlers' annotations, and ``Request`` is imported locally.)
"""

import asyncio
import contextlib
import logging
import time
from functools import partial
from importlib.resources import files

from .batcher import Batcher, Overloaded, Stopped
from .config import ServeConfig
from .metrics import Metrics
from .model import RequestError, ServedModel
from .schema import PredictRequest, error_body, predictions
from .security import ApiKey, read_body

log = logging.getLogger("lorafit.serve")
PAGE_DIR = files("lorafit.serving") / "page"
ROUTES = ("/", "/health", "/info", "/metrics", "/predict")


def create_app(served: ServedModel, config: ServeConfig):
    """The ASGI app; behind the API-key check when ``config.api_key`` is set."""
    from fastapi import FastAPI
    from fastapi.staticfiles import StaticFiles

    metrics = Metrics(lambda: batcher.pending)
    batcher = Batcher(partial(served.logits, batch_size=config.max_batch_size), max_batch_size=config.max_batch_size,
                      max_wait_ms=config.max_wait_ms, max_queued=config.max_concurrent,
                      on_batch=metrics.batch_size.observe)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        yield
        await asyncio.to_thread(batcher.stop)  # requests in flight are answered by now; the queue drains

    app = FastAPI(title="lorafit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher, app.state.metrics = batcher, metrics
    app.mount("/static", StaticFiles(directory=str(PAGE_DIR)), name="static")
    _add_status_routes(app, served, config, batcher, metrics)
    _add_predict_route(app, served, config, batcher, metrics)

    @app.exception_handler(Exception)
    async def internal(_request, exc):  # logged here, never sent: the client gets one line
        log.error("internal error", exc_info=exc)
        return _error(RequestError(500, "Backend", "internal error; the server log has the details"))

    guarded = ApiKey(app, config.api_key) if config.api_key else app
    return _Counted(guarded, metrics, app.state)


def _add_status_routes(app, served: ServedModel, config: ServeConfig, batcher: Batcher, metrics: Metrics) -> None:
    from fastapi.responses import HTMLResponse, Response

    page = (PAGE_DIR / "index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    @app.get("/health")
    async def health():
        if not batcher.alive:
            return _error(RequestError(503, "Unhealthy", "the model is not ready (starting or shutting down)"))
        return {"status": "ok"}

    @app.get("/info")
    async def info():
        return served.info(config)

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)


def _add_predict_route(app, served: ServedModel, config: ServeConfig, batcher: Batcher, metrics: Metrics) -> None:
    from fastapi import Request
    from fastapi.responses import JSONResponse

    @app.post("/predict")
    async def predict(request: Request):
        t0 = time.perf_counter()
        try:
            req = PredictRequest.parse(await read_body(request, config.max_request_bytes), config.max_client_batch)
            ids = served.encode(req.texts, req.truncate, req.truncation_direction)
            logits = await _infer(batcher, ids)
            metrics.texts.inc(len(ids))
            result = predictions(logits, served.labels, req.raw_scores)
            return JSONResponse(result[0] if req.single else result)
        except RequestError as e:
            return _error(e)
        finally:
            metrics.latency.observe(time.perf_counter() - t0)


async def _infer(batcher: Batcher, ids: list[list[int]]):
    try:
        future = batcher.submit(ids)
    except Overloaded as e:
        raise RequestError(429, "Overloaded", f"server busy: {e}; retry later") from e
    except Stopped as e:
        raise RequestError(503, "Unhealthy", str(e)) from e
    try:
        return await asyncio.wrap_future(future)
    except Exception as e:  # the worker logged the traceback
        raise RequestError(500, "Backend", "inference failed; the server log has the details") from e


def _error(e: RequestError):
    from fastapi.responses import JSONResponse

    return JSONResponse(error_body(e), status_code=e.status)


class _Counted:
    """ASGI middleware counting answers by route and status (401s included)."""

    def __init__(self, app, metrics: Metrics, state):
        self.app, self.metrics = app, metrics
        self.state = state  # the FastAPI app's: its batcher and metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"

        async def counting_send(event):
            if event["type"] == "http.response.start":
                self.metrics.requests.labels(route, str(event["status"])).inc()
            await send(event)

        await self.app(scope, receive, counting_send)
