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

from ..errors import LorafitError
from .batcher import Batcher, Overloaded, Stopped
from ..reporting.calibration import thresholds_for
from .config import ServeConfig
from .explanations import explain_route
from .metrics import Metrics
from .model import RequestError, ServedModel
from .schema import ClassifyRequest, PredictRequest, classification, error_body, invalid, json_object, model_card, predictions
from .security import ApiKey, read_body

log = logging.getLogger("lorafit.serve")
PAGE_DIR = files("lorafit.serving") / "page"
ROUTES = ("/", "/health", "/info", "/metrics", "/predict", "/invocations", "/classify", "/v1/classify", "/v1/models",
          "/models/{name}", "/admin/models", "/admin/models/{name}", "/explain")
TEI_PATHS = ("/predict", "/", "/invocations")  # text-embeddings-inference's predict route and its aliases


def create_app(served: ServedModel, config: ServeConfig):
    """The ASGI app; behind the API-key check when ``config.api_key`` is set."""
    from fastapi import FastAPI
    from fastapi.staticfiles import StaticFiles

    metrics = Metrics(lambda: batcher.pending)
    metrics.served(list(served.adapters))
    batcher = Batcher(partial(served.logits, batch_size=config.max_batch_size), max_batch_size=config.max_batch_size,
                      max_wait_ms=config.max_wait_ms, max_queued=config.max_concurrent,
                      on_batch=metrics.batch_size.observe)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        yield
        await asyncio.to_thread(batcher.stop)  # requests in flight are answered by now; the queue drains

    app = FastAPI(title="lorafit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher, app.state.metrics, app.state.served = batcher, metrics, served
    app.mount("/static", StaticFiles(directory=str(PAGE_DIR)), name="static")
    _add_status_routes(app, served, config, batcher, metrics)
    _add_predict_routes(app, served, config, batcher, metrics)
    _add_classify_route(app, served, config, batcher, metrics)
    explain_route(app, served, config, _error)
    _add_admin_routes(app, served, config, metrics)

    _add_error_handlers(app)

    guarded = ApiKey(app, config.api_key) if config.api_key else app
    return _Counted(guarded, metrics, app.state)


def _add_error_handlers(app) -> None:
    """Every answer that is not a 200 in the one error format: FastAPI's own (unknown path, wrong method,
    bad parameter) as well as a bug's, whose traceback goes to the log, never to the client."""
    from fastapi.exceptions import RequestValidationError, StarletteHTTPException

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        message = {404: f"no route {request.url.path}", 405: f"{request.url.path} does not take {request.method}"}
        error = RequestError(exc.status_code, "NotFound" if exc.status_code == 404 else "Validation",
                             message.get(exc.status_code, str(exc.detail)))
        return _error(error, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(_request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(map(str, first.get("loc", ()))) or "request"
        return _error(invalid(f"{where}: {first.get('msg', 'invalid')}"))

    @app.exception_handler(Exception)
    async def internal(_request, exc):  # logged here, never sent: the client gets one line
        log.error("internal error", exc_info=exc)
        return _error(RequestError(500, "Backend", "internal error; the server log has the details"))


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
    async def info(model: str | None = None):
        try:
            return served.info(config, served.resolve(model))
        except RequestError as e:
            return _error(e)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_card(served, a) for a in served.adapters.values()]}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)


def _card(served: ServedModel, adapter) -> dict:
    return model_card(adapter.name, adapter.created, served.max_input_tokens, served.describe(adapter))


def _add_predict_routes(app, served: ServedModel, config: ServeConfig, batcher: Batcher, metrics: Metrics) -> None:
    from fastapi import Request
    from fastapi.responses import JSONResponse

    async def answer(request, name: str | None):
        t0 = time.perf_counter()
        try:
            req = PredictRequest.parse(await read_body(request, config.max_request_bytes), config.max_client_batch,
                                       lambda model: served.resolve(name or model).spec.pair)
            adapter = served.resolve(name or req.model)
            ids = served.encode(req.texts, req.truncate, req.truncation_direction, adapter=adapter)
            logits = await _infer(batcher, ids, adapter, served)
            _count(metrics, adapter, len(ids), t0)
            result = predictions(logits, adapter.labels, req.raw_scores, adapter.spec.multi_label,
                                 _thresholds(adapter, req.threshold))
            return JSONResponse(result[0] if req.single else result)
        except RequestError as e:
            return _error(e)
        finally:
            metrics.latency.observe(time.perf_counter() - t0)

    async def predict(request: Request):
        return await answer(request, None)

    for path in TEI_PATHS:
        app.post(path)(predict)

    @app.post("/models/{name}")  # one adapter at a URL of its own: InferenceClient(base_url=".../models/NAME")
    async def predict_with(name: str, request: Request):
        return await answer(request, name)


