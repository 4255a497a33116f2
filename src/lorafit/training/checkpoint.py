"""Resumable checkpoints: LoRA + head, optimiser moments, RNG and position in the data order.

Two files, written atomically: ``checkpoint.safetensors`` (tensors) and ``checkpoint.json`` (the run's
settings and counters). Both carry the optimiser step, so a pair from different steps is refused.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..adapters.storage import ClassifierSpec, adapter_state
from ..data.datasets import DataConfig
from ..errors import LorafitError
from ..files import load_safetensors, read_json, save_safetensors, write_json
from .loop import History, TrainConfig, TrainState

CHECKPOINT_WEIGHTS = "checkpoint.safetensors"
CHECKPOINT_STATE = "checkpoint.json"


@dataclass
class RunSettings:
    """How a run was started, kept in its checkpoint so that a resume repeats it."""

    device: str = "auto"
    precision: str = "auto"
    command: str = ""
    skipped_empty: int = 0  # empty texts dropped from the data file


@dataclass
class Checkpoint:
    spec: ClassifierSpec
    data: DataConfig
    train: TrainConfig
    settings: RunSettings
    state: TrainState
    adapter: dict[str, torch.Tensor]  # adapter_state names -> tensors


def save_checkpoint(out: Path, model, spec: ClassifierSpec, data_cfg: DataConfig, train_cfg: TrainConfig,
                    state: TrainState, settings: RunSettings) -> None:
    """What an exact resume needs, in two atomically written files."""
    tensors = {f"model.{k}": v for k, v in adapter_state(model).items()}
    for idx, moments in state.optimizer["state"].items():
        for name, t in moments.items():
            tensors[f"optimizer.{idx}.{name}"] = torch.as_tensor(t)
    tensors["rng.torch"] = state.rng
    tensors["checkpoint.step"] = torch.tensor(state.step)
    save_safetensors(out / CHECKPOINT_WEIGHTS, tensors, metadata={"format": "lorafit-checkpoint"})
    write_json(out / CHECKPOINT_STATE, {
        "spec": spec.to_dict(), "data": asdict(data_cfg), "train": train_cfg.to_dict(), "run": asdict(settings),
        "state": {"epoch": state.epoch, "batch": state.batch, "step": state.step,
                  "best_accuracy": state.best_accuracy},
        "history": state.history.to_dict(), "optimizer_param_groups": state.optimizer["param_groups"],
    })


def load_checkpoint(out: Path) -> Checkpoint:
    path = out / CHECKPOINT_STATE
    if not path.is_file():
        done = " (it finished: see report.md)" if (out / "report.json").is_file() else ""
        raise LorafitError(f"--resume {out}: no {CHECKPOINT_STATE} to resume from{done}")
    saved = read_json(path)
    try:
        spec = ClassifierSpec.from_dict(saved["spec"])
        data_cfg = DataConfig(**saved["data"])
        train_cfg = TrainConfig(**saved["train"])
        settings = RunSettings(**saved["run"])
        counters = saved["state"]
        history = History.from_dict(saved["history"])
        groups = saved["optimizer_param_groups"]
    except (KeyError, TypeError) as e:
        raise LorafitError(f"{path}: not a lorafit checkpoint ({e})") from e
    tensors = load_safetensors(out / CHECKPOINT_WEIGHTS)
    if tensors.get("checkpoint.step", torch.tensor(-1)).item() != counters["step"]:
        raise LorafitError(f"{out}: {CHECKPOINT_WEIGHTS} and {CHECKPOINT_STATE} are from different steps")
    optimizer = {"state": {}, "param_groups": groups}
    for key, t in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            optimizer["state"].setdefault(int(idx), {})[name] = t
    state = TrainState(**counters, history=history, optimizer=optimizer, rng=tensors["rng.torch"])
    adapter = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    return Checkpoint(spec, data_cfg, train_cfg, settings, state, adapter)


def remove_checkpoint(out: Path) -> None:
    for name in (CHECKPOINT_WEIGHTS, CHECKPOINT_STATE):
        (out / name).unlink(missing_ok=True)
