"""A training run and its directory: data split, adapter, metrics, report and plots, all in one place.

``train_run`` is what ``lorafit train`` calls, ``resume_run`` what ``lorafit train --resume`` calls.
Each step inside is a public function of its own module.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from ..adapters.accounting import count_parameters
from ..adapters.classifier import Classifier
from ..adapters.lora import store_frozen_linears
from ..adapters.build import build_classifier
from ..adapters.storage import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, ClassifierSpec, adapter_state, check_compatible,
                                load_adapter_into, save_adapter, save_spec)
from ..backbones.base import Backbone
from ..backbones.pairs import PairJoin
from ..data.batching import encode_frame, frame_inputs
from ..data.datasets import SPLIT_NAMES, DataConfig, Splits, load_splits, text_columns
from ..errors import FieldError, LorafitError, WriteError
from ..files import remove_temp_files, write_json, write_text
from ..inference.evaluate import predict_splits, split_metrics
from ..reporting.loggers import METRICS, LoggerConfig, flatten, open_loggers
from ..reporting.metrics import label_thresholds
from ..reporting.plots import plot_accuracy, plot_confusion, plot_loss
from ..reporting.report import build_report, render_markdown
from ..runtime import Compute, check_compute, resolve_compute
from .checkpoint import (CHECKPOINT, Checkpoint, PeriodicCheckpoints, RunPlan, RunSettings, load_checkpoint,
                         remove_checkpoint, save_checkpoint, saved_command)
from .decisions import Kept, decide_run, draw_labels
from .distributed import Distributed, Launch, launched_by_torchrun, regroup, restart_count, session
from .loop import History, Hooks, TrainConfig, TrainingStopped, TrainState, fit

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
        raise FieldError("{out} {}: exists and is not a directory", out)
    if out.is_dir() and any((out / m).exists() for m in RUN_MARKERS) and not overwrite:
        raise FieldError("{out} {}: already holds a run; choose another {out} or pass {overwrite}", out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".lorafit-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise FieldError("{out} {}: not writable ({})", out, e.strerror or e) from e
    if overwrite:
        (out / METRICS).unlink(missing_ok=True)


def train_run(spec: ClassifierSpec, data_cfg: DataConfig, train_cfg: TrainConfig, out: str | Path,
              settings: RunSettings | None = None, *, overwrite: bool = False, progress: bool = True,
              launch: Launch = Launch(), stop: Callable[[], bool] | None = None,
              on_record: Callable[[dict], None] | None = None) -> RunResult:
    """Everything ``lorafit train`` does: split, build, train, keep the best adapter, calibrate, report, plot.

    ``settings``: the device and precision, the checkpoint policy (a checkpoint every ``save_every``
    optimiser steps, every ``save_every_minutes`` and at each epoch end) and the trackers that receive every
    metrics record besides metrics.jsonl. SIGINT / SIGTERM (and a diverging loss) stop training at the next
    optimiser step and write a checkpoint too, as does ``stop()`` turning true (a time budget, a notebook's
    button); :func:`resume_run` continues from it to the same adapter.
    Under torchrun every process trains its share and rank 0 alone writes ``out``.
    ``on_record`` receives every metrics record as it is logged (``lorafit tune`` prunes trials from it; an
    exception it raises stops the run there).
    """
    out, settings = Path(out), settings or RunSettings()
    dev = check_compute(settings.device, settings.precision)  # bad settings fail before any work
    with session(dev, launch, "start a new run") as (dist, dev):
        splits = dist.main_first(lambda: load_splits(data_cfg, seed=train_cfg.seed))
        if dist.is_main:
            prepare_run_dir(out, overwrite)
            remove_checkpoint(out)
            splits.save(out)
        if settings.decision.target:
            settings.decision.positive_class(splits.labels)  # a wrong positive class fails before training
        spec = replace(spec, labels=splits.labels, backbone=replace(spec.backbone, seed=train_cfg.seed),
                       multi_label=splits.multi_label,
                       text_pair=PairJoin(columns=tuple(text_columns(data_cfg.text_col))) if splits.pair else None)
        if splits.balancing.get("method") == "weights" and train_cfg.class_weights is None:
            train_cfg = replace(train_cfg, class_weights="auto")  # balancing by the loss, every text kept
        plan = RunPlan(spec, data_cfg, train_cfg, settings, splits.skipped_empty, dist.world)
        return _Training(out, plan, splits, dist, dev, None, stop, on_record).run(progress)


def resume_run(out: str | Path, *, progress: bool = True, loggers: LoggerConfig | None = None,
               launch: Launch = Launch()) -> RunResult:
    """Continue an interrupted (or killed) run from its checkpoint, with its own split, settings and RNG state.

    The trackers are the run's own unless ``loggers`` names others.

    Under torchrun every process reads ``out``. Another number of processes is fine when it divides
    the run's optimiser step (its global batch, hence its math, stays the same); otherwise refused.
    """
    out = Path(out)
    ckpt = load_checkpoint(out)
    plan = ckpt.plan
    splits = Splits.load(out, plan.spec.labels, multi_label=plan.spec.multi_label, pair=plan.spec.pair)
    dev = check_compute(plan.settings.device, plan.settings.precision)
    with session(dev, launch, f"resume {out.resolve()}") as (dist, dev):
        if dist.is_main:
            remove_temp_files(out)  # a kill during a write leaves its temporary file
        train_cfg = replace(plan.train, grad_accum=regroup(plan.train.grad_accum, plan.world_size, dist.world, out))
        settings = plan.settings if loggers is None else replace(plan.settings, loggers=loggers)
        plan = replace(plan, train=train_cfg, settings=settings, world_size=dist.world)
        return _Training(out, plan, splits, dist, dev, ckpt).run(progress)


def default_run_dir(model: str, rank: int, seed: int) -> Path:
    """Where a run goes when no directory is named: runs/<model>-r<rank>-s<seed>."""
    return Path("runs") / f"{model_name(model)}-r{rank}-s{seed}"


def model_name(model: str) -> str:
    """The base model as run and tune folders name it: a preset, or the last part of a path or hub id."""
    return Path(model.removeprefix("hf:")).name or "model"


def run_to_resume(resume: str | Path | None, out: Path, command: str, overwrite: bool) -> Path | None:
    """The run ``lorafit train`` continues, or None to start one in ``out``: ``resume`` itself, or with
    ``auto`` (the default under torchrun) ``out`` when :func:`resume_or_start` says so."""
    resume = resume or ("auto" if launched_by_torchrun() else None)
    if resume != "auto":
        return Path(resume) if resume else None
    return out if resume_or_start(out, command, overwrite) else None


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
        raise FieldError("{out} {}: holds a checkpoint of another command ({}); continue that one with {resume} {}, "
                         "or pass {overwrite} to replace it", out, saved, out)
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


class _Training:
    """A run from its ready data to its report: build, train, evaluate the kept adapter, write the report.

    ``resume``: the checkpoint a resumed run continues from (None for a new run).
    """

    def __init__(self, out: Path, plan: RunPlan, splits: Splits, dist: Distributed, device: torch.device,
                 resume: Checkpoint | None, stop: Callable[[], bool] | None = None,
                 on_record: Callable[[dict], None] | None = None):
        self.out, self.plan, self.splits, self.dist, self.device, self.resume = out, plan, splits, dist, device, resume
        self.stop, self.on_record = stop or (lambda: False), on_record
        self.writer = dist.is_main  # rank 0 alone writes the run directory, shows progress and feeds the trackers

    def run(self, progress: bool) -> RunResult:
        wall = time.perf_counter()
        model, backbone, compute = self.build()
        enc = {name: encode_frame(backbone.encoder, backbone.context_length, getattr(self.splits, name),
                                  self.splits.labels, f"{name} split", self.splits.multi_label, self.plan.spec.long)
               for name in SPLIT_NAMES}
        policy = self.plan.settings.checkpoints
        checkpoints = PeriodicCheckpoints(self.saver(model), policy.save_every, policy.save_every_minutes,
                                          saved_step=self.resume.state.step if self.resume else None)
        try:
            history = self.fit(model, enc, backbone.encoder.pad_id, compute, checkpoints, progress)
            probs, eval_rate = self.predict_kept(model, enc, backbone.encoder.pad_id, compute, history)
            if not self.writer:
                return RunResult(self.out, {}, history, is_main=False)
            spec, metrics, decisions = self.decide(model, backbone, compute, probs, enc)
            self.plan = replace(self.plan, spec=spec)
            report = self.report(model, enc, metrics, history, compute, eval_rate, time.perf_counter() - wall,
                                 decisions)
            write_report(self.out, report, history)
        except WriteError as e:  # a full disk, a read-only folder: say what is still whole
            raise LorafitError(f"{e}; {what_survives(self.out, checkpoints.saved_step)}") from e
        remove_checkpoint(self.out)  # the run is complete: nothing left to resume
        return RunResult(self.out, report, history)

    def build(self) -> tuple[Classifier, Backbone, Compute]:
        """The model (with the checkpoint's adapter on resume) and how it computes; the plan's spec completed."""
        plan, resume = self.plan, self.resume
        model, backbone, built = self.dist.main_first(lambda: build_classifier(plan.spec, seed=plan.train.seed,
                                                                               initialise=resume is None))
        # self.device: this rank's device; precision "auto" times the CPU: rank 0's choice holds for every rank
        compute = resolve_compute(self.device, plan.settings.precision, backbone.hidden_size,
                                  agree=self.dist.broadcast_object)
        if compute.autocast_dtype is not None:
            store_frozen_linears(model, compute.autocast_dtype)  # cast once here, not at every step
        if resume:
            check_compatible(plan.spec, built, str(self.out))  # the base must not have changed since the checkpoint
            with torch.no_grad():
                for k, t in adapter_state(model).items():
                    t.copy_(resume.adapter[k])
        # "auto" is a start-up timing: the checkpoint keeps the precision it chose, so a resume does not time again
        self.plan = replace(plan, spec=built, settings=replace(plan.settings, precision=compute.precision))
        return model, backbone, compute

    def decide(self, model: Classifier, backbone: Backbone, compute: Compute, probs: dict,
               enc: dict) -> tuple[ClassifierSpec, dict, dict]:
        """How the kept adapter decides (thresholds, temperature), saved with it, and the metrics at that."""
        spec = self.plan.spec
        if spec.multi_label:  # each label decided at the threshold of best F1 on validation; no temperature
            spec = replace(spec, thresholds=dict(zip(spec.labels, label_thresholds(enc["val"].labels, probs["val"])))
                           if len(enc["val"].ids) else {})
            save_spec(self.out, spec)
            draw_labels(self.out, probs, {k: e.labels for k, e in enc.items()}, spec.labels, spec.thresholds)
            return spec, split_metrics(probs, enc, spec.labels, spec.thresholds), {}
        return decide_run(self.out, spec, probs, enc, self.plan.settings.decision,
                          Kept(model, backbone.encoder, compute, frame_inputs(self.splits.test)))

    def saver(self, model: Classifier) -> Callable[[TrainState], None]:
        """Writes a checkpoint of ``model`` at a given state (on rank 0; on the others, nothing)."""
        if not self.writer:
            return lambda state: None
        return lambda state: save_checkpoint(self.out, model, self.plan, state)

    def fit(self, model: Classifier, enc: dict, pad_id: int, compute: Compute, checkpoints: PeriodicCheckpoints,
            progress: bool) -> History:
        """:func:`fit` with the run's files around it: best adapter, metrics.jsonl and the trackers,
        checkpoints (one when stopped)."""
        out, plan, resume, writer = self.out, self.plan, self.resume, self.writer
        kept = resume.state.history.records() if resume else None
        hparams = _hparams(plan.spec, plan.train, plan.settings.precision)
        with (open_loggers(plan.settings.loggers, out, hparams, kept=kept) if writer
              else contextlib.nullcontext(None)) as track, stop_on_signals() as signalled:
            stop_requested = lambda: signalled() or self.stop()  # noqa: E731
            log = track if self.on_record is None else (lambda rec: (track(rec), self.on_record(rec)))
            hooks = Hooks(on_best=lambda rec: save_adapter(out, model, plan.spec), log=log, on_step=checkpoints,
                          stop_requested=stop_requested) if writer else Hooks(stop_requested=stop_requested)
            try:
                return fit(model, enc["train"], enc["val"], plan.train, pad_id=pad_id, labels=self.splits.labels,
                           compute=compute, state=resume.state if resume else None, hooks=hooks,
                           progress=progress and writer, dist=self.dist)
            except TrainingStopped as e:
                checkpoints.save(e.state)  # does nothing on ranks other than 0
                how = ("resume with: lorafit train --resume {}" if e.exit_code == 130 else
                       "last good state saved in {}; best adapter so far in {}")
                where = (out,) if e.exit_code == 130 else (out / CHECKPOINT, out / ADAPTER_WEIGHTS)
                raise TrainingStopped(e.template + "; " + how, *e.values, *where, state=e.state,
                                      exit_code=e.exit_code, reason=e.reason) from None

    def predict_kept(self, model: Classifier, enc: dict, pad_id: int, compute: Compute,
                     history: History) -> tuple[dict, float]:
        """Probabilities of the kept (best) adapter, not the last weights, per split: rank 0 reads it, every
        rank gets it."""
        if history.best != history.epochs[-1]:
            if self.dist.is_main:
                load_adapter_into(model, self.plan.spec, self.out)
            self.dist.broadcast_tensors(adapter_state(model).values())
        return predict_splits(model, pad_id, enc, compute, 4 * self.plan.train.batch_size, predict=self.dist.predict)

    def report(self, model: Classifier, enc: dict, metrics: dict, history: History, compute: Compute,
               eval_rate: float, wall_seconds: float, decisions: dict) -> dict:
        plan = self.plan
        data = {**asdict(plan.data), "labels": self.splits.labels, "balancing": self.splits.balancing,
                "skipped_empty_texts": plan.skipped_empty,
                "sizes": {k: len(v.ids) for k, v in enc.items()},
                "truncated_texts": {k: v.truncated for k, v in enc.items()}, "long": long_texts(plan.spec, enc)}
        return build_report(name=self.out.name, command=plan.settings.command, spec=plan.spec.to_dict(),
                            train=plan.train.to_dict(), data=data, parameters=count_parameters(model).to_dict(),
                            metrics=metrics, history=history, compute=compute, eval_examples_per_s=eval_rate,
                            wall_seconds=wall_seconds, resumed=self.resume is not None,
                            distributed=self.dist.describe(), extra=decisions)


def long_texts(spec: ClassifierSpec, enc: dict) -> dict:
    """report.json's account of long texts: the settings, and per split how many texts were chunked into how
    many windows (truncated ones are counted in ``truncated_texts``)."""
    out = spec.long.to_dict()
    windows = next((e.windows for e in enc.values() if e.windows is not None), None)
    if windows is not None:
        out.update(window=windows.size, stride=windows.stride, chunked_texts={k: e.chunked for k, e in enc.items()},
                   windows={k: e.n_windows for k, e in enc.items()}, texts={k: len(e.ids) for k, e in enc.items()})
    return out


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


def write_report(out: Path, report: dict, history: History) -> None:
    plot_loss(history.train, history.val, history.epochs, out / "loss.png")
    plot_accuracy(history.val, history.epochs, {k: v["accuracy"] for k, v in report["metrics"].items()},
                  out / "accuracy.png")
    if report["metrics"].get("test", {}).get("confusion_matrix"):  # none for multi-label
        plot_confusion(report["metrics"]["test"]["confusion_matrix"], report["model"]["labels"],
                       out / "confusion_matrix.png")
    write_json(out / "report.json", report)
    write_text(out / "report.md", render_markdown(report))
