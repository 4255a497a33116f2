"""A training run and its directory: data split, adapter, metrics, report and plots, all in one place.

``train_run`` is what ``lorafit train`` calls; ``evaluate_run`` and ``predict_texts`` are what
``lorafit eval`` and ``lorafit predict`` call. Each step inside is a public function of its own module.
"""

from __future__ import annotations

import contextlib
import copy
import json
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .accounting import count_parameters
from .adapter import (ADAPTER_CONFIG, ClassifierSpec, adapter_state, build_classifier, check_compatible,
                      load_adapter_into, load_classifier, save_adapter)
from .batching import Encoded, encode_texts
from .data import SPLIT_NAMES, Splits, encode_labels, load_splits, read_table
from .errors import LorafitError
from .evaluate import classification_metrics, predict_proba
from .files import load_safetensors, save_safetensors, write_json, write_text
from .lora import set_merged
from .report import library_versions, render_markdown
from .runtime import peak_memory_mb, setup
from .train import History, TrainConfig, TrainingStopped, TrainState, fit

RUN_MARKERS = (ADAPTER_CONFIG, "report.json", "metrics.jsonl", "checkpoint.json")


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


def encode_split(backbone, labels: list[str], df, name: str, where: str | None = None) -> Encoded:
    where = where or f"{name} split"
    return encode_texts(backbone.encoder, df["text"].tolist(), encode_labels(df, labels, where),
                        backbone.context_length, where=where)


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


CHECKPOINT_WEIGHTS = "checkpoint.safetensors"
CHECKPOINT_STATE = "checkpoint.json"


def train_run(spec: ClassifierSpec, data_cfg: DataConfig, train_cfg: TrainConfig, out: str | Path, *,
              device: str = "auto", precision: str = "auto", overwrite: bool = False, command: str = "",
              progress: bool = True) -> RunResult:
    """Everything ``lorafit train`` does: split, build, train, keep the best adapter, report, plot.

    SIGINT / SIGTERM (and a diverging loss) stop training at the next optimiser step and leave a
    resumable checkpoint in ``out``: :func:`resume_run` continues it to the same adapter.
    """
    out = Path(out)
    setup(device, precision)  # bad flags fail before any work
    splits = load_splits(data_cfg.data, val=data_cfg.val, test=data_cfg.test, text_col=data_cfg.text_col,
                         label_col=data_cfg.label_col, seed=train_cfg.seed, balance=data_cfg.balance)
    prepare_run_dir(out, overwrite)
    for name in (CHECKPOINT_WEIGHTS, CHECKPOINT_STATE):
        (out / name).unlink(missing_ok=True)
    spec.labels = splits.labels
    spec.backbone.seed = train_cfg.seed
    splits.save(out)
    run = {"device": device, "precision": precision, "command": command,
           "skipped_empty": splits.skipped_empty}
    return _train(out, spec, data_cfg, train_cfg, splits, run, None, progress)


