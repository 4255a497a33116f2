"""Training under ``torchrun``: the process group, who does which batches, and what is synchronised.

Same math as one process: the single-process batch order (batches of ``--batch-size``) is cut into
optimiser steps of ``grad_accum x world`` batches, and rank r takes batches r, r + world, ... of each
step. Every micro-batch's mean loss is divided by ``grad_accum`` and DDP averages over the ranks, so the
synchronised gradient is that of a one-process run with ``--grad-accum grad_accum x world``. Only the
trainable parameters (LoRA and head) are synchronised; the frozen base never travels. Evaluation is
sharded by the same length-sorted batches one process would use and gathered, so metrics do not depend
on the world size. Rank 0 alone writes files.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel as DDP

from ..data.batching import Encoded, eval_order, lengths_of
from ..errors import FieldError, LorafitError, SettingError
from ..inference.predict import predict_proba
from ..runtime import Compute

BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True)
class Launch:
    """How to join a torchrun job (ignored by a plain one-process run)."""

    backend: str = "auto"  # gloo on cpu, nccl on cuda
    timeout_s: float = 300.0  # a collective that waits longer than this means a rank is dead or hung


class PeerLost(LorafitError):
    """Another rank died or stopped answering: this one cannot go on, but its last step is whole."""


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "RANK" in os.environ


def restart_count() -> int:
    """How many times torchrun has restarted this group (``--max-restarts``); 0 on the first attempt."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


@dataclass
class Distributed:
    """This process's place in the job; the defaults are one process, where every method is a no-op."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    backend: str | None = None  # None: no process group
    ddp: torch.nn.Module | None = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.backend is not None

    def describe(self) -> dict | None:
        """What report.json records about the launch (None for a plain one-process run)."""
        if not self.active:
            return None
        return {"world_size": self.world, "backend": self.backend}

    # -- training --------------------------------------------------------------------------------------
    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The module to call in training: DDP over the trainable parameters only, or ``model`` itself."""
        if not self.active:
            return model
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        frozen += [n for n, _ in model.named_buffers()]
        DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)  # built identically on every rank: never sent
        self.ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        return self.ddp

    def my_batches(self, step_batches: list[np.ndarray]) -> list[np.ndarray]:
        """This rank's share of one optimiser step's batches (round robin, so the last step stays even)."""
        return step_batches[self.rank::self.world]

    def sync(self, last: bool):
        """DDP reduces gradients in the backward of a rank's last micro-batch of the step, not before."""
        if self.ddp is None or last:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def seed_step(self, seed: int, step: int) -> None:
        """Dropout draws per rank from a generator seeded by (seed, rank, step): distinct, repeatable, resumable."""
        if self.active and self.world > 1:
            torch.manual_seed(int(np.random.SeedSequence([seed, self.rank, step]).generate_state(1)[0]))

    # -- agreement -------------------------------------------------------------------------------------
    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the ranks (float64)."""
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        self._collective(tdist.all_reduce, t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any: all ranks stop at the same step."""
        return bool(self.sum([float(flag)])[0]) if self.active else flag

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        self._collective(tdist.broadcast_object_list, box, src=0)
        return box[0]

    def broadcast_tensors(self, tensors) -> None:
        """Rank 0's values copied into ``tensors`` in place on every rank."""
        if self.active:
            with torch.no_grad():
                for t in tensors:
                    self._collective(tdist.broadcast, t.data, src=0)

    def main_first(self, f: Callable):
        """``f()`` on rank 0, then on the others: a download or cache fill happens once, not N times at once."""
        if self.is_main:
            result = f()
        self.barrier()
        return result if self.is_main else f()

    def barrier(self) -> None:
        if self.active:
            self.sum([0.0])  # an all-reduce, so that the collective timeout applies (gloo's barrier has its own)

    # -- evaluation ------------------------------------------------------------------------------------
    def predict(self, model, data: Encoded, pad_id: int, *, batch_size: int, compute: Compute) -> np.ndarray:
        """:func:`predict_proba` over this rank's share of the evaluation batches, gathered on every rank.

        The batches are the ones a single process forms, so every example is computed in the same
        company (the same padding) as in a one-process run, and none is counted twice.
        """
        if not self.active:
            return predict_proba(model, data, pad_id, batch_size=batch_size, compute=compute)
        mine = eval_order(lengths_of(data), batch_size)[self.rank::self.world]
        probs = predict_proba(model, data, pad_id, batch_size=batch_size, compute=compute, order=mine)
        index = np.concatenate(mine) if mine else np.zeros(0, dtype=np.int64)
        parts = [None] * self.world
        self._collective(tdist.all_gather_object, parts, (index, probs[index]))
        for idx, p in parts:
            probs[idx] = p
        return probs

    # -- plumbing --------------------------------------------------------------------------------------
    def _comm_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def _collective(self, op, *args, **kwargs):
        with peer_failures_as_lost():
            return op(*args, **kwargs)


LOCAL = Distributed()


