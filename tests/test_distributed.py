"""torchrun on loopback with gloo, 2 CPU processes of the tiny GPT-2 and the tiny Llama: the same adapter as
one process with --grad-accum 2, rank 0 the only writer, interrupt and resume, elastic restart after a
killed worker, and a hung rank ends the job with one line instead of hanging."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import save_tiny, write_hf_gpt2, write_sms_like
from lorafit import cli
from lorafit.cli import main
from lorafit.errors import LorafitError
from lorafit.training.checkpoint import CHECKPOINT, load_checkpoint
from lorafit.training.distributed import regroup

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this torch build")

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
ARGS = ("--epochs", "3", "--batch-size", "5", "--lr", "3e-3", "--eval-every", "4", "--quiet", "--precision", "fp32")
RUN_FILES = {"adapter.safetensors", "adapter.json", "metrics.jsonl", "report.json", "report.md", "loss.png",
             "accuracy.png", "confusion_matrix.png", "train.csv", "val.csv", "test.csv"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, nproc: int = 2, restarts: int = 0, cwd: Path | None = None) -> subprocess.Popen:
    """``torchrun --nproc-per-node N -m lorafit ...`` on 127.0.0.1, with torchrun's c10d rendezvous."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
                             "--local-addr", "127.0.0.1", "--max-restarts", str(restarts), "--monitor-interval", "0.1",
                             "-m", "lorafit", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=cwd)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err


def workers(proc: subprocess.Popen) -> dict[int, int]:
    """RANK -> pid of the lorafit processes torchrun started."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != proc.pid:
                continue
            env = dict(kv.split("=", 1) for kv in (entry / "environ").read_text().split("\0") if "=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(entry.name)
    return found


def wait_for_steps(run: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        metrics = run / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().count('"train"') >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"training never logged {n} steps: {finish(proc, 10)}")


def adapter(run: Path) -> dict:
    return load_file(run / "adapter.safetensors")


def assert_close(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= tol, worst


def report(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The tiny GPT-2 and the data, shared by this module's runs (written once)."""
    d = tmp_path_factory.mktemp("dist")
    write_hf_gpt2(d / "gpt2")
    return {"dir": d, "gpt2": d / "gpt2", "data": write_sms_like(d / "sms.tsv")}


def train_args(files, out, *extra) -> list:
    return ["train", "--model", files["gpt2"], "--data", files["data"], "--out", out, *ARGS, *extra]


@pytest.fixture(scope="module")
def reference(files) -> Path:
    """An uninterrupted 2-process run (10 epochs: long enough to be interrupted in the middle)."""
    out = files["dir"] / "reference-2proc"
    code, _, err = finish(torchrun(*train_args(files, out, "--epochs", "10")))
    assert code == 0, err
    return out


def test_two_processes_equal_one_process_with_grad_accum_2_and_only_rank_0_writes(files, tmp_path):
    """Batch 5 of 112 texts: 23 batches, so the last step of each epoch has one batch for two ranks."""
    one = tmp_path / "one"
    assert main([str(a) for a in train_args(files, one, "--grad-accum", "2")]) == 0
    # rank 1 runs in a directory of its own with the same relative --out: anything it wrote would land there
    (tmp_path / "rank0").mkdir()
    (tmp_path / "rank1").mkdir()
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "lorafit", *map(str, train_args(files, "run"))],
                              cwd=tmp_path / f"rank{r}", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in (0, 1)]
    (code0, out0, err0), (code1, out1, err1) = (finish(p) for p in procs)
    assert code0 == 0 and code1 == 0, err0 + err1
    assert "accuracy: train" in out0 and out1 == "" and err1 == ""  # rank 1 prints nothing
    assert list((tmp_path / "rank1").iterdir()) == []
    two = tmp_path / "rank0" / "run"
    assert RUN_FILES <= {p.name for p in two.iterdir()}
    assert_close(adapter(one), adapter(two), 1e-5)
    r1, r2 = report(one), report(two)
    assert r2["distributed"] == {"world_size": 2, "backend": "gloo", "per_rank_batch": 5, "global_batch": 10}
    assert "distributed" not in r1 and "torchrun: 2 processes (gloo)" in (two / "report.md").read_text()
    for split, m in r1["metrics"].items():
        assert m["accuracy"] == r2["metrics"][split]["accuracy"], split
        assert m["confusion_matrix"] == r2["metrics"][split]["confusion_matrix"], split
        assert m["loss"] == pytest.approx(r2["metrics"][split]["loss"], abs=1e-6), split
    lines = [[json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two)]
    assert [(r["event"], r["step"]) for r in lines[0]] == [(r["event"], r["step"]) for r in lines[1]]
    assert [r["examples_seen"] for r in lines[0]] == [r["examples_seen"] for r in lines[1]]


def test_tiny_llama_under_torchrun_equals_one_process(tmp_path, sms_file):
    model = f"hf:{save_tiny(tmp_path / 'llama', bert=False)}"
    args = ["train", "--model", model, "--data", sms_file, "--epochs", "2", "--batch-size", "6", "--lr", "3e-3",
            "--quiet", "--precision", "fp32", "--rank", "4"]
    assert main([str(a) for a in args] + ["--out", str(tmp_path / "one"), "--grad-accum", "2"]) == 0
    code, out, err = finish(torchrun(*args, "--out", tmp_path / "two"))
    assert code == 0, err
    assert out.count("accuracy: train") == 1  # printed by rank 0 only
    assert_close(adapter(tmp_path / "one"), adapter(tmp_path / "two"), 1e-5)
    m1, m2 = report(tmp_path / "one")["metrics"]["test"], report(tmp_path / "two")["metrics"]["test"]
    assert m1["confusion_matrix"] == m2["confusion_matrix"] and m1["loss"] == pytest.approx(m2["loss"], abs=1e-6)


