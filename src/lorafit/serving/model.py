"""What the server serves: one base, loaded once, and the adapters on it by name (the first is the default).

Adapters come and go while the server runs (:meth:`ServedModel.add`, :meth:`ServedModel.remove`): the
name table is replaced whole, never edited in place, and a request holds the adapter it resolved, so a
request admitted before a removal is still answered by the adapter it asked for.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..adapters.multi import Adapter, SharedBase, open_base
from ..data.batching import INFERENCE_MULTIPLE, Encoded, collate
from ..data.windows import pool_windows
from ..errors import LorafitError
from ..reporting.report import library_versions
from ..runtime import Compute, check_compute
from .config import ServeConfig, check_name


class RequestError(Exception):
    """A request the server refuses: HTTP status, text-embeddings-inference's error type, one line."""

    def __init__(self, status: int, error_type: str, message: str):
        super().__init__(message)
        self.status, self.error_type = status, error_type


@dataclass
class ServedModel:
    base: SharedBase
    encoder: object  # lorafit.backbones.base.Encoder
    max_input_tokens: int
    adapters: dict[str, Adapter]  # by name, in order; replaced whole on every change
    _changing: threading.Lock = field(default_factory=threading.Lock)  # one add/remove at a time

    @classmethod
    def load(cls, config: ServeConfig) -> "ServedModel":
        """Load every run named by ``config`` on one base; any problem is a LorafitError before a port is bound."""
        check_compute(config.device, config.precision, inference=True)
        runs = config.named_runs()
        (first, directory), *rest = runs.items()
        alone = not rest and not config.api_key  # nothing can join (adding adapters needs the key): run it merged
        base, adapter = open_base(first, directory, config.device, config.precision, merged=alone)
        backbone = base.backbone
        limit = min(config.max_input_tokens or backbone.context_length, backbone.context_length)
        served = cls(base, backbone.encoder, limit, {})
        served._register(adapter)
        for name, directory in rest:
            served._register(base.load_adapter(name, directory))
        return served

    @property
    def default(self) -> Adapter:
        return next(iter(self.adapters.values()))

    @property
    def compute(self) -> Compute:
        return self.base.compute

    def resolve(self, name: str | None) -> Adapter:
        """The adapter a request names (``None``: the default), or 404 naming the ones there are."""
        adapters = self.adapters
        if name is None:
            return next(iter(adapters.values()))
        if name not in adapters:
            raise RequestError(404, "Validation", f"model {name!r} is not served here; served: {', '.join(adapters)}")
        return adapters[name]

    def add(self, name: str, directory: str | Path) -> Adapter:
        """Load an adapter of this base and serve it under ``name``; LorafitError in one line if it cannot be."""
        check_name(name, "name")
        with self._changing:
            if name in self.adapters:
                raise LorafitError(f"an adapter named {name!r} is already served; remove it first")
            adapter = self.base.load_adapter(name, directory)
            self._register(adapter)
        return adapter

    def remove(self, name: str) -> Adapter:
        """Stop serving ``name``; requests already admitted for it are still answered."""
        with self._changing:
            adapter = self.resolve(name)
            if len(self.adapters) == 1:
                raise RequestError(409, "Validation", f"{name!r} is the only adapter served; add another first")
            self.adapters = {k: a for k, a in self.adapters.items() if k != name}
        return adapter

    def _register(self, adapter: Adapter) -> None:
        with self.base.lock:  # layers are wrapped between batches, never under one
            self.base.wrap(list(adapter.layers))
        self.adapters = {**self.adapters, adapter.name: adapter}

    def encode(self, texts: list, truncate: bool, direction: str = "right", limit: int | None = None,
               adapter: Adapter | None = None) -> list[list[int]]:
        """Token ids of each text, or of each (first, second) pair joined as the base joins pairs; an input over
        the limit (``limit`` or the server's) is cut (``truncate``: a text at ``direction``, a pair longest first)
        or refused with 413. An ``adapter`` that chunks long texts gets them whole (:meth:`rows` cuts them; an
        explicit ``limit`` still cuts first); one trained with a shorter ``max_length`` gets them cut there, as
        its training cut them (a pair longest first from its whole texts, in the same pass where it can be)."""
        pairs = bool(texts) and isinstance(texts[0], tuple)
        if adapter is not None and not pairs and adapter.windows is not None:
            ids = self.encoder.encode(texts)
            return ids if limit is None else [x[:limit] if direction == "right" else x[-limit:] for x in ids]
        limit = min(limit or self.max_input_tokens, self.max_input_tokens)
        trained = adapter.spec.long.max_length if adapter is not None else None
        if pairs:
            return self._encode_pairs(texts, truncate, limit, trained)
        ids = self._within(self.encoder.encode(texts), limit, truncate, direction)
        return ids if not trained or trained >= limit else [x[:trained] for x in ids]

    def _encode_pairs(self, pairs: list, truncate: bool, limit: int, trained: int | None) -> list[list[int]]:
        """Pairs cut longest first to the shorter of ``limit`` and ``trained`` in one pass; without ``truncate``, a
        pair over ``limit`` is a 413 (known at once, or by a second pass over pairs that ``trained`` cut)."""
        cut = min(limit, trained or limit)
        ids, n_cut = self.encoder.encode_pairs(pairs, cut if truncate or cut < limit else None)
        if not truncate:
            self._within(self.encoder.encode_pairs(pairs)[0] if n_cut and cut < limit else ids, limit, False)
        return ids

    @staticmethod
    def _within(ids: list[list[int]], limit: int, truncate: bool, direction: str = "right") -> list[list[int]]:
        """``ids`` with every input over ``limit`` cut at ``direction`` (``truncate``), else 413 for the first."""
        for i, x in enumerate(ids):
            if len(x) > limit:
                if not truncate:
                    raise RequestError(413, "Validation", f"inputs[{i}] has {len(x)} tokens, more than the limit "
                                       f"of {limit} (--max-input-tokens); send truncate: true to cut it")
                ids[i] = x[:limit] if direction == "right" else x[-limit:]
        return ids  # never empty: the schema refuses empty and blank texts

    def rows(self, adapter: Adapter, ids: list[list[int]]) -> tuple[list[list[int]], torch.Tensor | None]:
        """What the model runs for these texts: the texts themselves, or (a chunking adapter) every window,
        with the text each window came from."""
        return (ids, None) if adapter.windows is None else adapter.windows.split(ids)

    @staticmethod
    def pooled(adapter: Adapter, logits: list[torch.Tensor], owner: torch.Tensor | None, n: int) -> list[torch.Tensor]:
        """Logits per row -> per text: a chunked text's windows pooled as in training."""
        if owner is None:
            return logits
        return list(pool_windows(torch.stack(logits), owner, n, adapter.spec.long.pool))

    @torch.inference_mode()
    def logits(self, ids: list[list[int]], adapters: list[Adapter], batch_size: int) -> list[torch.Tensor]:
        """fp32 logits of each text (its adapter's classes), in input order; what the worker thread runs.

        Texts are sorted by length into batches of ``batch_size``, as evaluation does, and inside a batch
        grouped by adapter, so the base runs once a batch whatever adapters it mixes."""
        out: list[torch.Tensor | None] = [None] * len(ids)
        lengths = np.array([len(x) for x in ids])
        rank = {a: k for k, a in enumerate(dict.fromkeys(adapters))}
        by_length = np.argsort(lengths, kind="stable")
        for start in range(0, len(ids), batch_size):
            chunk = by_length[start:start + batch_size]
            chunk = chunk[np.argsort([rank[adapters[i]] for i in chunk], kind="stable")]
            for i, row in zip(chunk, self._run(ids, adapters, chunk)):
                out[i] = row
        return out

    def _run(self, ids, adapters, chunk: np.ndarray) -> list[torch.Tensor]:
        """One batch, rows already grouped by adapter (padded to a multiple of 8: few distinct shapes)."""
        batch = collate(Encoded(ids, None, 0), chunk, self.encoder.pad_id, INFERENCE_MULTIPLE).to(self.compute.device)
        groups = list(dict.fromkeys(adapters[i] for i in chunk))
        counts = [sum(adapters[i] is a for i in chunk) for a in groups]
        with self.base.lock, self.compute.autocast():
            return [r.cpu() for r in self.base.forward(batch.input_ids, batch.attention_mask, groups, counts)]

    def describe(self, adapter: Adapter) -> dict:
        """One adapter as /info and /v1/models describe it."""
        spec = adapter.spec
        return {"name": adapter.name, "run": adapter.source, "labels": adapter.labels,
                "num_classes": len(adapter.labels), "lora": spec.lora.to_dict() if adapter.layers else None,
                "adapted_layers": len(adapter.layers), "merged": bool(self.base.alone), "size_bytes": adapter.size_bytes,
                "temperature": spec.temperature, "thresholds": spec.thresholds,
                "text_pair": None if spec.text_pair is None else spec.text_pair.to_dict(), "long": spec.long.to_dict()}

    def info(self, config: ServeConfig, adapter: Adapter | None = None) -> dict:
        """GET /info: text-embeddings-inference's fields for one adapter (the default), then lorafit's own."""
        adapter = adapter or self.default
        labels = adapter.labels
        return {
            "model_id": adapter.name,
            "model_dtype": {"int8": "int8", "bf16": "bfloat16"}.get(self.compute.precision, "float32"),
            "model_type": {"classifier": {"id2label": dict(enumerate(labels)),
                                          "label2id": {k: i for i, k in enumerate(labels)}}},
            "max_concurrent_requests": config.max_concurrent,
            "max_input_length": self.max_input_tokens,
            "max_batch_requests": config.max_batch_size,
            "max_client_batch_size": config.max_client_batch,
            "max_wait_ms": config.max_wait_ms,
            "max_request_bytes": config.max_request_bytes,
            "auto_truncate": False,
            "version": library_versions().get("lorafit", "0+unknown"),
            "base_model": adapter.spec.backbone.to_dict(),
            "architecture": adapter.spec.architecture,
            "labels": labels,
            "problem_type": adapter.spec.problem_type,
            "text_pair": None if adapter.spec.text_pair is None else adapter.spec.text_pair.to_dict(),  # pairs: how joined
            "lora": adapter.spec.lora.to_dict(),
            "temperature": adapter.spec.temperature,  # calibration: logits are divided by it
            "thresholds": adapter.spec.thresholds,  # class -> probability that decides it
            "device": str(self.compute.device),
            "adapters": [self.describe(a) for a in self.adapters.values()],
        }
