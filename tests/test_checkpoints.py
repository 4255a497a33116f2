"""Periodic checkpoints: a SIGKILL at any moment (even mid-write), a full disk or a read-only folder during
training, then --resume ends with the same adapter bytes and metrics.jsonl as a run never stopped."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorafit.cli import main
from lorafit.training.checkpoint import CHECKPOINT, load_checkpoint

from conftest import train_args
from test_errors import error_line, no_temp_files, run_cli

# 3 epochs of 7 optimiser steps; dropout makes the RNG state part of what must resume exactly
EXTRA = ("--epochs", "3", "--lora-dropout", "0.1", "--grad-accum", "2")
STEPS = 21

CHILD = """
import os, signal, sys, time
import lorafit.files, lorafit.reporting.loggers as loggers
from lorafit.cli import main
%s
sys.exit(main(sys.argv[1:]))
"""
SLOW_STEPS = """
log = loggers.JsonlLogger.log
def slow_log(self, record):  # a tiny model trains too fast for a kill to land at a chosen step
    time.sleep(0.03)
    log(self, record)
loggers.JsonlLogger.log = slow_log
"""
DIE_MID_WRITE = """
real, saves = lorafit.files.save_file, []
def save_then_die_halfway(tensors, path, metadata=None):
    real(tensors, path, metadata=metadata)
    if ".checkpoint.safetensors." in path:
        saves.append(path)
        if len(saves) == 4:  # steps 4, 7 (epoch end), 8, then 12: half written, killed before the rename
            data = open(path, "rb").read()
            open(path, "wb").write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
