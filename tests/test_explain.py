"""Token attributions: integrated gradients are complete (they add up to the log-odds change from the
baseline), occlusion is exact, and on a model trained where one planted word decides the label, that word
gets the largest attribution."""

from __future__ import annotations

import math
import random

import pytest
import torch

from lorafit import BackboneSpec, ClassifierSpec, DataConfig, LoRAConfig, RunSettings, TrainConfig, train_run
from lorafit.inference import explain
from lorafit.inference.explain import explain_texts, log_odds, method_for
from lorafit.inference.predict import load_for_inference, predict_texts

from conftest import WORDS, save_tiny
from serve_fixtures import TEXTS, write_tiny_run

pytest.importorskip("captum", reason="captum (lorafit[explain]) is in the test extra")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("explain"))


def test_integrated_gradients_add_up_to_the_log_odds_change(tiny_run):
    rows = {r["text"]: r for r in predict_texts(tiny_run, TEXTS, device="cpu", precision="fp32")}
    explained = explain_texts(tiny_run, TEXTS, method="ig", device="cpu", precision="fp32")
    for e in explained:
        p = rows[e.text]["probabilities"][e.label]
        assert e.label == rows[e.text]["label"]  # by default the class predict decides
        assert e.log_odds == pytest.approx(math.log(p / (1 - p)), abs=1e-4)
        change = e.log_odds - e.baseline_log_odds
        assert abs(change) > 0.05  # a real change to account for, not a vacuous test
        assert abs(sum(e.attributions) - change) <= 0.05 * abs(change)  # completeness, within 5 %
        assert sum(e.attributions) - change == pytest.approx(e.delta, abs=1e-5)
        assert len(e.tokens) == len(e.attributions) and "integrated gradients" in e.method


def test_occlusion_is_the_log_odds_drop_without_each_token(tiny_run):
    loaded = load_for_inference(tiny_run, "cpu", "fp32")
    model, backbone, spec = loaded.model, loaded.backbone, loaded.spec
    (e,) = explain_texts(tiny_run, [TEXTS[4]], method="occlusion", target="unsure", device="cpu", precision="fp32")
    ids = backbone.encoder.encode([TEXTS[4]])[0]
    k = spec.labels.index("unsure")

    def f(x):
        t = torch.tensor([x])
        with torch.no_grad():
            return float(log_odds(model(t, torch.ones_like(t)), k)[0])

    assert e.label == "unsure" and e.log_odds == pytest.approx(f(ids), abs=1e-5)
    for i in (0, 3, len(ids) - 1):
        cut = list(ids)
        cut[i] = backbone.encoder.pad_id
        assert e.attributions[i] == pytest.approx(f(ids) - f(cut), abs=1e-5)
    assert e.method.startswith("occlusion")


def test_auto_takes_the_cheaper_method_and_more_steps_until_complete(tiny_run, monkeypatch):
    assert method_for("auto", 95, 32) == "occlusion" and method_for("auto", 96, 32) == "ig"
    assert method_for("occlusion", 500, 32) == "occlusion" and method_for("ig", 3, 32) == "ig"
    (short,) = explain_texts(tiny_run, ["buy now"], device="cpu", precision="fp32")
    assert short.method.startswith("occlusion") and short.gap is None
    (long,) = explain_texts(tiny_run, [TEXTS[4]], steps=2, device="cpu", precision="fp32")  # > 5 tokens: ig
    assert long.method.startswith("integrated gradients (Captum, ")
    assert (long.gap <= 0.05) == ("not converged" not in long.method)
    monkeypatch.setattr(explain, "COMPLETENESS", 0.0)  # never converged: 2, 4, 8 steps, then labelled
    rows = []  # the rows of every forward pass the explanation runs
    forward = explain.classifier_forward
    monkeypatch.setattr(explain, "classifier_forward",
                        lambda *a: (lambda ids, f=forward(*a): rows.append(len(ids)) or f(ids)))
    (never,) = explain_texts(tiny_run, [TEXTS[4]], steps=2, device="cpu", precision="fp32")
    assert "8 steps" in never.method and "not converged, unreliable" in never.method
    assert never.to_dict()["completeness_gap"] == never.gap > 0
    assert rows.count(1) == 2  # f(text) and f(baseline) once, not again in each of the three rounds
    assert sum(never.attributions) - (never.log_odds - never.baseline_log_odds) == pytest.approx(never.delta, abs=1e-9)


def test_a_text_is_tokenised_once_for_its_prediction_and_its_explanation(tiny_run, monkeypatch):
    from lorafit.inference import predict

    calls = []
    for module in (explain, predict):
        monkeypatch.setattr(module, "encode_texts", lambda *a, f=module.encode_texts, **k: calls.append(a[1]) or f(*a, **k),
                            raising=False)
    explain_texts(tiny_run, TEXTS[:3], method="occlusion", device="cpu", precision="fp32")
    assert calls == [TEXTS[:3]]


def test_explanations_refuse_what_they_cannot_explain_naming_the_field(tiny_run):
    from lorafit.errors import SettingError

    with pytest.raises(SettingError, match="target 'eggs': not one of the labels") as e:
        explain_texts(tiny_run, TEXTS[:1], target="eggs", device="cpu", precision="fp32")
    assert e.value.render(lambda f: "--" + f).startswith("--target 'eggs'")


PLANTED = "urgent"
FILLER = [w for w in WORDS if w != PLANTED]


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """A tiny Llama with a word-level tokenizer (one word, one token), mean-pooled (no position is special),
    trained on texts of random words where spam is exactly the texts holding the planted word, anywhere."""
    root = tmp_path_factory.mktemp("planted")
    model = save_tiny(root / "tiny-llama", bert=False)
    rng = random.Random(0)
    lines = []
    for i in range(160):
        words = rng.sample(FILLER, rng.randint(3, 6))
        if i % 2:
            words.insert(rng.randint(0, len(words)), PLANTED)
        lines.append(f"{'spam' if i % 2 else 'ham'}\t{' '.join(words)}")
    data = root / "planted.tsv"
    data.write_text("\n".join(lines) + "\n")
    spec = ClassifierSpec(BackboneSpec(f"hf:{model}"), LoRAConfig(rank=8), pooling="mean")
    train_run(spec, DataConfig(data=str(data)), TrainConfig(epochs=6, batch_size=8, lr=1e-2, eval_every=1000),
              root / "run", RunSettings(precision="fp32"), progress=False)
    return root / "run"


@pytest.mark.parametrize("method", ["ig", "occlusion"])
def test_the_planted_word_gets_the_largest_attribution(planted_run, method):
    """Every new text holding the planted word that the model calls spam (most of them: it learnt the rule)
    owes that call to the planted word above all. Integrated gradients are held to it where they converged
    (their attributions add up); the path from the pad baseline is too rugged for that on some texts, and
    those must say so."""
    rng = random.Random(1)
    texts = []
    for _ in range(12):
        words = rng.sample(FILLER, 5)
        words.insert(rng.randint(0, 5), PLANTED)
        texts.append(" ".join(words))
    spam = [e for e in explain_texts(planted_run, texts, method=method, device="cpu", precision="fp32")
            if e.label == "spam"]
    assert len(spam) >= 9
    complete = [e for e in spam if e.gap is None or e.gap <= 0.05]
    assert len(complete) >= 3
    for e in complete:
        assert e.top(1)[0]["token"].strip() == PLANTED, (e.text, e.top(3))
    assert all("not converged, unreliable" in e.method for e in spam if e not in complete)
