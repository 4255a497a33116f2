"""POST /predict's JSON, as Hugging Face text-embeddings-inference defines it, checked field by field.

Request: ``{"inputs": "text" | ["t1", ...], "truncate": false, "raw_scores": false,
"truncation_direction": "right"}``; other fields are ignored, as text-embeddings-inference does. Response: for one string, every class as ``{"label", "score"}``
highest first; for a list, one such list per input, in input order. Errors:
``{"error": "one line", "error_type": "Validation" | "Overloaded" | "Backend" | "Unhealthy" | ...}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from .config import TRUNCATION_DIRECTIONS
from .model import RequestError

def invalid(message: str) -> RequestError:
    return RequestError(422, "Validation", message)


@dataclass
class PredictRequest:
    texts: list[str]
    single: bool  # inputs was one string: the response is one list, not a list of lists
    truncate: bool = False
    raw_scores: bool = False
    truncation_direction: str = "right"

    @classmethod
    def parse(cls, body: bytes, max_client_batch: int) -> "PredictRequest":
        """The request, or a RequestError naming the first thing wrong with it."""
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise invalid(f"body is not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise invalid(f"body must be a JSON object with an \"inputs\" field, got {type(data).__name__}")
        if "inputs" not in data:
            raise invalid("missing field \"inputs\" (a string or a list of strings)")
        inputs = data["inputs"]
        single = isinstance(inputs, str)
        texts = [inputs] if single else inputs
        if not isinstance(texts, list):
            raise invalid(f"inputs must be a string or a list of strings, got {type(inputs).__name__}")
        if not texts:
            raise invalid("inputs is an empty list")
        if len(texts) > max_client_batch:
            raise RequestError(413, "Validation", f"{len(texts)} inputs in one request, more than the limit of "
                               f"{max_client_batch} (--max-client-batch)")
        for i, t in enumerate(texts):
            where = "inputs" if single else f"inputs[{i}]"
            if not isinstance(t, str):
                raise invalid(f"{where} must be a string, got {type(t).__name__}")
            if not t.strip():
                raise invalid(f"{where} is an empty string")
        flags = {}
        for name in ("truncate", "raw_scores"):
            flags[name] = data.get(name, False)
            if not isinstance(flags[name], bool):
                raise invalid(f"{name} must be true or false, got {json.dumps(flags[name])}")
        direction = data.get("truncation_direction", "right")
        if not isinstance(direction, str) or direction.lower() not in TRUNCATION_DIRECTIONS:
            raise invalid(f"truncation_direction must be \"right\" or \"left\", got {json.dumps(direction)}")
        return cls(texts, single, flags["truncate"], flags["raw_scores"], direction.lower())


def predictions(logits: torch.Tensor, labels: list[str], raw_scores: bool) -> list[list[dict]]:
    """(N, C) logits -> per text, every class with its probability (or logit), highest first."""
    scores = logits if raw_scores else torch.softmax(logits, dim=-1)
    out = []
    for row in scores.tolist():
        ranked = sorted(zip(labels, row), key=lambda p: -p[1])
        out.append([{"label": label, "score": s} for label, s in ranked])
    return out


def error_body(e: RequestError) -> dict:
    return {"error": str(e), "error_type": e.error_type}