lorafit.files.save_file = save_then_die_halfway
"""


def same_run(reference: Path, out: Path) -> None:
    """Bit-identical adapter, and metrics.jsonl line for line (each step once), but for wall-clock times."""
    assert (reference / "adapter.safetensors").read_bytes() == (out / "adapter.safetensors").read_bytes()

    def lines(d: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(ln).items() if k != "seconds"}
                for ln in (d / "metrics.jsonl").read_text().splitlines()]

    assert lines(reference) == lines(out)
    assert not (out / CHECKPOINT).exists() and no_temp_files(out)


def train_steps_logged(path: Path) -> int:
    return path.read_text().count('"event": "train"') if path.exists() else 0


def start(argv: list[str], patch: str):
    return subprocess.Popen([sys.executable, "-c", CHILD % patch, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_sigkill_at_any_moment_then_resume_equals_an_uninterrupted_run(tmp_path, sms_file, hf_gpt2_dir):
    reference = tmp_path / "reference"
    assert main(train_args(hf_gpt2_dir, sms_file, reference, *EXTRA)) == 0

    # killed while a checkpoint is half written: the previous checkpoint is whole
    out = tmp_path / "killed-mid-write"
    proc = start(train_args(hf_gpt2_dir, sms_file, out, *EXTRA, "--save-every", "4"), DIE_MID_WRITE)
    proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL
    assert not no_temp_files(out)  # the half-written temporary file is still there...
    assert load_checkpoint(out).state.step == 8  # ...and the checkpoint is the one before, whole
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    same_run(reference, out)

    for seed in range(2):  # killed from outside at a random step, at a random moment in it
        rng = random.Random(seed)
        every = rng.choice([2, 3])  # kills land between checkpoints too: those steps are replayed
        kill_at = rng.randint(every + 1, STEPS - 3)  # after the first checkpoint is whole
        out = tmp_path / f"killed-{seed}"
        proc = start(train_args(hf_gpt2_dir, sms_file, out, *EXTRA, "--save-every", str(every)), SLOW_STEPS)
        deadline = time.time() + 600
        while train_steps_logged(out / "metrics.jsonl") < kill_at and proc.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.03))  # mid-step, mid-evaluation or mid-checkpoint
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.kill()  # SIGKILL: nothing in the process runs after it
        proc.communicate(timeout=600)
        assert load_checkpoint(out).state.step >= every
        assert main(["train", "--resume", str(out), "--quiet"]) == 0
        same_run(reference, out)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs where mounting is allowed (root, not in a restricted container); else None."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode:
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def fill(disk: Path) -> None:
    """Write a file until the file system has no room left."""
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError as e:
            assert e.errno == errno.ENOSPC


def test_a_full_disk_or_read_only_folder_stops_with_one_line_and_keeps_the_last_checkpoint(
        tmp_path, capsys, monkeypatch, sms_file, hf_gpt2_dir, small_disk):
    import lorafit.training.run as run

    reference = tmp_path / "reference"
    assert main(train_args(hf_gpt2_dir, sms_file, reference, *EXTRA)) == 0
    real_save = run.save_checkpoint
    for fault in (errno.ENOSPC, errno.EROFS):
        real_disk = fault == errno.ENOSPC and small_disk is not None  # else the write is patched to fail
        out = (small_disk if real_disk else tmp_path) / f"run-{fault}"
        saves = []
        with monkeypatch.context() as patched:
            def save_then_fault(*args):
                real_save(*args)
                saves.append(args)
                if len(saves) == 4:  # steps 3, 6, 7 (epoch end), 9; from then on no write succeeds
                    if real_disk:
                        fill(small_disk)
                    else:
                        def refuse(src, dst):
                            raise OSError(fault, os.strerror(fault), str(src))
                        patched.setattr(os, "replace", refuse)

            patched.setattr(run, "save_checkpoint", save_then_fault)
            code, err = run_cli(capsys, *train_args(hf_gpt2_dir, sms_file, out, *EXTRA, "--save-every", "3"))
        line = error_line(err)
        assert code == 1 and f"cannot write {out}" in line and os.strerror(fault) in line, line
        assert (f"the last checkpoint (step 9) {out / CHECKPOINT} and the best adapter so far "
                f"{out / 'adapter.safetensors'} are intact; make room, then: lorafit train --resume {out}") in line
        assert no_temp_files(out) and not (out / "report.json").exists()
        if real_disk:
            (small_disk / "filler").unlink()
        assert main(["train", "--resume", str(out), "--quiet"]) == 0  # the checkpoint was whole
        same_run(reference, out)


def test_checkpoints_are_due_every_n_steps_every_m_minutes_and_at_each_epoch_end(tmp_path, capsys, monkeypatch,
                                                                                sms_file, hf_gpt2_dir):
    from types import SimpleNamespace

    import lorafit.training.checkpoint as checkpoint

    code, err = run_cli(capsys, *train_args(hf_gpt2_dir, sms_file, tmp_path / "bad", "--save-every", "-1"))
    assert code == 2 and "--save-every and --save-every-minutes must be >= 0" in error_line(err)

    now = [0.0]
    monkeypatch.setattr(checkpoint.time, "monotonic", lambda: now[0])

    def saved_steps(every_steps: int, every_minutes: float) -> list[int]:
        saved = []
        policy = checkpoint.PeriodicCheckpoints(lambda state: saved.append(state.step), every_steps, every_minutes)
        for step in range(1, 13):
            now[0] += 50.0  # seconds per step
            trainer = SimpleNamespace(state=SimpleNamespace(step=step), snapshot=lambda s=step: SimpleNamespace(step=s))
            policy(trainer, epoch_end=step % 6 == 0)
        assert policy.saved_step == (saved[-1] if saved else None)
        return saved

    assert saved_steps(0, 0) == [6, 12]  # both periods off: epoch ends only
    assert saved_steps(4, 0) == [4, 6, 8, 12]
    assert saved_steps(0, 2) == [3, 6, 9, 12]  # 150 s since the last save at steps 3 and 9
    assert saved_steps(5, 10) == [5, 6, 10, 12]  # the 10-minute default never comes in 600 s
