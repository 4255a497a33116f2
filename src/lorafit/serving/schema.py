"""The requests' JSON, checked field by field, and the responses, in the schemas clients already speak.

POST /predict (and POST /, as Hugging Face text-embeddings-inference): ``{"inputs": "text" | ["t1", ...],
"truncate": false, "raw_scores": false, "truncation_direction": "right", "model": "name"}``; ``model`` (lorafit's
addition) picks the adapter, other fields are ignored, as text-embeddings-inference does. A pair model's inputs
are text-embeddings-inference's pairs: ``["first", "second"]`` or ``[["first", "second"], ...]`` (:func:`texts_of`).
Response: for one input, every class as ``{"label", "score"}`` highest first; for a list, one such list per
input, in input order. POST /classify is vLLM's: ``{"model", "input": "text" | [...], "truncate_prompt_tokens"}`` ->
``{"id", "object": "list", "created", "model", "data": [{"index", "label", "probs", "num_classes"}], "usage"}``.
GET /v1/models is OpenAI's model list. Errors, on every route:
``{"error": "one line", "error_type": "Validation" | "Overloaded" | "Backend" | "Unhealthy" | ...}``.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import torch

from ..adapters.classifier import probabilities
from ..reporting.calibration import decide
from .config import TRUNCATION_DIRECTIONS
from .model import RequestError

PairOf = Callable[[str | None], bool]  # a request's model name -> whether that adapter classifies pairs of texts


def invalid(message: str) -> RequestError:
    return RequestError(422, "Validation", message)


def json_object(body: bytes, field: str) -> dict:
    """The body as a JSON object, or 422 saying what it is instead."""
    try:
        data = json.loads(body)
    except RecursionError as e:  # arrays or objects nested past the interpreter's recursion limit
        raise invalid(f"body is nested too deeply (arrays or objects over about {sys.getrecursionlimit()} levels)") from e
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, and an integer past Python's 4,300 digits
        raise invalid(f"body is not valid JSON ({str(e).splitlines()[0]})") from e
    if not isinstance(data, dict):
        raise invalid(f"body must be a JSON object with an \"{field}\" field, got {type(data).__name__}")
    return data


def texts_of(data: dict, field: str, max_client_batch: int, pair: bool = False) -> tuple[list, bool]:
    """``data[field]`` as a list of inputs (texts, or for a ``pair`` model (first, second) tuples), and whether
    it was one input. Text-embeddings-inference's shapes: ``"text"``; ``["first", "second"]``, one pair;
    ``[["text"] | ["first", "second"], ...]``, a batch. For a model of single texts a list of strings is a
    batch of texts (lorafit's and vLLM's reading; text-embeddings-inference reads two strings as a pair)."""
    if field not in data:
        raise invalid(f"missing field \"{field}\" (a string or a list of strings)")
    value = data[field]
    if not isinstance(value, (str, list)):
        raise invalid(f"{field} must be a string or a list of strings, got {type(value).__name__}")
    if not value and isinstance(value, list):
        raise invalid(f"{field} is an empty list")
    if isinstance(value, str):
        inputs, single = [value], True
    elif isinstance(value[0], list):  # a batch of [text] / [first, second]
        bad = next((i for i, x in enumerate(value) if not isinstance(x, list) or len(x) not in (1, 2)), None)
        if bad is not None:
            raise invalid(f"{field}[{bad}] must be [text] or [first, second], like {field}[0]")
        inputs, single = [x[0] if len(x) == 1 else tuple(x) for x in value], False
    elif pair:  # text-embeddings-inference: a list of strings is one input, a pair
        if len(value) != 2:
            raise invalid(f"{field}: a pair is two strings [first, second], got {len(value)}; send a batch of pairs "
                          f"as [[first, second], ...]")
        inputs, single = [tuple(value)], True
    else:
        inputs, single = value, False
    if len(inputs) > max_client_batch:
        raise RequestError(413, "Validation", f"{len(inputs)} inputs in one request, more than the limit of "
                           f"{max_client_batch} (--max-client-batch)")
    for i, t in enumerate(inputs):
        _check_input(t, field if single else f"{field}[{i}]", pair)
    return inputs, single


def _check_input(value, where: str, pair: bool) -> None:
    """One input: a non-blank text, or a pair of them, whichever the model reads."""
    if isinstance(value, tuple) != pair:
        raise invalid(f"{where}: the model classifies pairs of texts: send [first, second], or a batch "
                      "[[first, second], ...]" if pair else f"{where} is a pair; the model classifies single texts")
    for k, t in enumerate(value if pair else (value,)):
        at = f"{where}[{k}]" if pair else where
        if not isinstance(t, str):
            raise invalid(f"{at} must be a string, got {type(t).__name__}")
        if not t.strip():
            raise invalid(f"{at} is an empty string")


def model_of(data: dict) -> str | None:
    """The adapter a request names (``model``), None for the default."""
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid(f"model must be a string (an adapter's name, see GET /v1/models), got {json.dumps(model)}")
    return model or None


def threshold_of(data: dict) -> float | dict | None:
    """lorafit's ``threshold``: a probability for the run's thresholded class (or the second of two), or
    ``{"label": probability}``; None: the run's own."""
    t = data.get("threshold")
    values = t.values() if isinstance(t, dict) else [t]
    if t is not None and not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise invalid(f"threshold must be a number or an object of label: number, got {json.dumps(t)}")
    return t


