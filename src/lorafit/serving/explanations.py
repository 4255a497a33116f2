"""POST /explain: each token's attribution to the decided class, on the served base with one adapter's update.

Request: ``{"inputs": "text" | ["t1", ...], "model": "name", "method": "auto" | "ig" | "occlusion",
"target": "label", "threshold": 0.9 | {"label": 0.9}}`` (all but ``inputs`` optional). Response, per text:
``{"text", "label", "predicted", "probability", "probabilities", "method", "log_odds", "tokens": [{"token",
"attribution"}], ...}`` (see :class:`lorafit.inference.explain.Explanation`). An explanation runs many
forward and backward passes: it holds the base (the batcher's requests wait) for its duration. (No
postponed annotations here: FastAPI reads the handler's annotations, and ``Request`` is imported locally.)
"""

import asyncio
import json
from dataclasses import dataclass

import torch

from ..adapters.multi import Adapter
from ..errors import LorafitError
from ..inference.explain import (METHODS, Explanation, check_explainable, explain_decided, resolve_method,
                                 token_embedding)
from ..reporting.calibration import thresholds_for
from .model import RequestError, ServedModel
from .schema import PairOf, invalid, json_object, model_of, texts_of, threshold_of
from .security import read_body

MAX_TEXTS = 8  # explanations cost tens of forward passes each


@dataclass
class ExplainRequest:
    texts: list  # texts, or (first, second) pairs
    single: bool
    model: str | None = None
    method: str = "auto"
    target: str | None = None
    threshold: float | dict | None = None

    @classmethod
    def parse(cls, body: bytes, pair_of: PairOf = lambda model: False) -> "ExplainRequest":
        data = json_object(body, "inputs")
        texts, single = texts_of(data, "inputs", MAX_TEXTS, pair_of(model_of(data)))
        method = data.get("method", "auto")
        if method not in METHODS:
            raise invalid(f"method must be one of {', '.join(METHODS)}, got {json.dumps(method)}")
        target = data.get("target")
        if target is not None and not isinstance(target, str):
            raise invalid(f"target must be a label (a string), got {json.dumps(target)}")
        return cls(texts, single, model_of(data), method, target, threshold_of(data))


def _forward(served: ServedModel, adapter: Adapter):
    """ids (S, T) of one length -> (S, C) logits of ``adapter`` (its temperature folded in), with autograd."""

    def forward(ids: torch.Tensor) -> torch.Tensor:
        with served.compute.autocast():
            rows = served.base.forward(ids, torch.ones_like(ids), [adapter], [ids.shape[0]])
        return torch.stack(rows)

    return forward


def explain(served: ServedModel, adapter: Adapter, req: ExplainRequest) -> list[Explanation]:
    """What the worker thread runs for POST /explain; user mistakes become 422 (the library's errors, which
    name settings by field)."""
    labels = adapter.labels
    ids = served.encode(req.texts, truncate=True, adapter=adapter)
    try:
        method = resolve_method(req.method)
        thresholds = thresholds_for(adapter.spec.thresholds, labels, req.threshold)
        check_explainable(adapter.spec.multi_label, labels, req.target, adapter.windows, ids,
                          repr(adapter.name))
    except LorafitError as e:
        raise invalid(str(e)) from e
    forward, embedding = _forward(served, adapter), token_embedding(served.base.backbone.module)
    with served.base.lock:
        with torch.no_grad():  # one text at a time: forward takes ids of one length
            logits = [forward(torch.tensor([x], device=served.compute.device))[0] for x in ids]
        probs = torch.softmax(torch.stack(logits), -1).cpu().double().numpy()
        return explain_decided(forward, embedding, served.encoder, req.texts, ids, probs, labels, thresholds,
                               req.target, method)


def explain_route(app, served: ServedModel, config, answer_error) -> None:
    """Add POST /explain to ``app``; ``answer_error`` turns a RequestError into the error response."""
    from fastapi import Request
    from fastapi.responses import JSONResponse

    @app.post("/explain")
    async def explain_texts(request: Request):
        try:
            req = ExplainRequest.parse(await read_body(request, config.max_request_bytes),
                                       lambda model: served.resolve(model).spec.pair)
            adapter = served.resolve(req.model)
            result = [e.to_dict() for e in await asyncio.to_thread(explain, served, adapter, req)]
            return JSONResponse(result[0] if req.single else result)
        except RequestError as e:
            return answer_error(e)
