"""A training run and its directory: data split, adapter, metrics, report and plots, all in one place.

``train_run`` is what ``lorafit train`` calls, ``resume_run`` what ``lorafit train --resume`` calls.
Each step inside is a public function of its own module.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from ..adapters.accounting import count_parameters
from ..adapters.lora import store_frozen_linears
from ..adapters.storage import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, ClassifierSpec, adapter_state, build_classifier,
                                check_compatible, load_adapter_into, save_adapter, save_spec)
from ..data.batching import encode_frame
from ..data.datasets import SPLIT_NAMES, DataConfig, Splits, load_splits
from ..errors import LorafitError, WriteError
from ..files import remove_temp_files, write_json, write_text
from ..inference.evaluate import predict_splits, split_metrics
from ..reporting.calibration import DecisionConfig
from ..reporting.loggers import LoggerConfig, flatten, open_loggers
from ..reporting.metrics import label_thresholds
from ..reporting.plots import plot_accuracy, plot_confusion, plot_loss
from ..reporting.report import build_report, render_markdown
from ..runtime import Compute, check_compute, resolve_compute
from .checkpoint import (CHECKPOINT, Checkpoint, PeriodicCheckpoints, RunSettings, load_checkpoint, remove_checkpoint,
                         save_checkpoint, saved_command)
from .decisions import Kept, decide_run
from .distributed import Distributed, Launch, regroup, restart_count, session
from .loop import History, TrainConfig, TrainingStopped, fit

METRICS = "metrics.jsonl"
RUN_MARKERS = (ADAPTER_CONFIG, "report.json", METRICS, CHECKPOINT)


@dataclass
class RunResult:
    directory: Path
    report: dict
    history: History | None = field(repr=False, default=None)
    is_main: bool = True  # False on torchrun's other ranks, which write and print nothing


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
        (out / METRICS).unlink(missing_ok=True)


def train_run(spec: ClassifierSpec, data_cfg: DataConfig, train_cfg: TrainConfig, out: str | Path, *,
              device: str = "auto", precision: str = "auto", overwrite: bool = False, command: str = "",
              progress: bool = True, save_every: int = 0, save_every_minutes: float = 10.0,
              loggers: LoggerConfig = LoggerConfig(), launch: Launch = Launch(),
              decision: DecisionConfig = DecisionConfig(),
              on_record: Callable[[dict], None] | None = None) -> RunResult:
    """Everything ``lorafit train`` does: split, build, train, keep the best adapter, calibrate, report, plot.

    A checkpoint is written every ``save_every`` optimiser steps, every ``save_every_minutes`` and at each
    epoch end (0 turns either period off); SIGINT / SIGTERM (and a diverging loss) stop training at the
    next optimiser step and write one too. :func:`resume_run` continues from it to the same adapter.
    ``loggers`` names trackers (CSV, TensorBoard, MLflow) that receive every metrics record besides
    metrics.jsonl. ``decision``: the calibration and operating threshold fitted on validation afterwards.
    Under torchrun every process trains its share and rank 0 alone writes ``out``. ``on_record`` receives
    every metrics record as it is logged (``lorafit tune`` prunes trials from it; an exception it raises
    stops the run there).
    """
    out = Path(out)
    dev = check_compute(device, precision)  # bad settings fail before any work
    settings = RunSettings(device, precision, command, save_every=save_every, save_every_minutes=save_every_minutes,
                           loggers=loggers, decision=decision)
    with session(dev, launch, train_cfg.batch_size, "start a new run") as (dist, dev):
        splits = dist.main_first(lambda: load_splits(**asdict(data_cfg), seed=train_cfg.seed))
        if dist.is_main:
            prepare_run_dir(out, overwrite)
            remove_checkpoint(out)
            splits.save(out)
        if decision.target:
            decision.positive_class(splits.labels)  # a wrong --positive-class fails before training
        spec = replace(spec, labels=splits.labels, backbone=replace(spec.backbone, seed=train_cfg.seed),
                       multi_label=splits.multi_label)
        settings = replace(settings, skipped_empty=splits.skipped_empty, world_size=dist.world)
        if splits.balancing.get("method") == "weights" and train_cfg.class_weights is None:
            train_cfg = replace(train_cfg, class_weights="auto")  # balancing by the loss, every text kept
        return _train(out, spec, data_cfg, train_cfg, splits, settings, None, progress, dist, dev, on_record)


def resume_run(out: str | Path, *, progress: bool = True, loggers: LoggerConfig | None = None,
               launch: Launch = Launch()) -> RunResult:
    """Continue an interrupted (or killed) run from its checkpoint, with its own split, settings and RNG state.

    The trackers are the run's own unless ``loggers`` names others.

    Under torchrun every process reads ``out``. Another number of processes is fine when it divides
    the run's optimiser step (its global batch, hence its math, stays the same); otherwise refused.
    """
    out = Path(out)
    ckpt = load_checkpoint(out)
    splits = Splits.load(out, ckpt.spec.labels, multi_label=ckpt.spec.multi_label)
    dev = check_compute(ckpt.settings.device, ckpt.settings.precision)
    with session(dev, launch, ckpt.train.batch_size, f"resume {out.resolve()}") as (dist, dev):
        if dist.is_main:
            remove_temp_files(out)  # a kill during a write leaves its temporary file
        train_cfg = replace(ckpt.train, grad_accum=regroup(ckpt.train.grad_accum, ckpt.settings.world_size,
                                                           dist.world, f"--resume {out}"))
        settings = replace(ckpt.settings, world_size=dist.world,
                           loggers=ckpt.settings.loggers if loggers is None else loggers)
        return _train(out, ckpt.spec, ckpt.data, train_cfg, splits, settings, ckpt, progress, dist, dev)


def resume_or_start(out: Path, command: str, overwrite: bool) -> bool:
    """``--resume auto`` (the default under torchrun): continue ``out`` if it holds a checkpoint of this
    same command, so that torchrun's restarts (``--max-restarts``) pick up where the job died.

    ``--overwrite`` starts afresh on the first attempt, not on a restart; a checkpoint of another
    command is refused unless ``--overwrite`` replaces it.
    """
    if not (out / CHECKPOINT).is_file():
        return False
    saved = saved_command(out)  # the header only: resume_run reads the tensors
    if saved == command:
        return restart_count() > 0 or not overwrite
    if not overwrite:
        raise LorafitError(f"--out {out}: holds a checkpoint of another command ({saved}); continue that one "
                           f"with --resume {out}, or pass --overwrite to replace it")
    return False


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
           settings: RunSettings, resume: Checkpoint | None, progress: bool, dist: Distributed,
           dev: torch.device, on_record: Callable[[dict], None] | None = None) -> RunResult:
    wall = time.perf_counter()
    model, backbone, built = dist.main_first(lambda: build_classifier(spec, seed=train_cfg.seed,
                                                                      initialise=resume is None))
    # dev: this rank's device; precision "auto" times the CPU: rank 0's choice holds for every rank
    compute = resolve_compute(dev, settings.precision, backbone.hidden_size, agree=dist.broadcast_object)
    # "auto" is a start-up timing: a resume must compute in the precision it chose, not time again
    settings = replace(settings, precision=compute.precision)
    if compute.autocast_dtype is not None:
        store_frozen_linears(model, compute.autocast_dtype)  # cast once here, not at every step
    if resume:
        check_compatible(spec, built, str(out))  # the base must not have changed since the checkpoint
        with torch.no_grad():
            for k, t in adapter_state(model).items():
                t.copy_(resume.adapter[k])
    spec = built
    counts = count_parameters(model)
    encoder, context = backbone.encoder, backbone.context_length
    enc = {name: encode_frame(encoder, context, getattr(splits, name), splits.labels, f"{name} split",
                              splits.multi_label)
           for name in SPLIT_NAMES}
    writer = dist.is_main  # rank 0 alone writes the run directory, shows progress and feeds the trackers
    save = (lambda state: save_checkpoint(out, model, spec, data_cfg, train_cfg, state, settings)) if writer \
        else (lambda state: None)
    checkpoints = PeriodicCheckpoints(save, settings.save_every, settings.save_every_minutes,
                                      saved_step=resume.state.step if resume else None)
    try:
        hparams = _hparams(spec, train_cfg, settings.precision)
        with (open_loggers(settings.loggers, out, hparams, kept=resume.state.history.records() if resume else None) if writer
              else contextlib.nullcontext(None)) as track:
            history = _fit(out, model, spec, enc, splits.labels, encoder.pad_id, train_cfg, compute, dist,
                           resume, checkpoints, progress,
                           track if on_record is None else (lambda rec: (track(rec), on_record(rec))))
        probs, eval_rate = _predict_kept(out, model, spec, enc, encoder.pad_id, train_cfg, compute, dist, history)
        if not writer:
            return RunResult(out, {}, history, is_main=False)
        if spec.multi_label:  # each label decided at the threshold of best F1 on validation; no temperature
            spec = replace(spec, thresholds=dict(zip(spec.labels, label_thresholds(enc["val"].labels, probs["val"])))
                           if len(enc["val"].ids) else {})
            save_spec(out, spec)
            metrics, decisions = split_metrics(probs, enc, spec.labels, spec.thresholds), {}
        else:
            spec, metrics, decisions = decide_run(out, spec, probs, enc, settings.decision,
                                                  Kept(model, encoder, compute, list(splits.test.text)))
        report = build_report(name=out.name, command=settings.command, spec=spec.to_dict(),
                              train=train_cfg.to_dict(),
                              data={**asdict(data_cfg), "labels": splits.labels, "balancing": splits.balancing,
                                    "skipped_empty_texts": settings.skipped_empty,
                                    "sizes": {k: len(v.ids) for k, v in enc.items()},
                                    "truncated_texts": {k: v.truncated for k, v in enc.items()}},
                              parameters=counts.to_dict(), metrics=metrics, history=history, compute=compute,
                              eval_examples_per_s=eval_rate, wall_seconds=time.perf_counter() - wall,
                              resumed=resume is not None, distributed=dist.describe(), extra=decisions)
        write_report(out, report, history)
    except WriteError as e:  # a full disk, a read-only folder: say what is still whole
        raise LorafitError(f"{e}; {what_survives(out, checkpoints.saved_step)}") from e
    remove_checkpoint(out)  # the run is complete: nothing left to resume
    return RunResult(out, report, history)


def _fit(out: Path, model, spec: ClassifierSpec, enc: dict, labels: list[str], pad_id: int, train_cfg: TrainConfig,
         compute: Compute, dist: Distributed, resume: Checkpoint | None, checkpoints: PeriodicCheckpoints,
         progress: bool, track: Callable[[dict], None] | None) -> History:
    """:func:`fit` with the run's files around it: best adapter, metrics.jsonl and the trackers, checkpoints
    (one when stopped); on torchrun's other ranks nothing is written."""
    writer, metrics_path = dist.is_main, out / METRICS
    if resume and writer:  # the steps after the checkpoint are replayed: their lines go, so none is logged twice
        write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in resume.state.history.records()))
    with (open(metrics_path, "ab", buffering=0) if writer else contextlib.nullcontext()) as metrics_file, \
            stop_on_signals() as stop_requested:
        try:
            return fit(model, enc["train"], enc["val"], train_cfg, pad_id=pad_id, labels=labels, compute=compute,
                       on_best=(lambda rec: save_adapter(out, model, spec)) if writer else None,
                       log=(lambda rec: (append_metrics(metrics_file, rec), track(rec))) if writer else None,
                       progress=progress and writer, state=resume.state if resume else None,
                       stop_requested=stop_requested, on_step=checkpoints if writer else None, dist=dist)
        except TrainingStopped as e:
            checkpoints.save(e.state)  # does nothing on ranks other than 0
            how = (f"resume with: lorafit train --resume {out}" if e.exit_code == 130 else
                   f"last good state saved in {out / CHECKPOINT}; best adapter so far in {out / ADAPTER_WEIGHTS}")
            raise TrainingStopped(f"{e}; {how}", e.state, e.exit_code) from None


