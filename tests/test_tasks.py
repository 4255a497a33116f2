"""Task types beyond one label per short text: multi-label (sigmoid + BCE, per-label thresholds), end to end
on the tiny GPT-2: train, eval, predict, serve and both exports."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lorafit.cli import main
from lorafit.data.datasets import DataConfig, encode_labels, load_splits, read_table
from lorafit.errors import LorafitError
from lorafit.inference.predict import predict_texts
from lorafit.reporting.metrics import best_f1_threshold, multilabel_metrics

SLOTS = {"money": (["WIN cash prize now!!! call", "FREE entry txt WIN to claim"], ["see you at lunch", "ok thanks"]),
         "late": (["running late sorry", "stuck in traffic, late"], ["all good here", "on my way now"])}


def write_multi_label(path: Path, n: int = 160, seed: int = 0, columns: bool = False) -> Path:
    """Two independent yes/no topics, one phrase each (so a text has none, one or both labels); the label is
    the set (``a|b``, empty for none), or one 0/1 column per topic (``columns``)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topics = [t for t in SLOTS if rng.random() < 0.5]
        text = " ".join(rng.choice(SLOTS[t][t not in topics]) for t in SLOTS) + f" {rng.randint(0, 99)}"
        rows.append({"text": text, **({t: int(t in topics) for t in SLOTS} if columns else {"label": "|".join(topics)})})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_multi_label_cells_and_columns_read_to_the_same_label_sets(tmp_path):
    a = read_table(write_multi_label(tmp_path / "a.csv"), multi_label=True)
    b = read_table(write_multi_label(tmp_path / "b.csv", columns=True), label_col="money,late", multi_label=True)
    assert a["label"].tolist() == b["label"].tolist()
    y = encode_labels(a, ["late", "money"], "a", multi_label=True)
    assert y.shape == (160, 2) and set(np.unique(y)) == {0.0, 1.0} and set(y.sum(1)) == {0, 1, 2}
    (tmp_path / "c.csv").write_text("text,x,y\nhello,1,maybe\n")
    with pytest.raises(LorafitError, match="column 'y' holds 'maybe'"):
        read_table(tmp_path / "c.csv", label_col="x,y", multi_label=True)
    with pytest.raises(LorafitError, match="need --multi-label"):
        read_table(tmp_path / "c.csv", label_col="x,y")
    splits = load_splits(DataConfig(str(tmp_path / "a.csv"), multi_label=True))
    assert splits.labels == ["late", "money"] and sum(map(len, (splits.train, splits.val, splits.test))) == 160


