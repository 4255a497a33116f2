"""Class probabilities from a classifier, and from a saved run: what eval, predict and the server call."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..adapters.classifier import Classifier
from ..adapters.loading import load_classifier
from ..adapters.lora import merge_lora, store_frozen_linears
from ..adapters.storage import ClassifierSpec
from ..backbones.base import Backbone
from ..data.batching import Encoded, encode_texts, eval_order, iterate, lengths_of
from ..reporting.calibration import decide, thresholds_for
from ..runtime import Compute, check_compute, resolve_compute


@torch.inference_mode()
def predict_logits(model, data: Encoded, pad_id: int, *, batch_size: int = 32, compute: Compute | None = None,
                   order: list[np.ndarray] | None = None) -> torch.Tensor:
    """Class logits (N, C) in fp32, in the input order; batches are sorted by length for speed.

    ``compute``: None runs in fp32 on the model's device. ``order``: only these batches of indices (one
    process's share); the other rows stay zero.
    """
    compute = compute or Compute(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    out = torch.zeros((len(data.ids), model.num_classes), dtype=torch.float32)
    order = eval_order(lengths_of(data), batch_size) if order is None else order
    for batch in iterate(data, order, pad_id):
        batch = batch.to(compute.device)
        with compute.autocast():
            logits = model(batch.input_ids, batch.attention_mask)  # (B, C)
        out[torch.from_numpy(batch.index)] = logits.float().cpu()
    model.train(was_training)
    return out


def predict_proba(model, data: Encoded, pad_id: int, *, batch_size: int = 32, compute: Compute | None = None,
                  order: list[np.ndarray] | None = None) -> np.ndarray:
    """Class probabilities (N, C) in the input order; with ``order``, only those batches' rows are computed."""
    logits = predict_logits(model, data, pad_id, batch_size=batch_size, compute=compute, order=order)
    return torch.softmax(logits, dim=-1).numpy().astype(np.float64)


@dataclass
class InferenceModel:
    """A saved classifier ready to predict: LoRA merged, on its device, in its precision."""

    model: Classifier
    backbone: Backbone
    spec: ClassifierSpec
    compute: Compute

    @property
    def labels(self) -> list[str]:
        return self.spec.labels


def load_for_inference(run: str | Path, device: str = "auto", precision: str = "auto") -> InferenceModel:
    """A saved run's classifier on its device, LoRA merged into the base (no adapter cost per call).

    A bad ``device`` / ``precision`` fails before the model loads.
    """
    check_compute(device, precision)
    model, backbone, spec = load_classifier(run)
    compute = resolve_compute(device, precision, backbone.hidden_size)
    model.divide_logits(spec.temperature)  # calibrated probabilities from here on (see reporting.calibration)
    merge_lora(model)
    if compute.autocast_dtype is not None:  # the merged weights in the compute precision: no casts per batch
        store_frozen_linears(model, compute.autocast_dtype)
    return InferenceModel(model.to(compute.device), backbone, spec, compute)


def predict_texts(run: str | Path, texts: list[str], *, device: str = "auto", precision: str = "auto",
                  batch_size: int = 32, threshold: float | dict | None = None) -> list[dict]:
    """Label and (calibrated) probability for each text, in order. The label is the run's decision: its
    saved thresholds (``lorafit train --target-precision``), or ``threshold``, or else the most probable class."""
    loaded = load_for_inference(run, device, precision)
    encoder = loaded.backbone.encoder
    enc = encode_texts(encoder, texts, None, loaded.backbone.context_length, where="input")
    probs = predict_proba(loaded.model, enc, encoder.pad_id, batch_size=batch_size, compute=loaded.compute)
    best = decide(probs, loaded.labels, thresholds_for(loaded.spec.thresholds, loaded.labels, threshold))
    return [{"text": t, "label": loaded.labels[k], "probability": float(p[k]),
             "probabilities": dict(zip(loaded.labels, map(float, p)))} for t, k, p in zip(texts, best, probs)]
