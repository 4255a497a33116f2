"""A training run and its directory: data split, adapter, metrics, report and plots, all in one place.

``train_run`` is what ``lorafit train`` calls; ``evaluate_run`` and ``predict_texts`` are what
``lorafit eval`` and ``lorafit predict`` call. Each step inside is a public function of its own module.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .accounting import count_parameters
from .adapter import ADAPTER_CONFIG, ClassifierSpec, build_classifier, load_adapter_into, load_classifier, save_adapter
from .batching import Encoded, encode_texts
from .data import Splits, load_splits, read_table
from .errors import LorafitError
from .evaluate import classification_metrics, predict_proba
from .files import write_json, write_text
from .lora import set_merged
from .plots import plot_accuracy, plot_confusion, plot_loss
from .report import library_versions, render_markdown
from .runtime import peak_memory_mb, resolve_device, resolve_precision
from .train import TrainConfig, fit

RUN_MARKERS = (ADAPTER_CONFIG, "report.json", "metrics.jsonl")


@dataclass
class DataConfig:
    """Which labelled texts, and how they are split."""

    data: str | None = None  # file; None downloads the SMS Spam Collection
    val: str | None = None
    test: str | None = None
    text_col: str | None = None
    label_col: str | None = None
    balance: bool = True  # under-sample every class to the rarest one's count


@dataclass
class RunResult:
    directory: Path
    report: dict
    history: object = field(repr=False, default=None)


def prepare_run_dir(out: Path, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder unless asked, and fail early if the folder is not writable."""
    if out.exists() and not out.is_dir():
        raise LorafitError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any((out / m).exists() for m in RUN_MARKERS) and not overwrite:
        raise LorafitError(f"--out {out}: already holds a run; choose another --out or pass --overwrite")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".lorafit-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise LorafitError(f"--out {out}: not writable ({e.strerror or e})") from e
    if overwrite:
        (out / "metrics.jsonl").unlink(missing_ok=True)


def encode_split(backbone, splits: Splits, df, name: str) -> Encoded:
    return encode_texts(backbone.encoder, df["text"].tolist(), splits.encode_labels(df, name),
                        backbone.context_length, where=f"{name} split")


def evaluate_model(model, backbone, data: dict[str, Encoded], labels: list[str], device, dtype,
                   batch_size: int) -> tuple[dict, float]:
    """Metrics per split with LoRA merged into the base (no adapter overhead); returns examples/s too."""
    set_merged(model, True)
    metrics, n, seconds = {}, 0, 0.0
    for split, enc in data.items():
        t0 = time.perf_counter()
        probs = predict_proba(model, enc, backbone.encoder.pad_id, batch_size=batch_size, device=device, dtype=dtype)
        seconds += time.perf_counter() - t0
        n += len(enc.ids)
        metrics[split] = classification_metrics(enc.labels, probs, labels)
    set_merged(model, False)
    return metrics, n / seconds if seconds else 0.0


