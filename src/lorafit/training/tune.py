"""``lorafit tune``: an Optuna search over LoRA and training settings in which every trial is an ordinary run.

The first trial is always the base settings as given (the defaults unless flags change them), so the table
answers "did the search beat the default run?" on the same split. Each trial trains into
``<out>/trial-NNN`` exactly as ``lorafit train`` would (``lorafit compare`` reads them, or the tune folder
itself); its full-validation accuracy after each epoch goes to Optuna, whose median pruner stops trials
that trail the others at the same epoch. The study lives in ``<out>/study.journal`` (Optuna's journal
storage, safe for several processes): running the same command again continues it up to ``--trials``.
The best trial is copied to ``<out>/best`` and the table written to ``<out>/tune.md``.

Ctrl-C (SIGINT) or SIGTERM stops the whole search, not one trial: the trial in progress stops at its next
step, is recorded as failed and its settings queued again, so the same command continues with them; the
finished trials stay in the journal. A trial that fails (a diverged loss, a setting the base refuses) is
one line naming the trial and its run folder, and the search goes on.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from ..adapters.storage import ClassifierSpec
from ..data.datasets import DataConfig
from ..errors import LorafitError, SettingError
from ..files import write_json, write_text
from ..reporting.report import percent
from .loop import TrainConfig, TrainingStopped
from .checkpoint import CheckpointPolicy, RunSettings
from .run import stop_on_signals, train_run

SPACE = ("lr", "rank", "alpha", "epochs", "dropout", "variant")
VARIANTS = ("lora", "rslora", "dora", "loraplus", "pissa")
CHOICES = {"rank": (4, 8, 16, 32), "alpha": (8.0, 16.0, 32.0, 64.0), "dropout": (0.0, 0.05, 0.1)}
JOURNAL = "study.journal"
STUDY = "lorafit-tune"


@dataclass
class TuneConfig:
    """How the search runs; the base settings (and so the default trial) come from the spec and TrainConfig."""

    trials: int = 10  # finished trials (complete or pruned) the study ends with
    jobs: int = 1  # trials at once (threads of one process; the cores are shared out between them)
    space: tuple[str, ...] = SPACE
    prune: bool = True
    max_epochs: int = 3  # epochs are searched in 1..max_epochs

    def __post_init__(self) -> None:
        unknown = [s for s in self.space if s not in SPACE]
        problems = [SettingError("{space}: unknown setting {!r} (choose from {})", unknown[0], ", ".join(SPACE))
                    ] if unknown else []
        problems += [SettingError("{%s} must be >= 1, got {}" % k, getattr(self, k))
                     for k in ("trials", "jobs", "max_epochs") if getattr(self, k) < 1]
        error = SettingError.joined(problems)
        if error:
            raise error


class TuneInterrupted(LorafitError):
    """The search was stopped by a signal (exit code 130, as a shell's Ctrl-C); rerunning continues it."""

    exit_code = 130


def require_optuna():
    try:
        import optuna
    except ImportError as e:
        raise LorafitError("lorafit tune needs Optuna: pip install 'lorafit[tune]'") from e
    # Optuna logs a failed trial with its whole traceback at WARNING: lorafit says it in one line instead
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna


def variant_of(spec: ClassifierSpec, train: TrainConfig) -> str:
    lora = spec.lora
    if lora.use_dora:
        return "dora"
    if lora.init == "pissa":
        return "pissa"
    if train.lora_plus_ratio:
        return "loraplus"
    return "rslora" if lora.use_rslora else "lora"


def base_params(spec: ClassifierSpec, train: TrainConfig, cfg: TuneConfig) -> dict:
    """The base settings as a trial's parameters (the first trial), for the settings searched."""
    values = {"lr": train.lr, "rank": spec.lora.rank, "alpha": float(spec.lora.alpha), "epochs": train.epochs,
              "dropout": spec.lora.dropout, "variant": variant_of(spec, train)}
    outside = [k for k in cfg.space if k in CHOICES and values[k] not in CHOICES[k]]
    if outside or ("epochs" in cfg.space and values["epochs"] > cfg.max_epochs):
        name = outside[0] if outside else "epochs"
        raise SettingError("{%s} {:g}: the search space has no such value, so the base settings cannot be the "
                           "first trial (choose from {})" % name, values[name],
                           CHOICES.get(name, f"1..{cfg.max_epochs}"))
    return {k: values[k] for k in cfg.space}


def suggest(trial, spec: ClassifierSpec, train: TrainConfig, cfg: TuneConfig) -> tuple[ClassifierSpec, TrainConfig]:
    """One trial's settings: the base ones with the searched settings drawn by Optuna."""
    s = set(cfg.space)
    lora, t = spec.lora, train
    if "lr" in s:
        t = replace(t, lr=trial.suggest_float("lr", 1e-4, 3e-3, log=True))
    if "epochs" in s:
        t = replace(t, epochs=trial.suggest_int("epochs", 1, cfg.max_epochs))
    for name, field in (("rank", "rank"), ("alpha", "alpha"), ("dropout", "dropout")):
        if name in s:
            lora = replace(lora, **{field: trial.suggest_categorical(name, CHOICES[name])})
    if "variant" in s:
        v = trial.suggest_categorical("variant", VARIANTS)
        lora = replace(lora, use_rslora=v == "rslora", use_dora=v == "dora", init="pissa" if v == "pissa" else "default")
        t = replace(t, lora_plus_ratio=16.0 if v == "loraplus" else None)
    return replace(spec, lora=lora), t


def tune(spec: ClassifierSpec, data_cfg: DataConfig, train_cfg: TrainConfig, out: str | Path,
         cfg: TuneConfig | None = None, settings: RunSettings | None = None, *, progress: bool = True,
         stop: Callable[[], bool] | None = None) -> dict:
    """Run (or continue) the search in ``out``; returns the summary written to ``out/tune.json``.

    SIGINT / SIGTERM, or ``stop()`` turning true (a notebook's button), end the search at the next training
    step with :class:`TuneInterrupted` (see the module's docstring)."""
    optuna = require_optuna()
    out, cfg, settings = Path(out), cfg or TuneConfig(), settings or RunSettings()
    out.mkdir(parents=True, exist_ok=True)
    first = base_params(spec, train_cfg, cfg)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / JOURNAL)))
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2) if cfg.prune else optuna.pruners.NopPruner()
    study = optuna.create_study(study_name=STUDY, storage=storage, direction="maximize", load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(seed=train_cfg.seed), pruner=pruner)
    states = optuna.trial.TrialState
    for t in study.get_trials(deepcopy=False, states=(states.RUNNING,)):  # a killed earlier command's: run again
        study.tell(t.number, state=states.FAIL)
        study.enqueue_trial(t.params)
    if not study.trials:
        study.enqueue_trial(first)
    if cfg.trials > _finished(optuna, study):
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.jobs))
        with stop_on_signals() as signalled:
            halt = (lambda: signalled() or stop()) if stop else signalled  # noqa: E731
            objective = _objective(optuna, spec, data_cfg, train_cfg, cfg, out, settings, halt)
            try:
                _optimize(optuna, study, objective, cfg, progress)
            except KeyboardInterrupt:
                n = _finished(optuna, study)
                raise TuneInterrupted(f"{out}: search interrupted; {n} finished trial{'s' if n != 1 else ''} kept in "
                                      f"{out / JOURNAL}: run the same command again to continue") from None
    return _summarise(optuna, study, out)


