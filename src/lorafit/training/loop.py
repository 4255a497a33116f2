"""The training loop: AdamW over the trainable parameters, length-bucketed batches, periodic evaluation.

:func:`fit` is a plain function over explicit objects (model, encoded data, config), so a notebook can
call it directly; everything the CLI adds (files, reports, checkpoints) happens in :mod:`.run` around it.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from torch import nn

from ..adapters.lora import lora_layers
from ..data.batching import Batch, Encoded, collate, lengths_of, train_order
from ..errors import FieldError, LorafitError, SettingError
from ..reporting.metrics import metrics_for
from ..runtime import Compute, return_freed_buffers_to_the_os
from .distributed import LOCAL, Distributed, PeerLost, peer_failures_as_lost

SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    """Optimisation settings; the defaults train one epoch of batch 8 at lr 5e-4, as the original recipe."""

    epochs: int = 1
    batch_size: int = 8
    lr: float = 5e-4  # AdamW learning rate
    weight_decay: float = 0.1
    grad_accum: int = 1  # batches per optimiser step
    schedule: str = "constant"  # or "cosine" (decays to 10 % of lr after warmup)
    warmup_steps: int = 0  # linear warmup, in optimiser steps
    clip_grad: float | None = 1.0  # max gradient norm; None turns clipping off
    eval_every: int = 50  # optimiser steps between evaluations on a validation slice (0: never)
    eval_batches: int = 5  # size of that slice, in batches
    class_weights: str | None = None  # "auto": inverse class frequency in the loss
    bucket: int = 32  # length-sort within chunks of this many batches (1: plain shuffling)
    seed: int = 42
    lora_plus_ratio: float | None = None  # LoRA+: B (and 1-D parameters) learn at this multiple of lr

    def __post_init__(self) -> None:
        problems = [SettingError("{%s} must be >= 1, got {}" % name, getattr(self, name))
                    for name in ("epochs", "batch_size", "grad_accum") if getattr(self, name) < 1]
        if self.lr <= 0:
            problems.append(SettingError("{lr} must be > 0, got {}", self.lr))
        if self.schedule not in SCHEDULES:
            problems.append(SettingError("{schedule} must be one of {}, got {!r}", ", ".join(SCHEDULES), self.schedule))
        if self.class_weights not in (None, "auto"):
            problems.append(SettingError("{class_weights} must be 'auto', got {!r}", self.class_weights))
        if self.lora_plus_ratio is not None and self.lora_plus_ratio <= 0:
            problems.append(SettingError("{lora_plus_ratio} must be > 0, got {}", self.lora_plus_ratio))
        if min(self.warmup_steps, self.eval_every, self.eval_batches) < 0:
            problems.append(SettingError("{warmup_steps}, {eval_every} and {eval_batches} must be >= 0"))
        if problems:
            raise SettingError.joined(problems)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class History:
    """What happened, step by step: enough to plot loss against epochs and examples seen, and to fill the report."""

    train: list[dict] = field(default_factory=list)  # per optimiser step: step, epoch, examples_seen, loss
    val: list[dict] = field(default_factory=list)  # per evaluation: step, epoch, examples_seen, loss, accuracy
    epochs: list[dict] = field(default_factory=list)  # per epoch: full validation accuracy and loss
    best: dict | None = None  # the epoch record whose adapter was kept
    train_seconds: float = 0.0
    train_examples: int = 0
    train_tokens: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "History":
        return cls(**d)

    def records(self) -> list[dict]:
        """Every metrics record in the order it was logged: a step, its evaluation, then its epoch's end."""
        order = {"train": 0, "eval": 1, "epoch": 2}
        return sorted(self.train + self.val + self.epochs, key=lambda r: (r["step"], order[r["event"]]))


@dataclass
class TrainState:
    """Where training stands at an optimiser-step boundary: enough to resume bit-identically on CPU."""

    epoch: int = 0  # the epoch in progress (0-based)
    batch: int = 0  # batches of that epoch already consumed
    step: int = 0  # optimiser steps taken
    best_accuracy: float = -1.0
    history: History = field(default_factory=History)
    optimizer: dict | None = None  # optimizer.state_dict()
    rng: torch.Tensor | None = None  # the state of the generator dropout draws from on the training device


class TrainingStopped(FieldError):
    """Training stopped early (interrupted, or diverged); ``state`` is the last good step, resumable.
    ``reason``: what stopped it, without the advice on resuming that the message may add."""

    def __init__(self, template: str, *values, state: TrainState, exit_code: int = 1, reason: str | None = None):
        super().__init__(template, *values)
        self.state = state
        self.exit_code = exit_code
        self.reason = reason or str(self)


