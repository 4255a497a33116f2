"""The served classifier: a run loaded once (LoRA merged), texts checked against the server's limits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters.classifier import Classifier
from ..adapters.storage import ClassifierSpec
from ..data.batching import Encoded
from ..inference.predict import load_for_inference, predict_logits
from ..reporting.report import library_versions
from .config import ServeConfig


class RequestError(Exception):
    """A request the server refuses: HTTP status, text-embeddings-inference's error type, one line."""

    def __init__(self, status: int, error_type: str, message: str):
        super().__init__(message)
        self.status, self.error_type = status, error_type


@dataclass
class ServedModel:
    model: Classifier
    encoder: object  # lorafit.backbones.base.Encoder
    spec: ClassifierSpec
    device: torch.device
    dtype: torch.dtype | None
    max_input_tokens: int
    run: str

    @classmethod
    def load(cls, config: ServeConfig) -> "ServedModel":
        """Load the run named by ``config``; any problem is a LorafitError before a port is bound."""
        model, backbone, spec, dev, dtype = load_for_inference(config.run, config.device, config.precision)
        limit = min(config.max_input_tokens or backbone.context_length, backbone.context_length)
        return cls(model, backbone.encoder, spec, dev, dtype, limit, str(config.run))

    @property
    def labels(self) -> list[str]:
        return self.spec.labels

    def encode(self, texts: list[str], truncate: bool, direction: str = "right") -> list[list[int]]:
        """Token ids of each text; a text over the limit is cut (``truncate``) or refused with 413."""
        ids = self.encoder.encode(texts)
        for i, x in enumerate(ids):
            if len(x) > self.max_input_tokens:
                if not truncate:
                    raise RequestError(413, "Validation", f"inputs[{i}] has {len(x)} tokens, more than the limit "
                                       f"of {self.max_input_tokens} (--max-input-tokens); send truncate: true to cut it")
                ids[i] = x[:self.max_input_tokens] if direction == "right" else x[-self.max_input_tokens:]
        return ids  # never empty: the schema refuses empty and blank texts

    def logits(self, ids: list[list[int]], batch_size: int) -> torch.Tensor:
        """(N, C) fp32 logits; what the worker thread runs."""
        return predict_logits(self.model, Encoded(ids, None, 0), self.encoder.pad_id, batch_size=batch_size,
                              device=self.device, dtype=self.dtype)

    def info(self, config: ServeConfig) -> dict:
        """GET /info: text-embeddings-inference's fields where they apply, then lorafit's own."""
        return {
            "model_id": str(Path(self.run).resolve().name),
            "model_dtype": "bfloat16" if self.dtype == torch.bfloat16 else "float32",
            "model_type": {"classifier": {"id2label": dict(enumerate(self.labels)),
                                          "label2id": {k: i for i, k in enumerate(self.labels)}}},
            "max_concurrent_requests": config.max_concurrent,
            "max_input_length": self.max_input_tokens,
            "max_batch_requests": config.max_batch_size,
            "max_client_batch_size": config.max_client_batch,
            "max_wait_ms": config.max_wait_ms,
            "max_request_bytes": config.max_request_bytes,
            "auto_truncate": False,
            "version": library_versions().get("lorafit", "0+unknown"),
            "base_model": self.spec.backbone.to_dict(),
            "architecture": self.spec.architecture,
            "labels": self.labels,
            "lora": self.spec.lora.to_dict(),
            "device": str(self.device),
        }
