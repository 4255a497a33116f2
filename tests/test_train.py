"""The main job end to end on a tiny model: the loop learns, the run directory is complete, and eval,
predict and merge reproduce the report from the saved files."""

from __future__ import annotations

import json

import pytest

from lorafit.cli import main

from conftest import TINY, train_args

EXPECTED_FILES = {"adapter.safetensors", "adapter.json", "metrics.jsonl", "report.json", "report.md", "loss.png",
                  "accuracy.png", "confusion_matrix.png", "train.csv", "val.csv", "test.csv"}


@pytest.fixture
def trained_run(tmp_path, hf_gpt2_dir, sms_file):
    out = tmp_path / "run"
    assert main(train_args(hf_gpt2_dir, sms_file, out)) == 0
    return out


def test_run_directory_holds_every_artefact_and_the_loop_learns(trained_run):
    assert EXPECTED_FILES <= {p.name for p in trained_run.iterdir()}
    assert not [p.name for p in trained_run.iterdir() if p.name.endswith(".tmp")]
    report = json.loads((trained_run / "report.json").read_text())
    assert report["metrics"]["test"]["accuracy"] >= 0.95
    assert report["metrics"]["val"]["accuracy"] >= 0.95
    assert report["data"]["sizes"] == {"train": 112, "val": 16, "test": 32}
    for key in ("train_examples_per_s", "eval_examples_per_s", "peak_rss_mb", "wall_seconds"):
        assert report["speed"][key] > 0
    head = (TINY["emb_dim"] + 1) * 2  # weight and bias of the 2-class head
    assert report["parameters"]["trainable"] == report["parameters"]["lora_A"] + report["parameters"]["lora_B"] + head
    assert report["versions"]["torch"] and report["command"].startswith("lorafit train")
    events = [json.loads(line)["event"] for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert events.count("epoch") == 4 and events.count("train") == 4 * 14 and "eval" in events
    md = (trained_run / "report.md").read_text()
    assert "Confusion matrix" in md and "ROC-AUC" in md and "| **trainable** |" in md
    for png in ("loss.png", "accuracy.png", "confusion_matrix.png"):
        assert (trained_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_reproduces_the_report(trained_run, capsys):
    report = json.loads((trained_run / "report.json").read_text())
    capsys.readouterr()
    assert main(["eval", "--run", str(trained_run), "--json", "--precision", "fp32"]) == 0
    result = json.loads(capsys.readouterr().out)
    for split in ("train", "val", "test"):
        assert result["metrics"][split]["accuracy"] == report["metrics"][split]["accuracy"]
        assert result["metrics"][split]["confusion_matrix"] == report["metrics"][split]["confusion_matrix"]
        assert result["metrics"][split]["loss"] == pytest.approx(report["metrics"][split]["loss"], abs=1e-6)
    assert main(["eval", "--run", str(trained_run), "--data", str(trained_run / "test.csv"), "--json",
                 "--precision", "fp32"]) == 0
    on_file = json.loads(capsys.readouterr().out)["metrics"]["data"]
    assert on_file["accuracy"] == report["metrics"]["test"]["accuracy"]


def test_predict_matches_eval_and_merge_gives_the_same_predictions(trained_run, tmp_path, capsys):
    import pandas as pd

    test = pd.read_csv(trained_run / "test.csv")
    (tmp_path / "msgs.txt").write_text("\n".join(test.text) + "\n")
    capsys.readouterr()
    assert main(["predict", "--run", str(trained_run), "--file", str(tmp_path / "msgs.txt"), "--json",
                 "--precision", "fp32"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    report = json.loads((trained_run / "report.json").read_text())
    accuracy = sum(r["label"] == y for r, y in zip(rows, test.label)) / len(test)
    assert accuracy == report["metrics"]["test"]["accuracy"]
    for r in rows:  # the label is the most probable class, and the probabilities are a distribution
        assert r["probability"] == r["probabilities"][r["label"]] == max(r["probabilities"].values())
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)

    merged = tmp_path / "merged"
    assert main(["merge", "--run", str(trained_run), "--out", str(merged)]) == 0
    assert {p.name for p in merged.iterdir()} >= {"model.safetensors", "classifier.json", "vocab.json", "merges.txt"}
    capsys.readouterr()
    assert main(["predict", "--run", str(merged), "--file", str(tmp_path / "msgs.txt"), "--json",
                 "--precision", "fp32"]) == 0
    merged_rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in merged_rows] == [r["label"] for r in rows]
    for a, b in zip(merged_rows, rows):
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-5)
    assert main(["merge", "--run", str(trained_run), "--out", str(merged)]) == 1  # refuses to overwrite


def test_same_seed_same_adapter(tmp_path, hf_gpt2_dir, sms_file):
    from safetensors.torch import load_file

    for name in ("a", "b"):
        assert main(train_args(hf_gpt2_dir, sms_file, tmp_path / name, "--epochs", "1")) == 0
    a, b = load_file(tmp_path / "a" / "adapter.safetensors"), load_file(tmp_path / "b" / "adapter.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert (tmp_path / "a" / "train.csv").read_text() == (tmp_path / "b" / "train.csv").read_text()


def test_random_init_gpt2_small_inspect_prints_the_seed_numbers(bpe_dir, capsys):
    assert main(["inspect", "--model", "gpt2-small", "--random-init", "--tokenizer", str(bpe_dir)]) == 0
    out = capsys.readouterr().out
    assert "164,364,288" in out and "1,327,104" in out and "0.81%" in out
    assert "125,768,450" in out and "1,328,642" in out and "1.06%" in out
    assert "LoRALinear" in out and "head before: Linear(in_features=768, out_features=50257" in out


def test_bf16_autocast_training_learns(tmp_path, hf_gpt2_dir, sms_file):
    """The default wherever bf16 matmuls are fast (GPUs, AMX or Zen 4 CPUs), forced here: packed blocks
    and the LoRA autograd node run in bf16 while the LoRA weights stay fp32."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    args = train_args(hf_gpt2_dir, sms_file, out)
    args[args.index("fp32")] = "bf16"
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["speed"]["precision"] == "bf16 autocast"
    assert report["metrics"]["test"]["accuracy"] >= 0.9
    assert {str(t.dtype) for t in load_file(str(out / "adapter.safetensors")).values()} == {"torch.float32"}


@pytest.mark.parametrize("preset", [None, "512"])
def test_resolving_compute_caps_onednn_kernel_caches_unless_the_user_set_them(preset):
    """oneDNN's caches must be capped before its first bf16 kernel: resolve_compute does it (importing lorafit
    changes no environment variable); a user's value wins."""
    import os
    import subprocess
    import sys

    from lorafit.runtime import ONEDNN_CACHE_CAPACITY, ONEDNN_CACHES

    env = {k: v for k, v in os.environ.items() if k not in ONEDNN_CACHES}
    env.update({k: preset for k in ONEDNN_CACHES} if preset else {})
    code = ("import os, lorafit; from lorafit.runtime import resolve_compute; "
            "print(*(os.environ.get(k, '-') for k in %r)); resolve_compute('cpu', 'fp32'); "
            "print(*(os.environ[k] for k in %r))" % (ONEDNN_CACHES, ONEDNN_CACHES))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    on_import, resolved = out.splitlines()
    assert on_import.split() == [preset or "-"] * 2
    assert resolved.split() == [preset or ONEDNN_CACHE_CAPACITY] * 2