def train_run(spec: ClassifierSpec, data_cfg: DataConfig, train_cfg: TrainConfig, out: str | Path, *,
              device: str = "auto", precision: str = "auto", overwrite: bool = False, command: str = "",
              progress: bool = True) -> RunResult:
    """Everything ``lorafit train`` does: split, build, train, keep the best adapter, report, plot."""
    wall = time.perf_counter()
    out = Path(out)
    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)
    prepare_run_dir(out, overwrite)
    splits = load_splits(data_cfg.data, val=data_cfg.val, test=data_cfg.test, text_col=data_cfg.text_col,
                         label_col=data_cfg.label_col, seed=train_cfg.seed, balance=data_cfg.balance)
    spec.labels = splits.labels
    spec.backbone.seed = train_cfg.seed
    model, backbone = build_classifier(spec, seed=train_cfg.seed)
    counts = count_parameters(model)
    enc = {name: encode_split(backbone, splits, getattr(splits, name), name) for name in ("train", "val", "test")}
    splits.save(out)

    metrics_path = out / "metrics.jsonl"
    with open(metrics_path, "a", encoding="utf-8") as metrics_file:
        def log(record: dict) -> None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

        history = fit(model, enc["train"], enc["val"], train_cfg, pad_id=backbone.encoder.pad_id, labels=splits.labels,
                      device=dev, dtype=dtype, on_best=lambda rec: save_adapter(out, model, spec), log=log,
                      progress=progress)
    if history.best is not history.epochs[-1]:
        load_adapter_into(model, spec, out)  # evaluate the kept (best) adapter, not the last weights
    metrics, eval_rate = evaluate_model(model, backbone, enc, splits.labels, dev, dtype, 4 * train_cfg.batch_size)

    report = {
        "name": out.name,
        "command": command,
        "model": spec.to_dict(),
        "train": train_cfg.to_dict(),
        "data": {**data_cfg.__dict__, "labels": splits.labels, "skipped_empty_texts": splits.skipped_empty,
                 "sizes": {k: len(v.ids) for k, v in enc.items()},
                 "truncated_texts": {k: v.truncated for k, v in enc.items()}},
        "parameters": counts.to_dict(),
        "metrics": metrics,
        "best_epoch": history.best["epoch"],
        "epochs": history.epochs,
        "speed": {
            "device": str(dev), "precision": "bf16 autocast" if dtype else "fp32",
            "train_seconds": history.train_seconds,
            "train_examples_per_s": history.train_examples / history.train_seconds,
            "train_tokens_per_s": history.train_tokens / history.train_seconds,
            "eval_examples_per_s": eval_rate,
            "wall_seconds": time.perf_counter() - wall,
            **peak_memory_mb(dev),
        },
        "versions": library_versions(),
    }
    write_report(out, report, history)
    return RunResult(out, report, history)


def write_report(out: Path, report: dict, history) -> None:
    plot_loss(history.train, history.val, history.epochs, out / "loss.png")
    plot_accuracy(history.val, history.epochs, {k: v["accuracy"] for k, v in report["metrics"].items()},
                  out / "accuracy.png")
    if "test" in report["metrics"]:
        plot_confusion(report["metrics"]["test"]["confusion_matrix"], report["model"]["labels"],
                       out / "confusion_matrix.png")
    write_json(out / "report.json", report)
    write_text(out / "report.md", render_markdown(report))


def evaluate_run(run: str | Path, data: str | None = None, *, text_col: str | None = None,
                 label_col: str | None = None, device: str = "auto", precision: str = "auto",
                 batch_size: int = 32) -> dict:
    """Re-evaluate a saved adapter: on the run's own saved splits, or on a labelled file of the user's."""
    run = Path(run)
    model, backbone, spec = load_classifier(run)
    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)
    model.to(dev)
    splits = Splits(None, None, None, spec.labels)
    if data:
        frames = {"data": read_table(data, text_col, label_col)}
    else:
        missing = [f"{s}.csv" for s in ("train", "val", "test") if not (run / f"{s}.csv").is_file()]
        if missing:
            raise LorafitError(f"{run}: no {', '.join(missing)}; pass --data FILE to evaluate on other data")
        frames = {s: read_table(run / f"{s}.csv") for s in ("train", "val", "test")}
    enc = {name: encode_split(backbone, splits, df, name if not data else str(data)) for name, df in frames.items()}
    metrics, rate = evaluate_model(model, backbone, enc, spec.labels, dev, dtype, batch_size)
    return {"metrics": metrics, "examples_per_s": rate}


def predict_texts(run: str | Path, texts: list[str], *, device: str = "auto", precision: str = "auto",
                  batch_size: int = 32) -> list[dict]:
    """Label and probability for each text, in order."""
    model, backbone, spec = load_classifier(run)
    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)
    model.to(dev)
    set_merged(model, True)
    enc = encode_texts(backbone.encoder, texts, None, backbone.context_length, where="input")
    probs = predict_proba(model, enc, backbone.encoder.pad_id, batch_size=batch_size, device=dev, dtype=dtype)
    best = probs.argmax(axis=1)
    return [{"text": t, "label": spec.labels[k], "probability": float(p[k]),
             "probabilities": dict(zip(spec.labels, map(float, p)))} for t, k, p in zip(texts, best, probs)]