@dataclass
class PredictRequest:
    texts: list  # texts, or (first, second) pairs
    single: bool  # inputs was one input: the response is one list, not a list of lists
    truncate: bool = False
    raw_scores: bool = False
    truncation_direction: str = "right"
    model: str | None = None  # the adapter; None: the default
    threshold: float | dict | None = None  # overrides the adapter's own (lorafit train --target-precision)

    @classmethod
    def parse(cls, body: bytes, max_client_batch: int, pair_of: PairOf = lambda model: False) -> "PredictRequest":
        """The request, or a RequestError naming the first thing wrong with it. ``pair_of(model)``: whether the
        adapter the request names classifies pairs of texts."""
        data = json_object(body, "inputs")
        texts, single = texts_of(data, "inputs", max_client_batch, pair_of(model_of(data)))
        flags = {}
        for name in ("truncate", "raw_scores"):
            flags[name] = data.get(name, False)
            if not isinstance(flags[name], bool):
                raise invalid(f"{name} must be true or false, got {json.dumps(flags[name])}")
        direction = data.get("truncation_direction", "right")
        if not isinstance(direction, str) or direction.lower() not in TRUNCATION_DIRECTIONS:
            raise invalid(f"truncation_direction must be \"right\" or \"left\", got {json.dumps(direction)}")
        return cls(texts, single, flags["truncate"], flags["raw_scores"], direction.lower(), model_of(data),
                   threshold_of(data))


@dataclass
class ClassifyRequest:
    """vLLM's POST /classify request (text inputs)."""

    texts: list  # texts, or (first, second) pairs
    model: str | None
    keep_last: int | None  # truncate_prompt_tokens: keep this many tokens, the last ones (-1: the limit)

    @classmethod
    def parse(cls, body: bytes, max_client_batch: int, pair_of: PairOf = lambda model: False) -> "ClassifyRequest":
        """vLLM's /classify has no pair form: a pair model takes text-embeddings-inference's shapes here too."""
        data = json_object(body, "input")
        texts, _ = texts_of(data, "input", max_client_batch, pair_of(model_of(data)))
        keep = data.get("truncate_prompt_tokens")
        if keep is not None and (not isinstance(keep, int) or isinstance(keep, bool) or keep == 0 or keep < -1):
            raise invalid(f"truncate_prompt_tokens must be a positive integer or -1, got {json.dumps(keep)}")
        return cls(texts, model_of(data), keep)


def classification(logits: list[torch.Tensor], labels: list[str], model: str, tokens: int,
                   multi_label: bool = False, thresholds: dict[str, float] | None = None) -> dict:
    """vLLM's ClassificationResponse for one request's logits: ``label`` is the decided class (multi-label:
    the likeliest)."""
    data = []
    for i, row in enumerate(logits):
        probs = probabilities(row, multi_label)
        k = int(probs.argmax()) if multi_label else int(decide(probs[None].double().numpy(), labels, thresholds)[0])
        data.append({"index": i, "label": labels[k], "probs": probs.tolist(),
                     "num_classes": len(labels)})
    return {"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": model,
            "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                                    "prompt_tokens_details": None}}


def model_card(name: str, created: int, max_len: int, description: dict) -> dict:
    """One entry of GET /v1/models (OpenAI's fields, vLLM's max_model_len, then lorafit's)."""
    return {"id": name, "object": "model", "created": created, "owned_by": "lorafit", "root": description["run"],
            "parent": None, "max_model_len": max_len, **{k: v for k, v in description.items() if k != "name"}}


def predictions(logits: torch.Tensor | list[torch.Tensor], labels: list[str], raw_scores: bool,
                multi_label: bool = False, thresholds: dict[str, float] | None = None) -> list[list[dict]]:
    """(N, C) logits -> per text, every class with its probability (or logit), highest first; multi-label:
    each label's own sigmoid probability, as text-embeddings-inference scores such models. With
    ``thresholds`` (single-label, see :func:`lorafit.reporting.calibration.decide`) the decided class comes first."""
    logits = torch.stack(list(logits)) if isinstance(logits, (list, tuple)) else logits
    probs = probabilities(logits, multi_label)
    decided = probs.argmax(dim=1).tolist() if multi_label else decide(probs.double().numpy(), labels, thresholds)
    out = []
    for row, k in zip((logits if raw_scores else probs).tolist(), decided):
        ranked = sorted(zip(labels, row), key=lambda p: (p[0] != labels[k], -p[1]))
        out.append([{"label": label, "score": s} for label, s in ranked])
    return out


def error_body(e: RequestError) -> dict:
    return {"error": str(e), "error_type": e.error_type}
