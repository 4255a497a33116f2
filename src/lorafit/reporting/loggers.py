"""Experiment trackers: the metrics records of a run, in ``metrics.jsonl`` and also in CSV, TensorBoard or MLflow.

``metrics.jsonl`` (:class:`JsonlLogger`) is always written; ``LoggerConfig.names`` adds trackers that
receive the very same records, so what a dashboard shows is what the run directory holds. Each tracker
has one small interface (:class:`MetricsLogger`); TensorBoard and MLflow are optional extras imported
only when asked for.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

from ..errors import FieldError, SettingError, WriteError

CSV_COLUMNS = ("event", "step", "epoch", "examples_seen", "loss", "lr", "val_loss", "val_accuracy", "val_examples",
               "seconds")  # the fields of fit's records; train, eval and epoch rows leave the others empty
AXES = ("event", "step", "epoch", "examples_seen")  # where a record sits, not a metric
EXTRAS = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # logger -> the module (and lorafit extra) it needs


class MetricsLogger(Protocol):
    # True: the tracker keeps what it logged before a resume itself (it is not sent the kept records again)
    continues: bool

    def log(self, record: dict) -> None:
        """One metrics record of :func:`lorafit.fit` (event train, eval or epoch)."""

    def log_hparams(self, hparams: dict) -> None:
        """The run's settings, flat: name -> bool, int, float or str."""

    def close(self, failed: bool = False) -> None: ...


# Each tracker is built as Tracker(out, cfg, kept): ``kept`` is None for a new run; for a resumed one, the
# records that the checkpoint keeps (the steps after it are replayed and logged again, so none is logged twice).
# A tracker that starts its output afresh (continues = False) is then sent the kept records first.
METRICS = "metrics.jsonl"


@dataclass
class LoggerConfig:
    """Which trackers a run feeds, and where MLflow writes."""

    names: tuple[str, ...] = ()  # any of csv, tensorboard, mlflow (each may be a comma list: "csv,mlflow")
    mlflow_uri: str = "./mlruns"  # a folder (MLflow's file store) or a tracking URI (sqlite:///..., http://...)

    def __post_init__(self) -> None:
        self.names = tuple(dict.fromkeys(n.strip() for v in self.names for n in v.split(",") if n.strip()))
        unknown = [n for n in self.names if n not in LOGGERS]
        if unknown:
            raise SettingError("{names} must be {} (or a comma list), got {}", ", ".join(LOGGERS), ", ".join(unknown))
        for name in self.names:
            module = EXTRAS.get(name)
            if module and importlib.util.find_spec(module) is None:
                raise SettingError("{names} {} needs the {} package: pip install 'lorafit[{}]'", name, module, name)


def scalars(record: dict) -> dict[str, float]:
    """The numbers of one record, named ``event/field`` (train/loss, eval/val_accuracy, epoch/val_loss...),
    plus ``epoch/examples_per_s``: training examples over training seconds so far."""
    out = {f"{record['event']}/{k}": float(v) for k, v in record.items()
           if k not in AXES and isinstance(v, (int, float)) and not isinstance(v, bool)}
    if record["event"] == "epoch" and record.get("seconds"):
        out["epoch/examples_per_s"] = record["examples_seen"] / record["seconds"]
    return out


def flatten(settings: dict, prefix: str = "") -> dict:
    """{"lora": {"rank": 8}} -> {"lora.rank": 8}; lists become comma strings, None the string "none"."""
    flat = {}
    for k, v in settings.items():
        if isinstance(v, dict):
            flat.update(flatten(v, f"{prefix}{k}."))
        elif isinstance(v, (list, tuple)):
            flat[f"{prefix}{k}"] = ",".join(map(str, v))
        else:
            flat[f"{prefix}{k}"] = "none" if v is None else v
    return flat


class JsonlLogger:
    """``metrics.jsonl``, always written: one JSON line per record, written at once (unbuffered: a failed
    write leaves nothing pending to flush); after a resume, the checkpoint's records and then the new ones."""

    continues = False

    def __init__(self, out: Path, cfg: LoggerConfig, kept: list[dict] | None):
        self.file = open(out / METRICS, "wb", buffering=0)

    def log(self, record: dict) -> None:
        try:
            self.file.write((json.dumps(record) + "\n").encode())
        except OSError as e:
            raise WriteError(self.file.name, e.strerror or str(e)) from e

    def log_hparams(self, hparams: dict) -> None:
        pass  # report.json holds the settings

    def close(self, failed: bool = False) -> None:
        self.file.close()