def test_best_f1_threshold_and_multilabel_metrics_by_hand():
    y = np.array([1, 1, 0, 1, 0, 0])
    s = np.array([0.9, 0.4, 0.35, 0.3, 0.2, 0.1])
    t = best_f1_threshold(y, s)  # predicting the top 4 as positive: tp 3, fp 1 -> F1 6/7, the best
    assert 0.2 < t < 0.3 and best_f1_threshold(np.zeros(3), np.ones(3)) == 0.5
    y2 = np.array([[1, 0], [1, 1], [0, 1], [0, 0]])
    p2 = np.array([[0.8, 0.1], [0.7, 0.4], [0.2, 0.9], [0.6, 0.2]])
    m = multilabel_metrics(y2, p2, ["a", "b"])
    assert m["accuracy"] == 0.5  # rows 0 and 2 have every label right at 0.5
    assert m["per_class"]["a"]["precision"] == pytest.approx(2 / 3) and m["per_class"]["b"]["recall"] == 0.5
    assert m["micro_f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1)) and m["hamming_loss"] == 0.25
    m2 = multilabel_metrics(y2, p2, ["a", "b"], thresholds=[0.65, 0.3])
    assert m2["accuracy"] == 1.0 and m2["micro_f1"] == 1.0


@pytest.fixture(scope="module")
def multi_run(tmp_path_factory):
    """A multi-label run on the tiny GPT-2 (4 epochs): the run directory."""
    from conftest import hf_gpt2_config, train_args, write_bpe
    from lorafit.backbones.gpt2 import GPTConfig
    from conftest import TINY
    from transformers import GPT2LMHeadModel

    tmp = tmp_path_factory.mktemp("multi")
    torch.manual_seed(1)
    base = tmp / "hf-gpt2"
    GPT2LMHeadModel(hf_gpt2_config(GPTConfig(**TINY))).eval().save_pretrained(base)
    write_bpe(base, names=("vocab.json", "merges.txt"))
    data = write_multi_label(tmp / "topics.csv")
    out = tmp / "run"
    assert main(train_args(base, data, out, "--multi-label", "--epochs", "4", "--lr", "5e-3",
                           "--no-head-bias")) == 0
    return out


def test_multi_label_run_learns_and_reports_per_label(multi_run, capsys):
    report = json.loads((multi_run / "report.json").read_text())
    test = report["metrics"]["test"]
    assert report["model"]["problem_type"] == "multi_label_classification"
    # each label is there half the time: predicting both scores micro F1 0.67, subset accuracy 0.25
    assert test["multi_label"] and test["micro_f1"] > 0.85 and test["accuracy"] > 0.6, test
    spec = json.loads((multi_run / "adapter.json").read_text())
    assert list(spec["thresholds"].values()) == report["metrics"]["val"]["thresholds"] and len(spec["thresholds"]) == 2
    md = (multi_run / "report.md").read_text()
    assert "## Test set, per label" in md and "micro F1" in md and "confusion_matrix.png" not in md
    assert not (multi_run / "confusion_matrix.png").exists()
    assert main(["eval", "--run", str(multi_run), "--json", "--device", "cpu", "--precision", "fp32"]) == 0
    again = json.loads(capsys.readouterr().out)["metrics"]["test"]
    assert again["micro_f1"] == pytest.approx(test["micro_f1"]) and again["accuracy"] == test["accuracy"]


def test_multi_label_predict_returns_every_label_over_its_threshold(multi_run, capsys):
    rows = predict_texts(multi_run, ["FREE entry txt WIN to claim stuck in traffic, late 5", "ok thanks all good here 7"], device="cpu", precision="fp32")
    for row in rows:
        assert set(row["probabilities"]) == {"late", "money"}
        assert row["labels"] == [k for k, p in row["probabilities"].items() if p >= row["thresholds"][k]]
        assert not np.isclose(sum(row["probabilities"].values()), 1.0)  # sigmoids, not a softmax
    assert rows[0]["labels"] == ["late", "money"] and rows[1]["labels"] == []
    assert main(["predict", "--run", str(multi_run), "ok thanks all good here 7", "--device", "cpu", "--precision",
                 "fp32"]) == 0
    assert capsys.readouterr().out.startswith("(none)\tlate=")


def test_multi_label_serve_scores_every_label_with_its_sigmoid(multi_run):
    pytest.importorskip("fastapi", reason="lorafit[serve] is not installed")
    from fastapi.testclient import TestClient

    from lorafit.serving.app import create_app
    from lorafit.serving.config import ServeConfig
    from lorafit.serving.model import ServedModel

    text = "WIN cash prize now!!! call running late sorry 3"
    expected = predict_texts(multi_run, [text], device="cpu", precision="fp32")[0]["probabilities"]
    config = ServeConfig(runs=(str(multi_run),), device="cpu", precision="fp32")
    with TestClient(create_app(ServedModel.load(config), config)) as client:
        got = client.post("/predict", json={"inputs": text}).json()
        info = client.get("/info").json()
    assert {p["label"]: p["score"] for p in got} == pytest.approx(expected, abs=1e-6)
    assert info["problem_type"] == "multi_label_classification" and set(info["thresholds"]) == set(expected)


@pytest.mark.parametrize("fmt", ["hf", "peft"])
def test_multi_label_exports_carry_the_problem_type(multi_run, tmp_path, fmt):
    pytest.importorskip("transformers")
    if fmt == "peft":
        pytest.importorskip("peft")
    out = tmp_path / fmt
    assert main(["export", "--run", str(multi_run), "--format", fmt, "--out", str(out)]) == 0  # checked within 1e-5
    readme = (out / "README.md").read_text()
    assert "multi_label_classification" in readme or "multi-label" in readme
    if fmt == "hf":
        assert json.loads((out / "config.json").read_text())["problem_type"] == "multi_label_classification"
    else:
        texts = ["FREE entry txt WIN to claim stuck in traffic, late 5", "ok thanks all good here 7"]
        a = predict_texts(multi_run, texts, device="cpu", precision="fp32")
        b = predict_texts(out, texts, device="cpu", precision="fp32")  # PEFT folder read back into lorafit
        assert [r["labels"] for r in a] == [r["labels"] for r in b]
        for x, y in zip(a, b):
            assert x["probabilities"] == pytest.approx(y["probabilities"], abs=1e-5)
