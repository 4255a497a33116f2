"""Resumable checkpoints: LoRA + head, optimiser moments, RNG and position in the data order.

One file, ``checkpoint.safetensors``: the tensors, with the run's settings, counters and history as JSON in
its header. It is written under a temporary name, fsynced and renamed over the previous one, so a kill at
any moment leaves the previous checkpoint or the new one whole, never a mix of two steps.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..adapters.storage import ClassifierSpec, adapter_state
from ..data.datasets import DataConfig
from ..errors import FieldError, LorafitError, SettingError
from ..files import load_safetensors, safetensors_metadata, save_safetensors
from ..reporting.calibration import DecisionConfig
from ..reporting.loggers import LoggerConfig
from .loop import History, TrainConfig, Trainer, TrainState

CHECKPOINT = "checkpoint.safetensors"
FORMAT = "lorafit-checkpoint"


@dataclass
class CheckpointPolicy:
    """When a run writes a checkpoint besides each epoch's end (0 turns either period off)."""

    save_every: int = 0  # optimiser steps between periodic checkpoints
    save_every_minutes: float = 10.0  # minutes between periodic checkpoints

    def __post_init__(self) -> None:
        if self.save_every < 0 or self.save_every_minutes < 0:
            raise SettingError("{save_every} and {save_every_minutes} must be >= 0 (0 turns them off), got {} and {}",
                               self.save_every, self.save_every_minutes)


@dataclass
class RunSettings:
    """How a run is carried out, kept in its checkpoint so that a resume repeats it."""

    command: str = ""  # the command line that started it (a torchrun restart continues only the same one)
    device: str = "auto"
    precision: str = "auto"  # in a checkpoint: what "auto" resolved to, so that a resume computes the same way
    checkpoints: CheckpointPolicy = field(default_factory=CheckpointPolicy)
    loggers: LoggerConfig = field(default_factory=LoggerConfig)  # the trackers; a resume feeds them too
    decision: DecisionConfig = field(default_factory=DecisionConfig)  # calibration and threshold after training

    @classmethod
    def from_dict(cls, d: dict) -> "RunSettings":
        return cls(d["command"], d["device"], d["precision"], CheckpointPolicy(**d["checkpoints"]),
                   LoggerConfig(**d["loggers"]), DecisionConfig(**d["decision"]))


@dataclass
class RunPlan:
    """A run's configs, whole: what it trains, on which data and how; what its checkpoint keeps."""

    spec: ClassifierSpec
    data: DataConfig
    train: TrainConfig
    settings: RunSettings = field(default_factory=RunSettings)
    skipped_empty: int = 0  # empty texts dropped from the data file
    world_size: int = 1  # processes of the torchrun job (grad_accum is per process)

    def to_dict(self) -> dict:
        return {"spec": self.spec.to_dict(), "data": asdict(self.data), "train": self.train.to_dict(),
                "run": asdict(self.settings), "skipped_empty": self.skipped_empty, "world_size": self.world_size}

    @classmethod
    def from_dict(cls, d: dict) -> "RunPlan":
        return cls(ClassifierSpec.from_dict(d["spec"]), DataConfig(**d["data"]), TrainConfig(**d["train"]),
                   RunSettings.from_dict(d["run"]), d["skipped_empty"], d["world_size"])


@dataclass
class Checkpoint:
    plan: RunPlan
    state: TrainState
    adapter: dict[str, torch.Tensor]  # adapter_state names -> tensors


def save_checkpoint(out: Path, model, plan: RunPlan, state: TrainState) -> None:
    """What an exact resume needs, in one atomically replaced file."""
    tensors = {f"model.{k}": v for k, v in adapter_state(model).items()}
    for idx, moments in state.optimizer["state"].items():
        for name, t in moments.items():
            tensors[f"optimizer.{idx}.{name}"] = torch.as_tensor(t)
    tensors["rng.torch"] = state.rng
    saved = {**plan.to_dict(),
             "state": {"epoch": state.epoch, "batch": state.batch, "step": state.step,
                       "best_accuracy": state.best_accuracy},
             "history": state.history.to_dict(), "optimizer_param_groups": state.optimizer["param_groups"]}
    save_safetensors(out / CHECKPOINT, tensors, metadata={"format": FORMAT, "run": json.dumps(saved)})


def _saved_record(out: Path) -> tuple[Path, dict]:
    """The checkpoint's path and the run record in its header (no tensor is read)."""
    path = out / CHECKPOINT
    if not path.is_file():
        done = " (it finished: see report.md)" if (out / "report.json").is_file() else ""
        raise FieldError("{resume} {}: no {} to resume from{}", out, CHECKPOINT, done)
    meta = safetensors_metadata(path)
    try:
        if meta.get("format") != FORMAT:
            raise KeyError("format")
        return path, json.loads(meta["run"])
    except (KeyError, json.JSONDecodeError) as e:
        raise LorafitError(f"{path}: not a lorafit checkpoint ({e})") from e


def saved_command(out: Path) -> str:
    """The command that wrote the checkpoint in ``out``, read from its header alone."""
    path, saved = _saved_record(out)
    try:
        return saved["run"]["command"]
    except (KeyError, TypeError) as e:
        raise LorafitError(f"{path}: not a lorafit checkpoint ({e})") from e


def load_checkpoint(out: Path) -> Checkpoint:
    path, saved = _saved_record(out)
    try:
        plan = RunPlan.from_dict(saved)
        counters = saved["state"]
        history = History.from_dict(saved["history"])
        groups = saved["optimizer_param_groups"]
    except (KeyError, TypeError) as e:
        raise LorafitError(f"{path}: not a lorafit checkpoint ({e})") from e
    tensors = load_safetensors(path)
    optimizer = {"state": {}, "param_groups": groups}
    for key, t in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            optimizer["state"].setdefault(int(idx), {})[name] = t
    state = TrainState(**counters, history=history, optimizer=optimizer, rng=tensors["rng.torch"])
    adapter = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    return Checkpoint(plan, state, adapter)


def remove_checkpoint(out: Path) -> None:
    (out / CHECKPOINT).unlink(missing_ok=True)


class PeriodicCheckpoints:
    """The training loop's ``on_step`` hook: a checkpoint every N steps, every M minutes and at each epoch end.

    ``saved_step`` is the step of the last checkpoint on disk (None before the first), for error messages.
    """

    def __init__(self, save: Callable[[TrainState], None], every_steps: int, every_minutes: float,
                 saved_step: int | None = None):
        self.write, self.every_steps, self.every_seconds = save, every_steps, 60 * every_minutes
        self.saved_step, self.saved_at = saved_step, time.monotonic()

    def __call__(self, trainer: Trainer, epoch_end: bool) -> None:
        step = trainer.state.step
        if (epoch_end or (self.every_steps and step % self.every_steps == 0)
                or (self.every_seconds and time.monotonic() - self.saved_at >= self.every_seconds)):
            self.save(trainer.snapshot())

    def save(self, state: TrainState) -> None:
        self.write(state)
        self.saved_step, self.saved_at = state.step, time.monotonic()
