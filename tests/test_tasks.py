"""Task types beyond one label per short text: multi-label (sigmoid + BCE, per-label thresholds), end to end
on the tiny GPT-2: train, eval, predict, serve and both exports."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

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
    with pytest.raises(LorafitError, match="several label columns need multi_label"):
        read_table(tmp_path / "c.csv", label_col="x,y")
    splits = load_splits(DataConfig(str(tmp_path / "a.csv"), multi_label=True))
    assert splits.labels == ["late", "money"] and sum(map(len, (splits.train, splits.val, splits.test))) == 160


def test_one_probabilities_serves_the_classifier_the_server_and_the_export_check():
    """Softmax ignores a shift of every logit, each label's sigmoid does not: the export check compares
    what the run decides on (sigmoids for multi-label), as predict and serve score it."""
    import torch
    from types import SimpleNamespace
    from lorafit.adapters.classifier import probabilities
    from lorafit.adapters.hf_layout import check_same_predictions
    from lorafit.serving.schema import predictions

    z = torch.tensor([[2.0, -1.0, 0.5]])
    np.testing.assert_allclose(probabilities(z, False).sum(-1), [1.0], atol=1e-6)
    np.testing.assert_allclose(probabilities(z, True), torch.sigmoid(z), atol=0)
    scores = [s["score"] for s in predictions(z, ["a", "b", "c"], raw_scores=False, multi_label=True)[0]]
    assert sorted(scores, reverse=True) == pytest.approx(sorted(torch.sigmoid(z)[0].tolist(), reverse=True))
    shifted = SimpleNamespace(logits=z + 1.0)
    hf_model = lambda input_ids, attention_mask: shifted  # noqa: E731
    ids = torch.zeros((1, 2), dtype=torch.long)
    assert check_same_predictions(z, hf_model, ids, ids, "here") < 1e-6
    with pytest.raises(LorafitError, match="differ from lorafit's"):
        check_same_predictions(z, hf_model, ids, ids, "here", multi_label=True)


def test_predict_and_eval_decide_a_label_without_a_threshold_at_the_same_default():
    from types import SimpleNamespace
    from lorafit.inference.evaluate import split_metrics
    from lorafit.inference.predict import labelled
    from lorafit.reporting.metrics import LABEL_THRESHOLD

    probs, labels = np.array([[LABEL_THRESHOLD, LABEL_THRESHOLD - 1e-9]]), ["a", "b"]
    loaded = SimpleNamespace(labels=labels, spec=SimpleNamespace(multi_label=True))
    (row,) = labelled(loaded, ["t"], probs, {})
    metrics = split_metrics({"test": probs}, {"test": SimpleNamespace(labels=np.array([[1, 0]]))}, labels)["test"]
    assert row["labels"] == ["a"] and list(row["thresholds"].values()) == metrics["thresholds"] == [LABEL_THRESHOLD] * 2
    assert metrics["accuracy"] == 1.0  # eval decides as predict: a on, b off


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
    from conftest import train_args, write_hf_gpt2

    tmp = tmp_path_factory.mktemp("multi")
    base = write_hf_gpt2(tmp / "hf-gpt2")
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
    for figure in ("pr_curve.png", "roc_curve.png"):  # every label with a star at its threshold, linked from report.md
        assert f"({figure})" in md and (multi_run / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
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


def write_rare_class(path: Path, counts: dict[str, int]) -> Path:
    rng = random.Random(0)
    rows = [{"text": f"{label} message {rng.randint(0, 999)}", "label": label}
            for label, n in counts.items() for _ in range(n)]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_auto_balancing_never_silently_drops_most_of_the_data(tmp_path):
    from lorafit.data.datasets import prepare_splits

    three = read_table(write_rare_class(tmp_path / "three.csv", {"a": 120, "b": 100, "rare": 10}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto on many classes: no under-sampling, so nothing to warn about
        splits = prepare_splits(three)
    assert splits.balancing["method"] == "weights" and splits.balancing["kept"] == 230
    assert sum(map(len, (splits.train, splits.val, splits.test))) == 230
    assert splits.balancing["class_counts"] == {"a": 120, "b": 100, "rare": 10}
    with pytest.warns(UserWarning, match=r"keeps 30 of 230 texts \(87 % dropped\); --balance weights"):
        forced = prepare_splits(three, balance="undersample")
    assert sum(map(len, (forced.train, forced.val, forced.test))) == 30
    two = read_table(write_rare_class(tmp_path / "two.csv", {"ham": 90, "spam": 10}))
    with pytest.warns(UserWarning, match=r"keeps 20 of 100 texts \(80 % dropped\)"):
        book = prepare_splits(two)  # two classes: the book's SMS recipe, said out loud
    assert book.balancing["method"] == "undersample"
    mild = prepare_splits(read_table(write_rare_class(tmp_path / "mild.csv", {"a": 40, "b": 30, "c": 30})))
    assert mild.balancing["method"] == "undersample" and mild.balancing["kept"] == 90  # keeps 90 %: no warning


def test_a_run_says_how_it_balanced(tmp_path, hf_gpt2_dir):
    from conftest import train_args

    data = write_rare_class(tmp_path / "three.csv", {"a": 40, "b": 40, "rare": 4})
    assert main(train_args(hf_gpt2_dir, data, tmp_path / "run", "--epochs", "1")) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["data"]["balancing"]["method"] == "weights" and report["train"]["class_weights"] == "auto"
    assert "Balancing: all 84 texts kept, the loss weighted by inverse class frequency" in \
        (tmp_path / "run" / "report.md").read_text()


def test_tune_trials_are_runs_the_first_is_the_base_and_a_rerun_continues(tmp_path, hf_gpt2_dir, sms_file, capsys):
    pytest.importorskip("optuna", reason="lorafit[tune] is not installed")
    from conftest import train_args

    out = tmp_path / "tune"
    args = [a for a in train_args(hf_gpt2_dir, sms_file, out, "--epochs", "1") if a != "train"]
    search = ["--space", "lr,rank,variant", "--eval-every", "0"]
    assert main(["tune", *args, *search, "--trials", "2"]) == 0
    summary = json.loads((out / "tune.json").read_text())
    first = summary["trials"][0]
    assert first["trial"] == 0 and first["lr"] == 3e-3 and first["rank"] == 8 and first["variant"] == "lora"
    assert len(summary["trials"]) == 2 and (out / "trial-000" / "report.json").is_file()
    assert (out / "best" / "adapter.safetensors").is_file() and "(base)" in (out / "tune.md").read_text() \
        or summary["best_trial"] == 0
    assert summary["verdict"] in (out / "tune.md").read_text()
    assert main(["tune", *args, *search, "--trials", "3"]) == 0  # continues the study: one more trial
    again = json.loads((out / "tune.json").read_text())
    assert [t["trial"] for t in again["trials"]] == [0, 1, 2] and again["trials"][:2] == summary["trials"]
    capsys.readouterr()
    assert main(["compare", str(out), "--out-png", str(tmp_path / "c.png")]) == 0
    table = capsys.readouterr().out
    finished = [t["run"] for t in again["trials"] if t["state"] == "complete"]  # a pruned trial has no report
    assert "trial-000" in finished and all(run in table for run in finished)