def resume_run(out: str | Path, *, progress: bool = True) -> RunResult:
    """Continue an interrupted run from its checkpoint, with its own split, settings and RNG state."""
    out = Path(out)
    path = out / CHECKPOINT_STATE
    if not path.is_file():
        done = " (it finished: see report.md)" if (out / "report.json").is_file() else ""
        raise LorafitError(f"--resume {out}: no {CHECKPOINT_STATE} to resume from{done}")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        spec = ClassifierSpec.from_dict(saved["spec"])
        data_cfg = DataConfig(**saved["data"])
        train_cfg = TrainConfig(**saved["train"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise LorafitError(f"{path}: not a lorafit checkpoint ({e})") from e
    tensors = load_safetensors(out / CHECKPOINT_WEIGHTS)
    if tensors.get("checkpoint.step", torch.tensor(-1)).item() != saved["state"]["step"]:
        raise LorafitError(f"{out}: {CHECKPOINT_WEIGHTS} and {CHECKPOINT_STATE} are from different steps")
    splits = Splits.load(out, spec.labels)
    optimizer = {"state": {}, "param_groups": saved["optimizer_param_groups"]}
    for key, t in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            optimizer["state"].setdefault(int(idx), {})[name] = t
    state = TrainState(**saved["state"], history=History.from_dict(saved["history"]), optimizer=optimizer,
                       rng=tensors["rng.torch"])
    model_tensors = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    return _train(out, spec, data_cfg, train_cfg, splits, saved["run"], (state, model_tensors), progress)


def save_checkpoint(out: Path, model, spec: ClassifierSpec, data_cfg: DataConfig, train_cfg: TrainConfig,
                    state: TrainState, run: dict) -> None:
    """LoRA + head, optimiser moments, RNG and position in the data order: what an exact resume needs."""
    tensors = {f"model.{k}": v for k, v in adapter_state(model).items()}
    for idx, moments in state.optimizer["state"].items():
        for name, t in moments.items():
            tensors[f"optimizer.{idx}.{name}"] = torch.as_tensor(t)
    tensors["rng.torch"] = state.rng
    tensors["checkpoint.step"] = torch.tensor(state.step)
    save_safetensors(out / CHECKPOINT_WEIGHTS, tensors, metadata={"format": "lorafit-checkpoint"})
    write_json(out / CHECKPOINT_STATE, {
        "spec": spec.to_dict(), "data": asdict(data_cfg), "train": train_cfg.to_dict(), "run": run,
        "state": {"epoch": state.epoch, "batch": state.batch, "step": state.step,
                  "best_accuracy": state.best_accuracy},
        "history": state.history.to_dict(), "optimizer_param_groups": state.optimizer["param_groups"],
    })


@contextlib.contextmanager
def stop_on_signals():
    """SIGINT / SIGTERM ask training to stop at the next step (a second SIGINT stops at once)."""
    requested = {"signal": None}

    def handler(signum, frame):
        if requested["signal"] == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        requested["signal"] = signum

    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: requested["signal"] is not None
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _train(out: Path, spec: ClassifierSpec, data_cfg: DataConfig, train_cfg: TrainConfig, splits: Splits,
           run: dict, resume: tuple[TrainState, dict] | None, progress: bool) -> RunResult:
    wall = time.perf_counter()
    dev, dtype = setup(run["device"], run["precision"])
    expected = copy.deepcopy(spec) if resume else None
    model, backbone = build_classifier(spec, seed=train_cfg.seed)
    state = None
    if resume:
        check_compatible(expected, spec, str(out))  # the base must not have changed since the checkpoint
        state, tensors = resume
        with torch.no_grad():
            for k, t in adapter_state(model).items():
                t.copy_(tensors[k])
    counts = count_parameters(model)
    enc = {name: encode_split(backbone, splits.labels, getattr(splits, name), name) for name in SPLIT_NAMES}

    with open(out / "metrics.jsonl", "a", encoding="utf-8") as metrics_file, stop_on_signals() as stop_requested:
        try:
            history = fit(model, enc["train"], enc["val"], train_cfg, pad_id=backbone.encoder.pad_id,
                          labels=splits.labels, device=dev, dtype=dtype,
                          on_best=lambda rec: save_adapter(out, model, spec),
                          log=lambda rec: append_metrics(metrics_file, rec), progress=progress, state=state,
                          stop_requested=stop_requested)
        except TrainingStopped as e:
            save_checkpoint(out, model, spec, data_cfg, train_cfg, e.state, run)
            how = (f"resume with: lorafit train --resume {out}" if e.exit_code == 130 else
                   f"last good state saved in {out / CHECKPOINT_STATE}; best adapter so far in {out / ADAPTER_CONFIG}")
            raise TrainingStopped(f"{e}; {how}", e.state, e.exit_code) from None
    if history.best != history.epochs[-1]:
        load_adapter_into(model, spec, out)  # evaluate the kept (best) adapter, not the last weights
    metrics, eval_rate = evaluate_model(model, backbone, enc, splits.labels, dev, dtype, 4 * train_cfg.batch_size)

    report = {
        "name": out.name,
        "command": run["command"],
        "model": spec.to_dict(),
        "train": train_cfg.to_dict(),
        "data": {**asdict(data_cfg), "labels": splits.labels, "skipped_empty_texts": run.get("skipped_empty", 0),
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
    if resume:
        report["resumed"] = True
    write_report(out, report, history)
    for name in (CHECKPOINT_WEIGHTS, CHECKPOINT_STATE):
        (out / name).unlink(missing_ok=True)  # the run is complete: nothing left to resume
    return RunResult(out, report, history)


def append_metrics(file, record: dict) -> None:
    file.write(json.dumps(record) + "\n")
    file.flush()


def write_report(out: Path, report: dict, history) -> None:
    from .plots import plot_accuracy, plot_confusion, plot_loss  # matplotlib only when a report is drawn

    plot_loss(history.train, history.val, history.epochs, out / "loss.png")
    plot_accuracy(history.val, history.epochs, {k: v["accuracy"] for k, v in report["metrics"].items()},
                  out / "accuracy.png")
    if "test" in report["metrics"]:
        plot_confusion(report["metrics"]["test"]["confusion_matrix"], report["model"]["labels"],
                       out / "confusion_matrix.png")
    write_json(out / "report.json", report)
    write_text(out / "report.md", render_markdown(report))


def _load_for_inference(run: str | Path, device: str, precision: str):
    """A saved run's classifier on its device; bad --device / --precision fail before the model loads."""
    dev, dtype = setup(device, precision)
    model, backbone, spec = load_classifier(run)
    return model.to(dev), backbone, spec, dev, dtype


def evaluate_run(run: str | Path, data: str | None = None, *, text_col: str | None = None,
                 label_col: str | None = None, device: str = "auto", precision: str = "auto",
                 batch_size: int = 32) -> dict:
    """Re-evaluate a saved adapter: on the run's own saved splits, or on a labelled file of the user's."""
    run = Path(run)
    model, backbone, spec, dev, dtype = _load_for_inference(run, device, precision)
    if data:
        enc = {"data": encode_split(backbone, spec.labels, read_table(data, text_col, label_col), "data", str(data))}
    else:
        splits = Splits.load(run, spec.labels, hint="; pass --data FILE to evaluate on other data")
        enc = {name: encode_split(backbone, spec.labels, getattr(splits, name), name) for name in SPLIT_NAMES}
    metrics, rate = evaluate_model(model, backbone, enc, spec.labels, dev, dtype, batch_size)
    return {"metrics": metrics, "examples_per_s": rate}


def predict_texts(run: str | Path, texts: list[str], *, device: str = "auto", precision: str = "auto",
                  batch_size: int = 32) -> list[dict]:
    """Label and probability for each text, in order."""
    model, backbone, spec, dev, dtype = _load_for_inference(run, device, precision)
    set_merged(model, True)
    enc = encode_texts(backbone.encoder, texts, None, backbone.context_length, where="input")
    probs = predict_proba(model, enc, backbone.encoder.pad_id, batch_size=batch_size, device=dev, dtype=dtype)
    best = probs.argmax(axis=1)
    return [{"text": t, "label": spec.labels[k], "probability": float(p[k]),
             "probabilities": dict(zip(spec.labels, map(float, p)))} for t, k, p in zip(texts, best, probs)]
