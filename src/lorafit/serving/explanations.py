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

import numpy as np
import torch

from ..adapters.multi import Adapter
from ..data.batching import shown
from ..errors import LorafitError
from ..inference.explain import IG_STEPS, METHODS, Explanation, explain_ids, resolve_method, token_embedding
from ..reporting.calibration import decide, thresholds_for
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
    """What the worker thread runs for POST /explain; user mistakes become 422."""
    labels = adapter.labels
    if adapter.spec.multi_label:
        raise invalid(f"POST /explain explains single-label classifiers; {adapter.name!r} is multi-label")
    try:
        method = resolve_method(req.method)
        thresholds = thresholds_for(adapter.spec.thresholds, labels, req.threshold)
    except LorafitError as e:
        raise invalid(str(e)) from e
    if req.target is not None and req.target not in labels:
        raise invalid(f"target {req.target!r} is not one of the labels {', '.join(labels)}")
    ids = served.encode(req.texts, truncate=True, adapter=adapter)
    windows = served.windows(adapter)
    try:
        if windows is not None:
            windows.check_explainable(ids)
    except LorafitError as e:  # names the field (long), not the CLI's flag
        raise invalid(str(e)) from e
    forward, embedding = _forward(served, adapter), token_embedding(served.base.backbone.module)
    out = []
    with served.base.lock:
        for text, x in zip(req.texts, ids):
            with torch.no_grad():
                probs = torch.softmax(forward(torch.tensor([x], device=served.compute.device)), -1).cpu().numpy()
            decided = labels[int(decide(probs.astype(np.float64), labels, thresholds)[0])]
            k = labels.index(req.target or decided)
            e = explain_ids(forward, embedding, served.encoder, shown(text), x, labels, k, method, IG_STEPS)
            e.extra = {"predicted": decided, "probability": float(probs[0, labels.index(decided)]),
                       "probabilities": dict(zip(labels, map(float, probs[0])))}
            out.append(e)
    return out


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
