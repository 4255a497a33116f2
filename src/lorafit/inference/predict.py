"""Class probabilities from a classifier, and from a saved run: what eval, predict and the server call."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..adapters.loading import load_classifier
from ..adapters.lora import set_merged, store_frozen_linears
from ..data.batching import Encoded, encode_texts, eval_order, iterate, lengths_of
from ..runtime import autocast, check_flags, setup


@torch.inference_mode()
def predict_logits(model, data: Encoded, pad_id: int, *, batch_size: int = 32, device: torch.device | None = None,
                   dtype: torch.dtype | None = None, order: list[np.ndarray] | None = None) -> torch.Tensor:
    """Class logits (N, C) in fp32, in the input order; batches are sorted by length for speed.

    ``order``: only these batches of indices (one process's share); the other rows stay zero.
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = torch.zeros((len(data.ids), model.num_classes), dtype=torch.float32)
    order = eval_order(lengths_of(data), batch_size) if order is None else order
    for batch in iterate(data, order, pad_id):
        batch = batch.to(device)
        with autocast(device, dtype):
            logits = model(batch.input_ids, batch.attention_mask)  # (B, C)
        out[torch.from_numpy(batch.index)] = logits.float().cpu()
    model.train(was_training)
    return out


def predict_proba(model, data: Encoded, pad_id: int, *, batch_size: int = 32, device: torch.device | None = None,
                  dtype: torch.dtype | None = None, order: list[np.ndarray] | None = None) -> np.ndarray:
    """Class probabilities (N, C) in the input order; with ``order``, only those batches' rows are computed."""
    logits = predict_logits(model, data, pad_id, batch_size=batch_size, device=device, dtype=dtype, order=order)
    return torch.softmax(logits, dim=-1).numpy().astype(np.float64)


def load_for_inference(run: str | Path, device: str, precision: str):
    """A saved run's classifier on its device, LoRA merged into the base (no adapter cost per call).

    Bad --device / --precision fail before the model loads.
    """
    check_flags(device, precision)
    model, backbone, spec = load_classifier(run)
    dev, dtype = setup(device, precision, backbone.hidden_size)
    set_merged(model, True)
    if dtype is not None:
        store_frozen_linears(model, dtype)  # the merged weights in the compute precision: no casts per batch
    return model.to(dev), backbone, spec, dev, dtype


def predict_texts(run: str | Path, texts: list[str], *, device: str = "auto", precision: str = "auto",
                  batch_size: int = 32) -> list[dict]:
    """Label and probability for each text, in order."""
    model, backbone, spec, dev, dtype = load_for_inference(run, device, precision)
    enc = encode_texts(backbone.encoder, texts, None, backbone.context_length, where="input")
    probs = predict_proba(model, enc, backbone.encoder.pad_id, batch_size=batch_size, device=dev, dtype=dtype)
    best = probs.argmax(axis=1)
    return [{"text": t, "label": spec.labels[k], "probability": float(p[k]),
             "probabilities": dict(zip(spec.labels, map(float, p)))} for t, k, p in zip(texts, best, probs)]
