"""Bad input and faults through the CLI entry point: exit code, a one-line message, no traceback, no partial file;
and interrupt-and-resume equivalence."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorafit.cli import main

from conftest import train_args


def run_cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse and usage errors exit through parser.exit
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    return lines[0]


def no_temp_files(directory: Path) -> bool:
    return not directory.exists() or not any(p.name.endswith(".tmp") for p in directory.rglob("*"))


@pytest.fixture
def base(hf_gpt2_dir):
    return ["--model", str(hf_gpt2_dir), "--quiet", "--precision", "fp32", "--epochs", "1"]


@pytest.mark.parametrize("content,expected", [
    (None, "data file not found"),
    (b"", "data file is empty"),
    (b"text,label\nfine,a\nalso fine,b\n\xe9t\xe9,a\n", r"not UTF-8 text \(bad byte at line 4; .*--encoding cp1252\)"),
    (b"hello,a\nworld,b\nagain,a\n", r"columns found \(comma-separated text; another separator: --sep\): hello, a"),
    (b"text,label\n" + b"".join(b"msg %d,only\n" % i for i in range(20)), r"only one class \('only'\)"),
])
def test_bad_data_files(tmp_path, capsys, base, content, expected):
    data = tmp_path / "data.csv"
    if content is not None:
        data.write_bytes(content)
    out = tmp_path / "run"
    code, err = run_cli(capsys, "train", *base, "--data", str(data), "--out", str(out))
    assert code == 1
    assert error_line(err).startswith("lorafit: error: ") and str(data) in err
    import re

    assert re.search(expected, err), err
    assert not (out / "adapter.json").exists() and no_temp_files(out)


def test_eval_labels_never_seen_in_training(tmp_path, capsys, base, sms_file):
    (tmp_path / "val.csv").write_text("text,label\nhi,ham\nwin,prize\n")
    code, err = run_cli(capsys, "train", *base, "--data", str(sms_file), "--val", str(tmp_path / "val.csv"),
                        "--test", str(tmp_path / "val.csv"), "--out", str(tmp_path / "run"))
    assert code == 1 and "'prize' were never seen in training (known: ham, spam)" in error_line(err)


def test_empty_texts_are_skipped_and_long_texts_truncated_with_a_warning(tmp_path, capsys, hf_gpt2_dir):
    rows = [f"{'spam' if i % 2 else 'ham'}\t{'win cash ' if i % 2 else 'lunch '}{i}" for i in range(60)]
    rows += ["ham\t   ", "spam\t" + "x" * 200]  # one blank text; one text longer than the 64-token context
    data = tmp_path / "SMSSpamCollection"
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    code, err = run_cli(capsys, "train", "--model", str(hf_gpt2_dir), "--quiet", "--precision", "fp32",
                        "--data", str(data), "--out", str(out), "--no-balance")
    assert code == 0
    assert "lorafit: warning:" in err and "longer than 64 tokens were truncated" in err
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["skipped_empty_texts"] == 1 and sum(report["data"]["truncated_texts"].values()) == 1


def test_usage_errors_exit_2(tmp_path, capsys, base, sms_file):
    for flags, expected in [(["--lr", "-1"], "--lr must be > 0"), (["--epochs", "0"], "--epochs must be >= 1"),
                            (["--rank", "0"], "--rank must be >= 1"), (["--val", str(sms_file)], "--val and --test go together")]:
        code, err = run_cli(capsys, "train", *base, "--data", str(sms_file), "--out", str(tmp_path / "r"), *flags)
        assert code == 2 and expected in error_line(err), (flags, err)
    code, err = run_cli(capsys, "train", "--no-such-flag")
    assert code == 2
    code, err = run_cli(capsys, "predict", "--run", str(tmp_path))
    assert code == 2 and "predict needs texts" in err


def test_model_folder_problems(tmp_path, capsys, sms_file, hf_gpt2_dir):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    code, err = run_cli(capsys, "train", "--model", str(empty), "--data", str(sms_file), "--out", str(tmp_path / "r"))
    assert code == 1 and "neither a Hugging Face folder" in error_line(err)
    half = tmp_path / "half-model"
    half.mkdir()
    (half / "config.json").write_text((hf_gpt2_dir / "config.json").read_text())
    code, err = run_cli(capsys, "train", "--model", str(half), "--data", str(sms_file), "--out", str(tmp_path / "r"))
    assert code == 1 and "no model.safetensors" in error_line(err)
    (half / "config.json").write_text("{not json")
    code, err = run_cli(capsys, "train", "--model", str(half), "--data", str(sms_file), "--out", str(tmp_path / "r"))
    assert code == 1 and "config.json: not valid JSON" in error_line(err)
    cfg = json.loads((hf_gpt2_dir / "config.json").read_text())
    cfg["n_embd"] = 64
    wrong = tmp_path / "wrong-shapes"
    wrong.mkdir()
    for f in hf_gpt2_dir.iterdir():
        (wrong / f.name).write_bytes(f.read_bytes())
    (wrong / "config.json").write_text(json.dumps(cfg))
    code, err = run_cli(capsys, "train", "--model", str(wrong), "--data", str(sms_file), "--out", str(tmp_path / "r"))
    assert code == 1 and "has shape" in error_line(err) and "the config expects" in err


def test_offline_download_says_what_to_fetch(tmp_path, capsys, sms_file):
    code, err = run_cli(capsys, "train", "--model", "gpt2-medium", "--data", str(sms_file), "--out", str(tmp_path / "r"))
    assert code == 1 and "huggingface.co/openai-community/gpt2-medium" in error_line(err)


def test_output_directory_problems(tmp_path, capsys, base, sms_file):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, err = run_cli(capsys, "train", *base, "--data", str(sms_file), "--out", str(blocker / "run"))
    assert code == 1 and "not writable" in error_line(err)
    out = tmp_path / "run"
    assert run_cli(capsys, "train", *base, "--data", str(sms_file), "--out", str(out))[0] == 0
    before = (out / "adapter.safetensors").read_bytes()
    code, err = run_cli(capsys, "train", *base, "--data", str(sms_file), "--out", str(out), "--seed", "1")
    assert code == 1 and "already holds a run" in error_line(err) and "--overwrite" in err
    assert (out / "adapter.safetensors").read_bytes() == before
    assert run_cli(capsys, "train", *base, "--data", str(sms_file), "--out", str(out), "--seed", "1", "--overwrite")[0] == 0


def test_adapter_problems_at_eval(tmp_path, capsys, base, sms_file, hf_gpt2_dir):
    from conftest import write_bpe

    out = tmp_path / "run"
    assert run_cli(capsys, "train", *base, "--data", str(sms_file), "--out", str(out))[0] == 0
    # an adapter pointed at another base model
    from transformers import GPT2Config, GPT2LMHeadModel

    other = tmp_path / "other-base"
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=64, n_embd=48, n_layer=2, n_head=4)).save_pretrained(other)
    write_bpe(other, names=("vocab.json", "merges.txt"))
    spec = json.loads((out / "adapter.json").read_text())
    spec["backbone"]["model"] = str(other)
    (out / "adapter.json").write_text(json.dumps(spec))
    code, err = run_cli(capsys, "eval", "--run", str(out))
    assert code == 1 and "another base model (emb_dim 32 vs 48)" in error_line(err)
    spec["backbone"]["model"] = str(hf_gpt2_dir)
    (out / "adapter.json").write_text(json.dumps(spec))
    assert run_cli(capsys, "eval", "--run", str(out))[0] == 0
    # a truncated adapter file
    data = (out / "adapter.safetensors").read_bytes()
    (out / "adapter.safetensors").write_bytes(data[:100])
    code, err = run_cli(capsys, "predict", "--run", str(out), "hello")
    assert code == 1 and "not a readable safetensors file" in error_line(err)
    code, err = run_cli(capsys, "eval", "--run", str(tmp_path / "nowhere"))
    assert code == 1 and "adapter.json: not found" in error_line(err)


def test_diverging_loss_stops_names_the_step_and_keeps_the_last_good_state(tmp_path, capsys, sms_file, hf_gpt2_dir):
    out = tmp_path / "run"
    code, err = run_cli(capsys, *train_args(hf_gpt2_dir, sms_file, out, "--lr", "1e30", "--clip-grad", "0",
                                            "--eval-every", "0"))
    assert code == 1
    line = error_line(err)
    assert "training diverged: loss is" in line and "at step" in line
    from lorafit.training.checkpoint import load_checkpoint

    assert f"at step {load_checkpoint(out).state.step + 1} " in line
    assert not (out / "report.json").exists() and no_temp_files(out)


def _wait_for_lines(path: Path, n: int, proc, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and sum(1 for ln in path.read_text().splitlines() if '"train"' in ln) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"training never logged {n} steps")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_then_resume_equals_an_uninterrupted_run(tmp_path, capsys, sms_file, hf_gpt2_dir, sig):
    from safetensors.torch import load_file

    # dropout: the RNG state must resume too; csv: a tracker holds each step once, as metrics.jsonl does
    extra = ("--epochs", "10", "--lora-dropout", "0.1", "--grad-accum", "2", "--logger", "csv")
    reference = tmp_path / "reference"
    assert main(train_args(hf_gpt2_dir, sms_file, reference, *extra)) == 0

    out = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, "-m", "lorafit", *train_args(hf_gpt2_dir, sms_file, out, *extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    _wait_for_lines(out / "metrics.jsonl", 5, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "resume with: lorafit train --resume" in err
    assert (out / "checkpoint.safetensors").exists() and not (out / "report.json").exists() and no_temp_files(out)

    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    a, b = load_file(reference / "adapter.safetensors"), load_file(out / "adapter.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # bit-identical
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (reference, out))
    assert ra["metrics"] == rb["metrics"] and ra["epochs"][-1]["val_loss"] == rb["epochs"][-1]["val_loss"]
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(ln)["event"] == "train"]
    assert steps == list(range(1, len(steps) + 1))  # every step logged once, none twice
    with open(out / "metrics.csv", newline="") as f:
        rows = [(r["event"], int(r["step"])) for r in csv.DictReader(f)]
    assert rows == [(r["event"], r["step"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert not (out / "checkpoint.safetensors").exists()
    code, err = run_cli(capsys, "train", "--resume", str(out))
    assert code == 1 and "it finished" in error_line(err)


def test_debug_shows_the_exception_before_or_after_the_command(tmp_path):
    from lorafit import LorafitError

    for argv in (["--debug", "eval", "--run", str(tmp_path)], ["eval", "--run", str(tmp_path), "--debug"]):
        with pytest.raises(LorafitError, match="adapter.json: not found"):
            main(argv)


def test_written_files_get_ordinary_permissions(tmp_path):
    """Atomic writes go through a 0600 temporary file; what lands has the umask's usual permissions."""
    import torch

    from lorafit.files import save_safetensors, write_json

    umask = os.umask(0o022)
    try:
        save_safetensors(tmp_path / "a.safetensors", {"w": torch.zeros(2)})
        write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(umask)
    for name in ("a.safetensors", "a.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