def _predict_kept(out: Path, model, spec: ClassifierSpec, enc: dict, pad_id: int, train_cfg: TrainConfig,
                  compute: Compute, dist: Distributed, history: History) -> tuple[dict, float]:
    """Probabilities of the kept (best) adapter, not the last weights, per split: rank 0 reads it, every
    rank gets it."""
    if history.best != history.epochs[-1]:
        if dist.is_main:
            load_adapter_into(model, spec, out)
        dist.broadcast_tensors(adapter_state(model).values())
    return predict_splits(model, pad_id, enc, compute, 4 * train_cfg.batch_size, predict=dist.predict)


def _hparams(spec: ClassifierSpec, train_cfg: TrainConfig, precision: str) -> dict:
    """The run's settings as the trackers record them (flat names)."""
    return flatten({"model": spec.backbone.model, "random_init": spec.backbone.random_init,
                    "precision": precision, "lora": spec.lora.to_dict(), "train": train_cfg.to_dict()})


def what_survives(out: Path, saved_step: int | None) -> str:
    """After a failed write: which files are still whole, and how to go on."""
    kept = []
    if saved_step is not None and (out / CHECKPOINT).is_file():
        kept.append(f"the last checkpoint (step {saved_step}) {out / CHECKPOINT}")
    if (out / ADAPTER_WEIGHTS).is_file():
        kept.append(f"the best adapter so far {out / ADAPTER_WEIGHTS}")
    if not kept:
        return "nothing was saved yet"
    then = f"; make room, then: lorafit train --resume {out}" if saved_step is not None else ""
    return f"{' and '.join(kept)} {'are' if len(kept) > 1 else 'is'} intact{then}"


def append_metrics(file, record: dict) -> None:
    """One JSON line, written at once (unbuffered: a failed write leaves nothing pending to flush)."""
    try:
        file.write((json.dumps(record) + "\n").encode())
    except OSError as e:
        raise WriteError(file.name, e.strerror or str(e)) from e


def write_report(out: Path, report: dict, history: History) -> None:
    plot_loss(history.train, history.val, history.epochs, out / "loss.png")
    plot_accuracy(history.val, history.epochs, {k: v["accuracy"] for k, v in report["metrics"].items()},
                  out / "accuracy.png")
    if report["metrics"].get("test", {}).get("confusion_matrix"):  # none for multi-label
        plot_confusion(report["metrics"]["test"]["confusion_matrix"], report["model"]["labels"],
                       out / "confusion_matrix.png")
    write_json(out / "report.json", report)
    write_text(out / "report.md", render_markdown(report))