def test_interrupted_torchrun_resumes_to_the_uninterrupted_adapter(files, reference, tmp_path):
    """SIGINT to torchrun: rank 0 saves the step all ranks stopped at; --resume under torchrun, or in one
    process, ends on the uninterrupted adapter; another command in that --out is refused."""
    out = tmp_path / "run"
    proc = torchrun(*train_args(files, out, "--epochs", "10"))
    wait_for_steps(out, 5, proc)
    proc.send_signal(signal.SIGINT)  # torchrun passes it on to every worker
    code, _, err = finish(proc)
    assert code != 0 and "resume with: lorafit train --resume" in err, err
    assert load_checkpoint(out).plan.world_size == 2 and not (out / "report.json").exists()
    one_process = tmp_path / "copy"
    shutil.copytree(out, one_process)
    code, _, err = finish(torchrun(*train_args(files, out, "--epochs", "4")))  # not the command that was stopped
    assert code != 0 and f"lorafit: error: --out {out}: holds a checkpoint of another command" in err, err

    code, _, err = finish(torchrun("train", "--resume", out))
    assert code == 0, err
    assert_close(adapter(reference), adapter(out), 0.0)  # bit-identical
    assert report(reference)["metrics"] == report(out)["metrics"]
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in ln]
    assert steps == list(range(1, len(steps) + 1))

    # one process takes the step's two batches itself (grad-accum 2): same global batch, same math
    assert main(["train", "--resume", str(one_process), "--quiet"]) == 0
    assert_close(adapter(reference), adapter(one_process), 1e-5)
    assert report(one_process)["train"]["grad_accum"] == 2


def test_another_world_size_resumes_only_when_it_divides_the_step():
    assert regroup(1, 2, 1, "r") == 2 and regroup(2, 2, 4, "r") == 1
    with pytest.raises(LorafitError, match="resume r: its optimiser step takes 2 batches .* which 3 processes "
                                           "cannot share evenly"):
        regroup(1, 2, 3, "r")


def test_elastic_restart_after_a_killed_worker_ends_on_the_uninterrupted_adapter(files, reference, tmp_path):
    """--max-restarts 1: rank 1 is killed with SIGKILL; rank 0 keeps the last whole step, torchrun restarts
    both, and --resume auto (the default under torchrun) carries on from that checkpoint."""
    out = tmp_path / "run"
    proc = torchrun(*train_args(files, out, "--epochs", "10"), restarts=1)
    wait_for_steps(out, 5, proc)
    os.kill(workers(proc)[1], signal.SIGKILL)
    code, stdout, err = finish(proc)
    assert code == 0, err
    assert "another process of this torchrun job stopped" in err and stdout.count("accuracy: train") == 1
    assert report(out)["resumed"] is True
    assert_close(adapter(reference), adapter(out), 0.0)
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in ln]
    assert steps == list(range(1, len(steps) + 1))


def test_a_hung_rank_ends_the_job_with_one_line_within_the_timeout(files, tmp_path):
    out = tmp_path / "run"
    proc = torchrun(*train_args(files, out, "--epochs", "10", "--dist-timeout", "15"))
    wait_for_steps(out, 3, proc)
    ranks = workers(proc)
    os.kill(ranks[1], signal.SIGSTOP)  # alive but silent: only the collective timeout can tell
    try:
        deadline = time.time() + 60
        while time.time() < deadline and Path(f"/proc/{ranks[0]}").exists() and \
                "zombie" not in Path(f"/proc/{ranks[0]}/status").read_text():
            time.sleep(0.1)
    finally:
        os.kill(ranks[1], signal.SIGKILL)
    code, _, err = finish(proc)
    assert code != 0
    lines = [ln for ln in err.splitlines() if ln.startswith("lorafit: error:")]
    assert len(lines) == 1 and "stopped answering" in lines[0] and "last good state saved in" in lines[0], err
    assert (out / CHECKPOINT).exists()


def test_nccl_without_cuda_is_one_line(files, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    code = main([str(a) for a in train_args(files, tmp_path / "r", "--dist-backend", "nccl", "--device", "cpu")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "--dist-backend nccl needs CUDA" in err


class Exited(Exception):
    """What the patched ``os._exit`` raises, so the test sees the status instead of losing its process."""


@pytest.mark.parametrize("argv, status", [(["predict", "--run", "missing", "hi"], 1),  # lorafit's one-line error
                                          (["predict", "--no-such-flag"], 2)])  # argparse's usage error
def test_a_torchrun_worker_ends_with_os_exit_and_keeps_its_status(argv, status, tmp_path, monkeypatch, capsys):
    """DDP keeps gloo's worker threads past destroy_process_group, and one that frees its last collective during
    interpreter shutdown aborts the process (SIGABRT after a complete run): a torchrun worker skips that shutdown."""
    def fake_exit(code):
        raise Exited(code)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    monkeypatch.setattr(sys, "argv", ["lorafit", *argv])
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    with pytest.raises(Exited) as worker:
        cli.entry()
    assert worker.value.args == (status,)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as plain:  # a plain process exits the normal way
        cli.entry()
    assert plain.value.code == status
    assert capsys.readouterr().err.count("error:") == 2
