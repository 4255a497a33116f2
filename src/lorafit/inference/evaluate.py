"""Metrics of a classifier on labelled splits, and of a saved run: what ``lorafit eval`` calls."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..adapters.lora import lora_merged
from ..adapters.storage import ClassifierSpec
from ..data.batching import Encoded, encode_frame
from ..errors import FieldError
from ..data.datasets import SPLIT_NAMES, DataConfig, Splits
from ..reporting.calibration import decide
from ..reporting.metrics import LABEL_THRESHOLD, classification_metrics, multilabel_metrics
from ..runtime import Compute
from .predict import load_for_inference, predict_proba


def predict_splits(model, pad_id: int, data: dict[str, Encoded], compute: Compute | None, batch_size: int,
                   predict=predict_proba) -> tuple[dict[str, np.ndarray], float]:
    """Probabilities per split with LoRA merged into the base (no adapter overhead), and examples/s.

    ``predict``: :func:`predict_proba` or a function with its signature (a sharded one under torchrun).
    """
    probs, n, seconds = {}, 0, 0.0
    with lora_merged(model):
        for split, enc in data.items():
            t0 = time.perf_counter()
            probs[split] = predict(model, enc, pad_id, batch_size=batch_size, compute=compute)
            seconds += time.perf_counter() - t0
            n += len(enc.ids)
    return probs, n / seconds if seconds else 0.0


def split_metrics(probs: dict[str, np.ndarray], data: dict[str, Encoded], labels: list[str],
                  thresholds: dict[str, float] | None = None) -> dict:
    """:func:`classification_metrics` per split; with ``thresholds``, also ``at_threshold``: the same
    metrics for the thresholded decisions (what predict and serve answer). Multi-label (0/1 rows):
    :func:`multilabel_metrics`, each label decided at its threshold (:data:`LABEL_THRESHOLD` without one)."""
    metrics = {}
    for split, p in probs.items():
        y = data[split].labels
        if y.ndim == 2:
            metrics[split] = multilabel_metrics(y, p, labels, [(thresholds or {}).get(k, LABEL_THRESHOLD) for k in labels])
            continue
        metrics[split] = classification_metrics(y, p, labels)
        if thresholds:
            metrics[split]["at_threshold"] = classification_metrics(y, p, labels, decide(p, labels, thresholds))
    return metrics


def evaluate_model(model, pad_id: int, data: dict[str, Encoded], labels: list[str], compute: Compute | None,
                   batch_size: int, predict=predict_proba, thresholds: dict[str, float] | None = None) -> tuple[dict, float]:
    """Metrics per split (see :func:`split_metrics`) and examples/s."""
    probs, rate = predict_splits(model, pad_id, data, compute, batch_size, predict)
    return split_metrics(probs, data, labels, thresholds), rate


def read_like_run(data: DataConfig, spec: ClassifierSpec):
    """``data.data`` read as the run was trained: label sets or one label, pairs (by default from the run's
    own two columns) or single texts."""
    if spec.pair and data.text_col is None:
        data = replace(data, text_col=list(spec.text_pair.columns))
    if spec.pair != data.pair:
        raise FieldError("{text_col}: " + ("the run classifies pairs of texts: name two columns (it was trained on {})"
                                          if spec.pair else "the run classifies single texts: name one column{}"),
                         ",".join(spec.text_pair.columns) if spec.pair else "")
    return replace(data, multi_label=spec.multi_label).read(data.data)


def evaluate_run(run: str | Path, data: DataConfig | None = None, *, device: str = "auto", precision: str = "auto",
                 batch_size: int = 32) -> dict:
    """Re-evaluate a saved adapter: on the run's own saved splits, or on ``data.data``, a labelled file or
    ``hf:`` dataset of the user's, read as ``data`` says (its columns, encoding, header, split)."""
    run = Path(run)
    loaded = load_for_inference(run, device, precision)
    spec, encoder, context = loaded.spec, loaded.backbone.encoder, loaded.backbone.context_length
    if data is not None and data.data:  # read as the run was trained: one label per text or label sets
        frames = {"data": (read_like_run(data, spec), str(data.data))}
    else:
        splits = Splits.load(run, spec.labels, hint="; pass {data} FILE to evaluate on other data",
                             multi_label=spec.multi_label, pair=spec.pair)
        frames = {name: (getattr(splits, name), f"{name} split") for name in SPLIT_NAMES}
    enc = {name: encode_frame(encoder, context, df, spec.labels, where, spec.multi_label, spec.long)
           for name, (df, where) in frames.items()}
    metrics, rate = evaluate_model(loaded.model, encoder.pad_id, enc, spec.labels, loaded.compute, batch_size,
                                   thresholds=spec.thresholds)
    return {"metrics": metrics, "examples_per_s": rate}