def rng_state(device: torch.device) -> torch.Tensor:
    """The generator that dropout draws from on ``device`` (CUDA and MPS keep their own)."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    if device.type == "mps":
        return torch.mps.get_rng_state()
    return torch.get_rng_state()


def set_rng_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    elif device.type == "mps":
        torch.mps.set_rng_state(state)
    else:
        torch.set_rng_state(state)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
    return cfg.lr


def class_weight_tensor(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, normalised to mean 1: rare classes count as much as common ones.
    Multi-label (``labels`` (N, C) 0/1): BCE's ``pos_weight``, negatives / positives per label, so that
    a rare label's few positives weigh as much as its negatives."""
    if labels.ndim == 2:
        pos = labels.sum(axis=0)
        return torch.tensor((len(labels) - pos) / np.maximum(pos, 1), dtype=torch.float32)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    w = counts.sum() / (num_classes * np.maximum(counts, 1))
    return torch.tensor(w, dtype=torch.float32)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy over classes for class indices; for (B, C) 0/1 multi-label targets, binary
    cross-entropy per label (``weight``: its ``pos_weight``), as transformers does for each problem type."""
    if labels.dtype.is_floating_point:
        return F.binary_cross_entropy_with_logits(logits.float(), labels, pos_weight=weight)
    return F.cross_entropy(logits.float(), labels, weight=weight)


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """The optimiser's groups, each with the multiple of the scheduled lr it learns at (``lr_scale``).

    Plain: matrices with weight decay, 1-D parameters (biases, DoRA's magnitude) without. LoRA+ (Hayou
    et al., 2024, arXiv:2402.12354) groups as PEFT's ``create_loraplus_optimizer`` does (with
    ``loraplus_weight_decay`` = weight_decay): LoRA B and every 1-D parameter at ratio x lr, the rest at
    lr; weight decay on all but biases and LayerNorm parameters (so DoRA's magnitude is decayed there).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise LorafitError("the model has no trainable parameters (inject LoRA and add a head first)")
    if cfg.lora_plus_ratio is None:
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr_scale": 1.0}]
    else:
        lora_b = {id(m.lora_B) for m in lora_layers(model).values()}
        no_decay = {id(p) for m in model.modules() for name, p in m.named_parameters(recurse=False)
                    if name == "bias" or isinstance(m, nn.LayerNorm)}
        fast = [p for p in params if id(p) in lora_b or p.ndim == 1]
        fast_ids = {id(p) for p in fast}
        ratio = float(cfg.lora_plus_ratio)
        groups = [{"params": [p for p in params if id(p) not in fast_ids], "weight_decay": cfg.weight_decay,
                   "lr_scale": 1.0},
                  {"params": [p for p in fast if id(p) not in no_decay], "weight_decay": cfg.weight_decay,
                   "lr_scale": ratio},
                  {"params": [p for p in fast if id(p) in no_decay], "weight_decay": 0.0, "lr_scale": ratio}]
    return [{**g, "lr": cfg.lr * g["lr_scale"]} for g in groups if g["params"]]


def make_optimizer(model, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`."""
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr,
                             fused=device.type in ("cpu", "cuda"))  # one kernel, not a loop over tensors


def _ignore(*args) -> None:
    pass


@dataclass(frozen=True)
class Hooks:
    """What the training loop calls back into; each one optional."""

    on_best: Callable[[dict], None] = _ignore  # full validation accuracy improved: save that adapter
    log: Callable[[dict], None] = _ignore  # every metrics record, as it happens
    # (trainer, epoch_end) at every point training can resume from (after each optimiser step, after each
    # epoch's end), where trainer.snapshot() is exact: periodic checkpoints hook in here
    on_step: Callable[["Trainer", bool], None] = _ignore
    stop_requested: Callable[[], bool] = lambda: False  # true: stop at the next resumable point


class Trainer:
    """One training run's moving parts: the optimiser, the position in the data, the history, the clock.

    ``state`` resumes from a saved :class:`TrainState`. When ``hooks.stop_requested()`` turns true, or the
    loss stops being finite, :class:`TrainingStopped` is raised carrying the state of the last completed
    optimiser step. ``dist``: this process's place in a torchrun job. Time spent validating or
    checkpointing is kept out of the training time (and so out of examples/s).
    """

    def __init__(self, model, train: Encoded, val: Encoded, cfg: TrainConfig, *, pad_id: int, labels: list[str],
                 compute: Compute = Compute(), state: TrainState | None = None, hooks: Hooks = Hooks(),
                 progress: bool = True, dist: Distributed = LOCAL):
        device = compute.device
        self.model, self.train_data, self.val, self.cfg = model.to(device).train(), train, val, cfg
        self.pad_id, self.labels, self.compute, self.device, self.dist = pad_id, labels, compute, device, dist
        self.forward_module = dist.wrap(self.model, device)  # DDP under torchrun, else the model itself
        self.optimizer = make_optimizer(model, cfg, device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.state = state or TrainState()
        if self.state.optimizer is not None:
            self.optimizer.load_state_dict(self.state.optimizer)
        self.history = self.state.history
        self.weight = class_weight_tensor(train.labels, len(labels)).to(device) if cfg.class_weights == "auto" else None
        self.lengths = lengths_of(train)
        n_batches = -(-len(train.ids) // cfg.batch_size)
        self.per_step = cfg.grad_accum * dist.world  # batches of one optimiser step, all ranks together
        self.total_steps = cfg.epochs * -(-n_batches // self.per_step)
        self.hooks, self.progress = hooks, progress
        self.base_seconds, self.start, self.aside_seconds = self.history.train_seconds, time.perf_counter(), 0.0

    def training_seconds(self) -> float:
        return self.base_seconds + time.perf_counter() - self.start - self.aside_seconds

    def validate(self, part: Encoded) -> dict:
        """Metrics on (part of) the validation set, timed apart from training."""
        t0 = time.perf_counter()
        probs = self.dist.predict(self.model, part, self.pad_id, batch_size=self.cfg.batch_size, compute=self.compute)
        metrics = metrics_for(part.labels, probs, self.labels)
        self.aside_seconds += time.perf_counter() - t0
        return metrics

    def snapshot(self) -> TrainState:
        """The state right now; only ever taken at an optimiser-step boundary."""
        s = self.state
        self.history.train_seconds = self.training_seconds()
        return TrainState(s.epoch, s.batch, s.step, s.best_accuracy, self.history, self.optimizer.state_dict(),
                          rng_state(self.device))

    def run(self) -> History:
        with self.own_generator():
            try:
                with peer_failures_as_lost():
                    while self.state.epoch < self.cfg.epochs:
                        self.epoch(self.state.epoch)
            except PeerLost as e:
                set_rng_state(self.boundary_rng, self.device)  # parameters are those of the last whole step
                raise TrainingStopped("{}", str(e), state=self.snapshot()) from e
        self.history.train_seconds = self.training_seconds()
        return self.history

    @contextlib.contextmanager
    def own_generator(self) -> Iterator[None]:
        """Dropout draws from the device's global generator: training forks it (the caller's is restored
        afterwards) and starts it from the seed, or from the checkpoint's state on resume."""
        with torch.random.fork_rng(devices=[self.device.index or 0] if self.device.type == "cuda" else []):
            if self.state.rng is None:
                torch.manual_seed(self.cfg.seed)
            else:
                set_rng_state(self.state.rng, self.device)
            self.boundary_rng = rng_state(self.device)  # the RNG at the start of the optimiser step in progress
            yield

    def epoch(self, epoch: int) -> None:
        cfg, state = self.cfg, self.state
        order = train_order(self.lengths, cfg.batch_size, np.random.default_rng([cfg.seed, epoch]), cfg.bucket)
        self.optimizer.zero_grad(set_to_none=True)
        with tqdm(total=len(order), initial=state.batch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                  disable=not self.progress, unit="batch") as bar:
            for start in range(state.batch, len(order), self.per_step):
                end = min(start + self.per_step, len(order))
                self.boundary_rng = rng_state(self.device)
                self.dist.seed_step(cfg.seed, state.step)
                record = self.step(self.accumulate(order[start:end], epoch), epoch + end / len(order), end)
                bar.update(end - start)
                bar.set_postfix(loss=f"{record['loss']:.4f}",
                                ex_s=f"{self.history.train_examples / self.training_seconds():.1f}")
                if end < len(order):  # the last step's boundary comes after end_epoch
                    self.boundary(epoch_end=False)
        self.end_epoch(epoch)
        self.boundary(epoch_end=True)

    def boundary(self, epoch_end: bool) -> None:
        """A resumable point: stop here if asked (before the last epoch's end), else run the on_step hook."""
        state = self.state
        if self.dist.any(self.hooks.stop_requested()) and state.epoch < self.cfg.epochs:  # every rank at once
            where = f"after epoch {state.epoch}" if epoch_end else f"at step {state.step} (epoch {state.epoch + 1})"
            raise TrainingStopped("interrupted {}", where, state=self.snapshot(), exit_code=130)
        t0 = time.perf_counter()
        self.hooks.on_step(self, epoch_end)
        self.aside_seconds += time.perf_counter() - t0

    def accumulate(self, step_batches: list[np.ndarray], epoch: int) -> "Accumulated":
        """This process's share of one optimiser step's batches; losses and counts summed over all ranks."""
        accum, mine = Accumulated(), self.dist.my_batches(step_batches)
        for k, index in enumerate(mine):
            with self.dist.sync(last=k == len(mine) - 1):
                self.forward_backward(collate(self.train_data, index, self.pad_id), accum)
        if not mine:  # the epoch's last step has fewer batches than ranks: join the gradient sync with zero weight
            self.forward_backward(collate(self.train_data, step_batches[0][:1], self.pad_id), Accumulated(), 0.0)
        accum.loss, accum.n, accum.tokens = self.dist.sum([accum.loss, accum.n, accum.tokens])
        if not math.isfinite(accum.loss):
            set_rng_state(self.boundary_rng, self.device)
            raise TrainingStopped("training diverged: loss is {} at step {} (epoch {}); lower {lr} or use "
                                  "{precision} fp32", accum.loss / max(accum.n, 1), self.state.step + 1, epoch + 1,
                                  state=self.snapshot())
        return accum

    def forward_backward(self, batch: Batch, accum: "Accumulated", weight: float = 1.0) -> None:
        """One batch's loss and gradients, added to those of the optimiser step in progress.

        Each batch's mean loss counts 1/grad_accum (DDP then averages over the ranks), as in a one-process
        run with grad_accum x world batches per step.
        """
        batch = batch.to(self.device)
        with self.compute.autocast():
            logits = batch.pooled(self.forward_module(batch.input_ids, batch.attention_mask))  # (B, C)
        loss = classification_loss(logits, batch.labels, self.weight)
        (loss * (weight / self.cfg.grad_accum)).backward()
        accum.add(loss.item(), len(batch.index), batch.n_tokens)

    def step(self, accum: "Accumulated", epoch_position: float, batches_done: int) -> dict:
        """The optimiser step over the accumulated gradients; logs it, and a validation slice when due."""
        cfg, state, history = self.cfg, self.state, self.history
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(state.step, self.total_steps, cfg) * group.get("lr_scale", 1.0)
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.step, state.batch = state.step + 1, batches_done
        history.train_examples += int(accum.n)
        history.train_tokens += int(accum.tokens)
        record = {"event": "train", "step": state.step, "epoch": epoch_position,
                  "examples_seen": history.train_examples, "loss": accum.loss / accum.n,
                  "lr": self.optimizer.param_groups[0]["lr"]}
        history.train.append(record)
        self.hooks.log(record)
        if cfg.eval_every and state.step % cfg.eval_every == 0 and len(self.val.ids):
            n = min(len(self.val.ids), cfg.eval_batches * cfg.batch_size)
            m = self.validate(self.val.subset(n))
            evaluation = {"event": "eval", "step": state.step, "epoch": epoch_position,
                          "examples_seen": history.train_examples, "val_loss": m["loss"],
                          "val_accuracy": m["accuracy"], "val_examples": n}
            history.val.append(evaluation)
            self.hooks.log(evaluation)
        return record

    def end_epoch(self, epoch: int) -> None:
        """Full validation; keep the adapter if it is the best so far."""
        state, history = self.state, self.history
        history.train_seconds = self.training_seconds()
        m = self.validate(self.val) if len(self.val.ids) else None
        record = {"event": "epoch", "epoch": epoch + 1, "step": state.step, "examples_seen": history.train_examples,
                  "val_loss": m["loss"] if m else None, "val_accuracy": m["accuracy"] if m else None,
                  "seconds": history.train_seconds}
        history.epochs.append(record)
        self.hooks.log(record)
        acc = m["accuracy"] if m else float(epoch)  # without validation data: keep the last epoch
        if acc > state.best_accuracy:
            state.best_accuracy, history.best = acc, record
            self.hooks.on_best(record)
        state.epoch, state.batch = epoch + 1, 0


@dataclass
class Accumulated:
    """Loss, examples and tokens of the batches in the optimiser step being accumulated."""

    loss: float = 0.0  # summed over examples
    n: int = 0
    tokens: int = 0

    def add(self, mean_loss: float, n: int, tokens: int) -> None:
        self.loss += mean_loss * n
        self.n += n
        self.tokens += tokens


def fit(model, train: Encoded, val: Encoded, cfg: TrainConfig, **options) -> History:
    """Train the trainable parameters of ``model`` on ``train``, validating on ``val``; ``options`` are
    :class:`Trainer`'s (``pad_id`` and ``labels`` required; ``compute``, ``state``, ``hooks``, ``progress``,
    ``dist``)."""
    return_freed_buffers_to_the_os()
    return Trainer(model, train, val, cfg, **options).run()