def _finished(optuna, study) -> int:
    states = optuna.trial.TrialState
    return len(study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED)))


def _optimize(optuna, study, objective, cfg: TuneConfig, progress: bool) -> None:
    """Trials until ``cfg.trials`` have finished (complete or pruned); failed ones are replaced, up to
    ``cfg.trials`` failures in this command (a base that fails every trial ends the search)."""
    failures = 0
    while (remaining := cfg.trials - (done := _finished(optuna, study))) > 0 and failures < cfg.trials:
        n = min(remaining, cfg.trials - failures)
        study.optimize(objective, n_trials=n, n_jobs=cfg.jobs, show_progress_bar=progress)
        failures += n - (_finished(optuna, study) - done)  # trials run less trials finished


def _signals_to_the_main_thread() -> None:
    """Block SIGINT / SIGTERM in a trial's worker thread (``--jobs`` > 1): the kernel then delivers a Ctrl-C to
    the main thread, whose handler stops every trial at once, instead of to a worker, where Python would run
    the handler only once the main thread next wakes (after a whole trial)."""
    if threading.current_thread() is not threading.main_thread() and hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def _objective(optuna, spec, data_cfg, train_cfg, cfg, out, settings, halt: Callable[[], bool]):
    def objective(trial) -> float:
        _signals_to_the_main_thread()
        spec_t, train_t = suggest(trial, spec, train_cfg, cfg)
        if halt():  # asked to stop between two trials
            trial.study.enqueue_trial(trial.params)
            raise KeyboardInterrupt
        directory = out / f"trial-{trial.number:03d}"
        trial.set_user_attr("run", directory.name)

        def on_record(record: dict) -> None:
            if record["event"] == "epoch" and record.get("val_accuracy") is not None:
                trial.report(record["val_accuracy"], step=record["epoch"])
                if trial.should_prune():
                    raise optuna.TrialPruned(f"validation accuracy {percent(record['val_accuracy'])} after epoch "
                                             f"{record['epoch']} trails the median")

        trial_settings = replace(settings, command=f"{settings.command} (trial {trial.number})",
                                 checkpoints=CheckpointPolicy(save_every_minutes=0))
        try:
            result = train_run(spec_t, data_cfg, train_t, directory, trial_settings, overwrite=True, progress=False,
                               on_record=on_record, stop=halt)
        except TrainingStopped as e:
            if e.exit_code != 130:
                return _failed(trial, e, directory)
            trial.study.enqueue_trial(trial.params)  # the same settings first when the search continues
            raise KeyboardInterrupt from None
        except LorafitError as e:
            return _failed(trial, e, directory)
        metrics = result.report["metrics"]
        trial.set_user_attr("test_accuracy", metrics.get("test", {}).get("accuracy"))
        trial.set_user_attr("train_seconds", result.report["speed"]["train_seconds"])
        return metrics["val"]["accuracy"]
    return objective


