"""``lorafit train --target-recall`` end to end on a tiny model: the run is calibrated on validation, its
figures are written, and predict and eval apply the temperature and the threshold kept in the adapter."""

from __future__ import annotations

import json
import random

import pytest
import torch

from lorafit.cli import main

from conftest import train_args, write_hf_gpt2, write_sms_like


@pytest.fixture(scope="module")
def decided_run(tmp_path_factory):
    """A run on SMS-like data with 12 % of the labels flipped, so that validation has mistakes to calibrate on."""
    root = tmp_path_factory.mktemp("decided")
    write_hf_gpt2(root / "base")
    data = write_sms_like(root / "SMSSpamCollection", n=240)
    rng = random.Random(5)
    lines = data.read_text().splitlines()
    flip = {"ham": "spam", "spam": "ham"}
    noisy = [(flip[ln.split("\t")[0]] + ln[ln.index("\t"):]) if rng.random() < 0.12 else ln for ln in lines]
    data.write_text("\n".join(noisy) + "\n")
    assert main(train_args(root / "base", data, root / "run", "--target-recall", "0.9")) == 0
    return root / "run"


def test_the_run_is_calibrated_on_validation_and_draws_its_figures(decided_run):
    report = json.loads((decided_run / "report.json").read_text())
    adapter = json.loads((decided_run / "adapter.json").read_text())
    c = report["calibration"]
    assert c["method"] == "temperature scaling" and c["temperature"] != 1.0
    assert adapter["temperature"] == report["model"]["temperature"] == c["temperature"]
    assert c["splits"]["val"]["nll_after"] < c["splits"]["val"]["nll_before"]
    # the metrics are the calibrated model's: their loss is the calibrated NLL
    assert report["metrics"]["val"]["loss"] == pytest.approx(c["splits"]["val"]["nll_after"], abs=1e-6)
    point = report["operating_point"]
    assert point["class"] == "spam" and point["reached_on_val"]
    assert adapter["thresholds"] == {"spam": point["threshold"]}
    assert point["target"] == "recall" and point["val"]["recall"] >= 0.9
    at = report["metrics"]["val"]["at_threshold"]["per_class"]["spam"]
    assert at["precision"] == pytest.approx(point["val"]["precision"]) and at["recall"] == pytest.approx(point["val"]["recall"])
    for png in ("reliability.png", "pr_curve.png", "roc_curve.png"):
        assert (decided_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (decided_run / "report.md").read_text()
    assert "## Calibration" in md and "## Operating threshold" in md and "![reliability diagram](reliability.png)" in md
    worst = report["most_wrong"]  # the test split has mistakes (its labels are noisy too)
    assert 1 <= len(worst) <= 5 and "## The test messages the model got most wrong" in md
    assert [w["p_true"] for w in worst] == sorted(w["p_true"] for w in worst)
    for w in worst:
        assert w["predicted"] != w["label"] and len(w["top_tokens"]) == 3 and w["text"][:40] in md


def _predict(run, texts_file, capsys, *flags):
    capsys.readouterr()
    assert main(["predict", "--run", str(run), "--file", str(texts_file), "--json", "--precision", "fp32", *flags]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_predict_and_eval_apply_the_temperature_and_the_threshold(decided_run, tmp_path, capsys):
    import pandas as pd

    val = pd.read_csv(decided_run / "val.csv")
    texts = tmp_path / "val.txt"
    texts.write_text("\n".join(val.text) + "\n")
    t = json.loads((decided_run / "adapter.json").read_text())["thresholds"]["spam"]
    rows = _predict(decided_run, texts, capsys)
    assert [r["label"] for r in rows] == ["spam" if r["probabilities"]["spam"] >= t else "ham" for r in rows]
    said_spam = [y for r, y in zip(rows, val.label) if r["label"] == "spam"]
    report = json.loads((decided_run / "report.json").read_text())
    assert sum(y == "spam" for y in said_spam) / len(said_spam) == pytest.approx(report["operating_point"]["val"]["precision"])
    assert {r["label"] for r in _predict(decided_run, texts, capsys, "--threshold", "0")} == {"spam"}
    assert {r["label"] for r in _predict(decided_run, texts, capsys, "--threshold", "ham=0")} == {"ham"}
    assert main(["eval", "--run", str(decided_run), "--json", "--precision", "fp32"]) == 0
    result = json.loads(capsys.readouterr().out)
    for split in ("val", "test"):
        assert result["metrics"][split]["loss"] == pytest.approx(report["metrics"][split]["loss"], abs=1e-5)
        assert result["metrics"][split]["at_threshold"]["confusion_matrix"] == \
            report["metrics"][split]["at_threshold"]["confusion_matrix"]


def test_a_bad_threshold_is_one_line(decided_run, capsys):
    with pytest.raises(SystemExit) as e:  # a usage error: argparse's exit
        main(["predict", "--run", str(decided_run), "hello", "--threshold", "eggs=0.5"])
    assert e.value.code == 2
    assert "threshold for 'eggs': not one of the labels ham, spam" in capsys.readouterr().err


def test_the_hf_export_carries_the_temperature(decided_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    from lorafit.adapters.hf_format import export_hf
    from lorafit.inference.predict import predict_texts

    export_hf(decided_run, tmp_path / "hf")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    texts = ["WIN cash prize now!!! call 7", "see you at lunch later 3", "ok thanks, running late 12"]
    for text, row in zip(texts, predict_texts(decided_run, texts, device="cpu", precision="fp32")):
        with torch.no_grad():
            probs = torch.softmax(model(**tok(text, return_tensors="pt")).logits[0], -1).tolist()
        assert probs == pytest.approx([row["probabilities"][k] for k in ("ham", "spam")], abs=1e-4)
