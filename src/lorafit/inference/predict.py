"""Class probabilities from a classifier, and from a saved run: what eval, predict and the server call."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..adapters.classifier import Classifier
from ..adapters.loading import load_classifier
from ..adapters.hf_layout import sample_texts
from ..adapters.lora import merge_and_unload, store_frozen_linears
from ..adapters.storage import ClassifierSpec
from ..backbones.base import Backbone
from ..backbones.int8 import quantize_checked, quantize_linears, resolve_inference_compute
from ..backbones.packing import rounded_rows
from ..data.batching import INFERENCE_MULTIPLE, Encoded, Input, encode_texts, eval_order, iterate, lengths_of, text_fields
from ..reporting.calibration import decide, thresholds_for
from ..reporting.metrics import LABEL_THRESHOLD
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
    if was_training:  # (eval() walks every module: a few ms per call on one text)
        model.eval()
    out = torch.zeros((len(data.ids), model.num_classes), dtype=torch.float32)
    order = eval_order(lengths_of(data), batch_size) if order is None else order
    for batch in iterate(data, order, pad_id, INFERENCE_MULTIPLE):  # few distinct shapes: see padded_length
        batch = batch.to(compute.device)
        with compute.autocast(), rounded_rows():
            logits = batch.pooled(model(batch.input_ids, batch.attention_mask))  # (B, C): a chunked text's windows pooled
        out[torch.from_numpy(batch.index)] = logits.float().cpu()
    if was_training:
        model.train()
    return out


def predict_proba(model, data: Encoded, pad_id: int, *, batch_size: int = 32, compute: Compute | None = None,
                  order: list[np.ndarray] | None = None) -> np.ndarray:
    """Class probabilities (N, C) in the input order (multi-label: each label's own); with ``order``, only
    those batches' rows are computed."""
    logits = predict_logits(model, data, pad_id, batch_size=batch_size, compute=compute, order=order)
    return model.probabilities(logits).numpy().astype(np.float64)


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
    """A saved run's classifier on its device, LoRA merged into the base (no adapter cost per call), its
    frozen linears in int8 where ``precision`` says so (``auto``: where that is faster here and the run's
    sample texts keep their classes, see :func:`~lorafit.backbones.int8.quantize_checked`).

    A bad ``device`` / ``precision`` fails before the model loads.
    """
    check_compute(device, precision, inference=True)
    model, backbone, spec = load_classifier(run)
    model.divide_logits(spec.temperature)  # calibrated probabilities from here on (see reporting.calibration)
    merge_and_unload(model)
    compute = resolve_inference_compute(device, precision, model.backbone, backbone.hidden_size)
    if compute.int8:
        if precision == "int8":
            quantize_linears(model.backbone, fuse=True)
        elif not quantize_checked(model.backbone, lambda: _sample_logits(model, backbone, run, spec.pair),
                                  multi_label=spec.multi_label, fuse=True):
            compute = resolve_compute(compute.device, "auto", backbone.hidden_size)
    if compute.autocast_dtype is not None:  # the merged weights in the compute precision: no casts per batch
        store_frozen_linears(model, compute.autocast_dtype)
    return InferenceModel(model.to(compute.device), backbone, spec, compute)


def _sample_logits(model: Classifier, backbone: Backbone, run: str | Path, pair: bool) -> torch.Tensor:
    enc = encode_texts(backbone.encoder, sample_texts(run, pair=pair), None, backbone.context_length,
                       where="sample texts")
    return predict_logits(model, enc, backbone.encoder.pad_id)


def predict_texts(run: str | Path, texts: list[Input], *, device: str = "auto", precision: str = "auto",
                  batch_size: int = 32, threshold: float | dict | None = None) -> list[dict]:
    """Label and (calibrated) probability for each text, in order. The label is the run's decision: its
    saved thresholds (``lorafit train --target-precision``), or ``threshold``, or else the most probable class.
    Multi-label: ``labels``, every label whose probability reaches its threshold (``label`` joins them with
    ``|``), and each label's probability. A pair classifier takes pairs ``(a, b)`` (each answered with
    ``text`` and ``text_pair``); a classifier of single texts, texts."""
    return label_texts(load_for_inference(run, device, precision), texts, batch_size=batch_size, threshold=threshold)


def label_texts(loaded: InferenceModel, texts: list[Input], *, batch_size: int = 32,
                threshold: float | dict | None = None) -> list[dict]:
    """:func:`predict_texts` with a model :func:`load_for_inference` returned (``loaded``)."""
    encoder, labels = loaded.backbone.encoder, loaded.labels
    enc = encode_texts(encoder, texts, None, loaded.backbone.context_length, where="input", pair=loaded.spec.pair,
                       long=loaded.spec.long)
    probs = predict_proba(loaded.model, enc, encoder.pad_id, batch_size=batch_size, compute=loaded.compute)
    return labelled(loaded, texts, probs, thresholds_for(loaded.spec.thresholds, labels, threshold))


def labelled(loaded: InferenceModel, texts: list[Input], probs: np.ndarray, thresholds: dict[str, float]) -> list[dict]:
    """Each text with its decided label, that label's probability and every label's (multi-label: the label
    set, see :func:`predict_texts`)."""
    labels = loaded.labels
    if loaded.spec.multi_label:
        return [_label_set(t, p, labels, thresholds) for t, p in zip(texts, probs)]
    best = decide(probs, labels, thresholds)
    return [{**text_fields(t), "label": labels[k], "probability": float(p[k]),
             "probabilities": dict(zip(labels, map(float, p)))} for t, k, p in zip(texts, best, probs)]


def _label_set(text: Input, probs: np.ndarray, labels: list[str], thresholds: dict[str, float]) -> dict:
    """One multi-label prediction: the labels at or over their thresholds (0.5 for a label without one)."""
    t = np.array([thresholds.get(k, LABEL_THRESHOLD) for k in labels])
    chosen = [name for name, p, th in zip(labels, probs, t) if p >= th]
    return {**text_fields(text), "label": "|".join(chosen), "labels": chosen,
            "probabilities": dict(zip(labels, map(float, probs))),
            "thresholds": dict(zip(labels, map(float, t)))}