def _add_classify_route(app, served: ServedModel, config: ServeConfig, batcher: Batcher, metrics: Metrics) -> None:
    from fastapi import Request
    from fastapi.responses import JSONResponse

    async def classify(request: Request):
        t0 = time.perf_counter()
        try:
            req = ClassifyRequest.parse(await read_body(request, config.max_request_bytes), config.max_client_batch,
                                        lambda model: served.resolve(model).spec.pair)
            adapter = served.resolve(req.model)
            keep = req.keep_last if req.keep_last and req.keep_last > 0 else None
            # vLLM keeps the last tokens
            ids = served.encode(req.texts, req.keep_last is not None, "left", keep, adapter=adapter)
            logits = await _infer(batcher, ids, adapter, served)
            _count(metrics, adapter, len(ids), t0)
            return JSONResponse(classification(logits, adapter.labels, adapter.name, sum(map(len, ids)),
                                               adapter.spec.multi_label, adapter.spec.thresholds))
        except RequestError as e:
            return _error(e)
        finally:
            metrics.latency.observe(time.perf_counter() - t0)

    for path in ("/classify", "/v1/classify"):  # vLLM's route, and the /v1 one SGLang uses
        app.post(path)(classify)


def _thresholds(adapter, override) -> dict[str, float]:
    """The adapter's own thresholds, or the request's; a bad one is a 422."""
    try:
        return thresholds_for(adapter.spec.thresholds, adapter.labels, override)
    except LorafitError as e:
        raise invalid(str(e)) from e


def _add_admin_routes(app, served: ServedModel, config: ServeConfig, metrics: Metrics) -> None:
    """Adapters added and removed while the server runs; only with --api-key (they read this machine's files)."""
    from fastapi import Request
    from fastapi.responses import JSONResponse

    def allowed() -> None:
        if not config.api_key:
            raise RequestError(403, "Forbidden", "adding or removing adapters needs a server started with --api-key")

    @app.post("/admin/models")
    async def add(request: Request):
        try:
            allowed()
            data = json_object(await read_body(request, config.max_request_bytes), "name")
            name, path = data.get("name"), data.get("path")
            if not isinstance(name, str) or not isinstance(path, str) or not path.strip():
                raise invalid('send {"name": "NAME", "path": "RUN FOLDER on the server"}, both strings')
            if name in served.adapters:
                raise RequestError(409, "Validation", f"an adapter named {name!r} is already served; DELETE it first")
            try:
                adapter = await asyncio.to_thread(served.add, name, path)
            except LorafitError as e:
                raise invalid(str(e)) from e
            metrics.served([adapter.name])
            log.info("added adapter %s from %s", adapter.name, adapter.source)
            return JSONResponse(_card(served, adapter), status_code=201)
        except RequestError as e:
            return _error(e)

    @app.delete("/admin/models/{name}")
    async def remove(name: str):
        try:
            allowed()
            adapter = served.remove(name)
            metrics.served([], removed=[adapter.name])
            log.info("removed adapter %s", adapter.name)
            return {"id": adapter.name, "object": "model", "deleted": True}
        except RequestError as e:
            return _error(e)


def _count(metrics: Metrics, adapter, texts: int, t0: float) -> None:
    metrics.texts.inc(texts)
    metrics.model_texts.labels(adapter.name).inc(texts)
    metrics.model_latency.labels(adapter.name).observe(time.perf_counter() - t0)


async def _infer(batcher: Batcher, ids: list[list[int]], adapter, served: ServedModel):
    """Logits of each text; a chunking adapter's texts run as their windows, pooled back into one row each."""
    rows, owner = served.rows(adapter, ids)
    try:
        future = batcher.submit(rows, adapter)
    except Overloaded as e:
        raise RequestError(429, "Overloaded", f"server busy: {e}; retry later") from e
    except Stopped as e:
        raise RequestError(503, "Unhealthy", str(e)) from e
    try:
        return served.pooled(adapter, await asyncio.wrap_future(future), owner, len(ids))
    except Exception as e:  # the worker logged the traceback
        raise RequestError(500, "Backend", "inference failed; the server log has the details") from e


def _error(e: RequestError, headers: dict | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse(error_body(e), status_code=e.status, headers=headers)


class _Counted:
    """ASGI middleware counting answers by route and status (401s included)."""

    def __init__(self, app, metrics: Metrics, state):
        self.app, self.metrics = app, metrics
        self.state = state  # the FastAPI app's: its batcher and metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = _route_of(scope["path"])

        async def counting_send(event):
            if event["type"] == "http.response.start":
                self.metrics.requests.labels(route, str(event["status"])).inc()
            await send(event)

        await self.app(scope, receive, counting_send)


def _route_of(path: str) -> str:
    """The route a path is counted under (names inside paths folded into ``{name}``)."""
    for prefix in ("/models/", "/admin/models/"):
        if path.startswith(prefix) and "/" not in path[len(prefix):]:
            return prefix + "{name}"
    return path if path in ROUTES else "other"