class CsvLogger:
    """``metrics.csv``: one row per record, the columns of :data:`CSV_COLUMNS`, flushed as it goes; after a
    resume, the checkpoint's records and then the new ones (the same rows as ``metrics.jsonl``)."""

    continues = False

    def __init__(self, out: Path, cfg: LoggerConfig, kept: list[dict] | None):
        self.file = open(out / "metrics.csv", "w", newline="", encoding="utf-8")
        self.writer = csv.DictWriter(self.file, CSV_COLUMNS, extrasaction="ignore")
        self.writer.writeheader()

    def log(self, record: dict) -> None:
        self.writer.writerow({k: "" if v is None else v for k, v in record.items()})
        self.file.flush()

    def log_hparams(self, hparams: dict) -> None:
        pass  # report.json holds the settings; a CSV of metrics has no place for them

    def close(self, failed: bool = False) -> None:
        self.file.close()


class TensorBoardLogger:
    """Event files in ``<run>/tensorboard``: every scalar against the optimiser step, the settings as hparams."""

    continues = True  # its event files stay; a resume hides what comes after the checkpoint instead

    def __init__(self, out: Path, cfg: LoggerConfig, kept: list[dict] | None):
        from torch.utils.tensorboard import SummaryWriter

        log_dir = out / "tensorboard"
        if kept is None:
            shutil.rmtree(log_dir, ignore_errors=True)  # an overwritten run starts a fresh timeline
        # on resume, TensorBoard hides the events after the checkpoint's last record: they are logged again
        purge = max((r["step"] for r in kept), default=0) + 1 if kept is not None else None
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge)

    def log(self, record: dict) -> None:
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, record["step"])

    def log_hparams(self, hparams: dict) -> None:
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        # in this run's own event file (SummaryWriter.add_hparams would open a sub-run per call)
        experiment, start, end = hparams_summary(hparams, {"epoch/val_accuracy": 0, "epoch/val_loss": 0})
        for summary in (experiment, start, end):
            self.writer.file_writer.add_summary(summary)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class MlflowLogger:
    """One MLflow run (experiment "lorafit", named after the run directory) through MlflowClient; a resumed
    run is a new MLflow run that starts with the checkpoint's records."""

    continues = False

    def __init__(self, out: Path, cfg: LoggerConfig, kept: list[dict] | None):
        from mlflow.tracking import MlflowClient

        uri = cfg.mlflow_uri
        self.env = contextlib.ExitStack()
        if ":" not in uri.split("/")[0]:  # a plain folder
            uri = Path(uri).resolve().as_uri()
        if uri.startswith("file:"):  # MLflow's file store, which MLflow 3 keeps behind an opt-in
            self.env.enter_context(_env("MLFLOW_ALLOW_FILE_STORE", "true"))
        try:
            self.client = MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name("lorafit")
            experiment = found.experiment_id if found else self.client.create_experiment("lorafit")
            self.run_id = self.client.create_run(experiment, run_name=out.resolve().name).info.run_id
        except Exception as e:  # MLflow raises its own and the store's exceptions; all mean "cannot track"
            self.env.close()
            raise FieldError("{mlflow_uri} {}: cannot start an MLflow run ({})", cfg.mlflow_uri, e) from e

    def log(self, record: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, record["step"])
                                                    for k, v in scalars(record).items()])

    def log_hparams(self, hparams: dict) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in hparams.items()])

    def close(self, failed: bool = False) -> None:
        try:
            self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")
        finally:
            self.env.close()


LOGGERS: dict[str, Callable[[Path, LoggerConfig, list[dict] | None], MetricsLogger]] = {
    "csv": CsvLogger, "tensorboard": TensorBoardLogger, "mlflow": MlflowLogger}


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = old or value  # the user's own setting wins
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]


@contextlib.contextmanager
def open_loggers(cfg: LoggerConfig, out: Path, hparams: dict, *, kept: list[dict] | None = None
                 ) -> Iterator[Callable[[dict], None]]:
    """Open metrics.jsonl and start the trackers ``cfg`` names, send them ``hparams``, and yield the function
    that logs a record to all of them; on leaving, close them (marked failed when the block raised).
    ``kept``: a resumed run's records up to its checkpoint (None for a new run)."""
    loggers: list[MetricsLogger] = []
    failed = False
    try:
        for make in (JsonlLogger, *(LOGGERS[name] for name in cfg.names)):
            loggers.append(make(out, cfg, kept))
            loggers[-1].log_hparams(hparams)
            for record in () if loggers[-1].continues else kept or ():
                loggers[-1].log(record)
        yield lambda record: [lg.log(record) for lg in loggers]
    except BaseException:
        failed = True
        raise
    finally:
        for lg in loggers:
            lg.close(failed)