def _failed(trial, error: LorafitError, directory: Path) -> float:
    """A failed trial, said in one line; NaN makes Optuna record it as failed and go on."""
    message = error.reason if isinstance(error, TrainingStopped) else str(error)
    trial.set_user_attr("error", message)
    warnings.warn(f"trial {trial.number} failed: {message} (its run folder: {directory})", stacklevel=2)
    return float("nan")


def _summarise(optuna, study, out: Path) -> dict:
    states = optuna.trial.TrialState
    trials = [t for t in study.get_trials(deepcopy=False) if t.state in (states.COMPLETE, states.PRUNED, states.FAIL)]
    complete = [t for t in trials if t.state == states.COMPLETE]
    if not complete:
        raise LorafitError(f"{out}: no trial finished (see the trial folders' metrics.jsonl)")
    best = max(complete, key=lambda t: (t.value, -t.number))
    default = next((t for t in trials if t.number == 0), None)
    best_dir = out / "best"
    shutil.rmtree(best_dir, ignore_errors=True)
    shutil.copytree(out / best.user_attrs["run"], best_dir)
    rows = [{"trial": t.number, "state": t.state.name.lower(), **t.params,
             "val_accuracy": t.value if t.state == states.COMPLETE else None,
             "test_accuracy": t.user_attrs.get("test_accuracy"), "train_seconds": t.user_attrs.get("train_seconds"),
             "run": t.user_attrs.get("run")} for t in trials]
    summary = {"best_trial": best.number, "best_val_accuracy": best.value, "trials": rows,
               "default_val_accuracy": default.value if default and default.state == states.COMPLETE else None}
    summary["verdict"] = verdict(summary)
    write_json(out / "tune.json", summary)
    write_text(out / "tune.md", render_table(summary))
    return summary


def verdict(summary: dict) -> str:
    best, base = summary["best_val_accuracy"], summary["default_val_accuracy"]
    if base is None:
        return f"best: trial {summary['best_trial']}, validation {percent(best)} (the base settings' trial did not finish)"
    if summary["best_trial"] != 0 and best > base:
        return (f"best: trial {summary['best_trial']}, validation {percent(best)}, beats the base settings "
                f"(trial 0, {percent(base)}) by {100 * (best - base):.2f} points")
    return f"the search could not beat the base settings' validation accuracy ({percent(base)}, trial 0)"


def render_table(summary: dict) -> str:
    """tune.md: every finished trial, best first-marked, and the verdict."""
    keys = [k for k in SPACE if any(k in r for r in summary["trials"])]
    head = ["trial", "state", *keys, "val acc", "test acc", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary["trials"]:
        mark = " (best)" if r["trial"] == summary["best_trial"] else " (base)" if r["trial"] == 0 else ""
        cells = [f"{r['trial']}{mark}", r["state"]] + [_cell(r.get(k)) for k in keys] + [
            percent(r["val_accuracy"]), percent(r["test_accuracy"]),
            "n/a" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(["# lorafit tune", "", *lines, "", summary["verdict"], ""])


def _cell(v) -> str:
    if v is None:
        return ""
    return f"{v:.2e}" if isinstance(v, float) and 0 < abs(v) < 0.01 else f"{v:g}" if isinstance(v, float) else str(v)