def regroup(grad_accum: int, saved_world: int, world: int, run) -> int:
    """The per-rank ``grad_accum`` that keeps the global batch (so the math) of the resumed ``run`` unchanged."""
    per_step = grad_accum * saved_world
    if per_step % world:
        raise FieldError("{resume} {}: its optimiser step takes {} batches ({} process(es) x {grad_accum} {}), which "
                         "{} processes cannot share evenly; resume with a number of processes that divides {}",
                         run, per_step, saved_world, grad_accum, world, per_step)
    return per_step // world


@contextlib.contextmanager
def peer_failures_as_lost() -> Iterator[None]:
    """A RuntimeError that means another rank died or hung (from a collective, or DDP's backward) becomes
    :class:`PeerLost`, with one line; any other error passes through as it is."""
    try:
        yield
    except RuntimeError as e:
        if not is_peer_failure(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PeerLost(f"another process of this torchrun job stopped or stopped answering ({first[:200]})") from e


def is_peer_failure(e: BaseException) -> bool:
    """A collective that failed because of another rank (DDP's backward raises it as a RuntimeError)."""
    return isinstance(e, tdist.DistError) or (isinstance(e, RuntimeError) and any(
        s in str(e) for s in ("Connection closed by peer", "Connection reset by peer", "Timed out", "gloo", "NCCL")))


def choose_backend(requested: str, device: torch.device) -> str:
    if requested not in BACKENDS:
        raise SettingError("{backend} must be one of {}, got {!r}", ", ".join(BACKENDS), requested)
    if device.type not in ("cpu", "cuda"):
        raise FieldError("{device} {}: torchrun training runs on cpu or cuda, not {}", device, device.type)
    if requested == "nccl" and device.type != "cuda":
        raise FieldError("{backend} nccl needs CUDA devices; this process trains on the cpu (use gloo)")
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    return requested


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise LorafitError(f"environment variable {name}={value!r}: expected an integer (launch with torchrun)") from None


def device_for_rank(device: torch.device, local_rank: int) -> torch.device:
    """Each process trains on cuda:LOCAL_RANK; an explicit cuda:N makes no sense when there are several."""
    if device.type != "cuda":
        return device
    if local_rank >= torch.cuda.device_count():
        raise LorafitError(f"LOCAL_RANK {local_rank}, but this machine has {torch.cuda.device_count()} CUDA "
                           "device(s): start at most that many processes per node")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def attempt_store(rank: int, world: int, timeout_s: float) -> tdist.Store:
    """torchrun's key-value store, under a prefix of its own for each restart.

    With c10d rendezvous the agents' store outlives a restart (``--max-restarts``), and the env://
    default adds no per-attempt prefix: a restarted group could read the dead group's addresses and
    fail to connect ("Connection refused"). A prefix per ``TORCHELASTIC_RESTART_COUNT`` keeps them apart.
    """
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = tdist.TCPStore(os.environ["MASTER_ADDR"], _env_int("MASTER_PORT"), world,
                           is_master=not agent_store and rank == 0, timeout=datetime.timedelta(seconds=timeout_s),
                           multi_tenant=not agent_store)
    return tdist.PrefixStore(f"lorafit/attempt_{restart_count()}", store)


@contextlib.contextmanager
def session(device: torch.device, launch: Launch, plan: str) -> Iterator[tuple[Distributed, torch.device]]:
    """Join torchrun's process group for the duration of a run; a plain process gets a one-process one.

    CPU processes share the cores: each takes ``cores // processes on this node`` threads. ``plan`` (what
    this rank is about to do: start a run, resume one) must be the same on every rank.
    """
    if not launched_by_torchrun():
        yield Distributed(), device
        return
    if launch.timeout_s <= 0:
        raise SettingError("{timeout_s} must be > 0 seconds, got {:g}", launch.timeout_s)
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise LorafitError(f"RANK is set but {name} is not: launch with torchrun, not by hand")
    chosen = choose_backend(launch.backend, device)
    device = device_for_rank(device, local_rank)
    if device.type == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // local_world))
    try:
        tdist.init_process_group(chosen, store=attempt_store(rank, world, launch.timeout_s), rank=rank,
                                 world_size=world, timeout=datetime.timedelta(seconds=launch.timeout_s),
                                 device_id=device if chosen == "nccl" else None)
    except (RuntimeError, ValueError) as e:
        raise LorafitError(f"cannot join the torchrun process group ({chosen}): {str(e).splitlines()[0]}") from e
    d = Distributed(rank, world, local_rank, local_world, chosen)
    try:
        plans = [None] * world
        d._collective(tdist.all_gather_object, plans, plan)
        if len(set(plans)) > 1:
            raise LorafitError(f"the processes disagree on what to do ({' / '.join(sorted(set(plans)))}): "
                               "the run directory must be on a file system that every machine of the job sees")
        # collectives outside the training loop (DDP's set-up, evaluation) fail the same way
        with warnings.catch_warnings(), peer_failures_as_lost():
            if not d.is_main:
                warnings.simplefilter("ignore")  # rank 0 says it once
            yield d, device
    finally:
        tdist.destroy_process_group()
