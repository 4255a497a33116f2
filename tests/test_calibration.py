"""Temperature scaling, ECE and operating thresholds on scores whose truth is known, against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from lorafit.errors import UsageError
from lorafit.reporting.calibration import (DecisionConfig, calibrate, decide, expected_calibration_error,
                                           fit_temperature, nll, pick_threshold, pr_curve, precision_recall_at,
                                           roc_curve, softmax, thresholds_for)
from lorafit.reporting.metrics import roc_auc


def scores(n: int, seed: int, sharpness: float):
    """Binary logits from a noisy signal, made over- (sharpness > 1) or under-confident (< 1)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    z = (2 * y - 1) * 1.5 + rng.normal(0, 1.2, n)  # the calibrated log-odds of this generator are ~2.1 z
    return np.stack([-z, z], 1) * sharpness, y


@pytest.mark.parametrize("sharpness, side", [(4.0, "above"), (0.3, "below")])
def test_temperature_scaling_lowers_validation_nll_and_finds_its_minimum(sharpness, side):
    logits, y = scores(2000, 0, sharpness)
    t = fit_temperature(logits, y)
    assert (t > 1) if side == "above" else (t < 1)  # over-confident: softened; under-confident: sharpened
    assert nll(logits, y, t) < nll(logits, y) - 0.01
    for other in (t * 1.05, t / 1.05):  # a minimum, not just an improvement
        assert nll(logits, y, t) <= nll(logits, y, other)
    assert expected_calibration_error(softmax(logits, t), y) < expected_calibration_error(softmax(logits), y)


def test_calibrate_fits_on_validation_and_helps_held_out_data():
    probs, y = {}, {}
    for split, seed in (("val", 1), ("test", 2)):
        logits, y[split] = scores(1500, seed, 4.0)
        probs[split] = softmax(logits)
    c = calibrate(probs, y, ["ham", "spam"], DecisionConfig())
    val = c.report["calibration"]["splits"]["val"]
    test = c.report["calibration"]["splits"]["test"]
    assert c.temperature == pytest.approx(fit_temperature(np.log(probs["val"]), y["val"]))
    assert val["nll_after"] < val["nll_before"] and test["nll_after"] < test["nll_before"]
    assert test["ece_after"] < test["ece_before"]
    np.testing.assert_allclose(c.apply(probs["test"]), softmax(np.log(probs["test"]), c.temperature), atol=1e-12)
    assert not c.thresholds and "operating_point" not in c.report


def test_no_temperature_without_a_validation_mistake():
    probs = {"val": np.array([[0.9, 0.1], [0.2, 0.8]])}
    c = calibrate(probs, {"val": np.array([0, 1])}, ["a", "b"], DecisionConfig())
    assert c.temperature == 1.0 and c.report["calibration"]["method"].startswith("none")


def test_ece_by_hand():
    probs = np.array([[0.95, 0.05], [0.9, 0.1], [0.4, 0.6], [0.3, 0.7]])
    y = np.array([0, 1, 1, 0])
    # bins of width 1/15: {0.95}: conf .95 acc 1; {0.9}: conf .9 acc 0; {0.6}: conf .6 acc 1; {0.7}: conf .7 acc 0
    expected = (0.05 + 0.9 + 0.4 + 0.7) / 4
    assert expected_calibration_error(probs, y) == pytest.approx(expected)


def brute_force(s, positive, target, value):
    """Every distinct score as threshold: the best one meeting the target, by definition."""
    ok = []
    for t in np.unique(s):
        m = precision_recall_at(s, positive, t)
        if target == "precision" and m["precision"] is not None and m["precision"] >= value:
            ok.append((m["recall"], t))  # most recall, then the lowest threshold
        if target == "recall" and m["recall"] >= value:
            ok.append((m["precision"] or 0, t))
    if target == "precision":
        return min(t for r, t in ok if r == max(r for r, _ in ok))
    return max(t for _, t in ok)


@pytest.mark.parametrize("target, value", [("precision", 0.9), ("precision", 0.95), ("precision", 0.99),
                                           ("recall", 0.8), ("recall", 0.95), ("recall", 1.0)])
def test_thresholds_hit_the_asked_precision_or_recall_on_validation(target, value):
    logits, y = scores(400, 3, 1.0)
    s, positive = softmax(logits)[:, 1], y == 1
    t, reached = pick_threshold(s, positive, target, value)
    assert reached
    at = precision_recall_at(s, positive, t)
    assert at[target] >= value
    assert at == precision_recall_at(s, positive, brute_force(s, positive, target, value))
    assert not np.isclose(s, t, rtol=0, atol=1e-4).any()  # halfway between two scores, not on one


def test_an_unreachable_precision_says_so_and_takes_the_best():
    s = np.array([0.9, 0.8, 0.7, 0.6])
    positive = np.array([False, True, True, False])
    t, reached = pick_threshold(s, positive, "precision", 0.99)
    assert not reached and t == pytest.approx(0.65)  # precision 2/3 from 0.7 beats 0 at 0.9 and 1/2 at 0.8
    with pytest.warns(UserWarning, match="no threshold reaches precision 0.99"):
        calibrate({"val": np.stack([1 - s, s], 1)}, {"val": positive.astype(int)}, ["a", "b"],
                  DecisionConfig(calibrate=False, target_precision=0.99))


def test_curves_agree_with_the_rank_auc_and_count_ties_once():
    s = np.array([0.9, 0.8, 0.8, 0.3, 0.2])
    positive = np.array([True, True, False, True, False])
    pr = pr_curve(s, positive)
    assert pr["threshold"].tolist() == [0.9, 0.8, 0.3, 0.2]
    assert pr["precision"].tolist() == pytest.approx([1, 2 / 3, 3 / 4, 3 / 5])
    roc = roc_curve(s, positive)
    area = float(np.sum(np.diff(roc["fpr"]) * (roc["tpr"][1:] + roc["tpr"][:-1]) / 2))  # trapezoids
    assert area == pytest.approx(roc_auc(positive.astype(int), s))


def test_decide_with_per_class_thresholds():
    labels = ["ham", "spam", "promo"]
    p = np.array([[0.5, 0.4, 0.1], [0.2, 0.3, 0.5], [0.1, 0.85, 0.05], [0.3, 0.2, 0.5]])
    assert decide(p, labels, {}).tolist() == [0, 2, 1, 2]
    assert decide(p, labels, {"spam": 0.35}).tolist() == [1, 2, 1, 2]  # spam when >= 0.35, else best other
    assert decide(p, labels, {"spam": 0.9}).tolist() == [0, 2, 0, 2]
    assert decide(p, labels, {"spam": 0.3, "promo": 0.45}).tolist() == [1, 2, 1, 2]  # the more probable of two


def test_threshold_overrides():
    labels = ["ham", "spam"]
    assert thresholds_for({"spam": 0.7}, labels, None) == {"spam": 0.7}
    assert thresholds_for({}, labels, 0.4) == {"spam": 0.4}
    assert thresholds_for({"ham": 0.7}, labels, 0.4) == {"ham": 0.4}
    assert thresholds_for({}, labels, {"ham": 0.2}) == {"ham": 0.2}
    with pytest.raises(UsageError, match="'eggs': not one of the labels ham, spam"):
        thresholds_for({}, labels, {"eggs": 0.2})
    with pytest.raises(UsageError, match=r"in \[0, 1\]"):
        thresholds_for({}, labels, 1.5)
    with pytest.raises(UsageError, match="CLASS=VALUE"):
        thresholds_for({}, ["a", "b", "c"], 0.5)


def test_decision_flags_are_checked():
    with pytest.raises(UsageError, match="not both"):
        DecisionConfig(target_precision=0.9, target_recall=0.9)
    from lorafit.cli import flag

    with pytest.raises(UsageError, match=r"^target_precision must be in \(0, 1\]") as e:
        DecisionConfig(target_precision=99)
    assert e.value.render(flag).startswith("--target-precision must be in (0, 1]")
    with pytest.raises(UsageError, match="need positive") as e:
        DecisionConfig(target_recall=0.9).positive_class(["a", "b", "c"])
    assert "--target-precision/--target-recall with 3 classes need --positive-class" in e.value.render(flag)
    assert DecisionConfig(target_recall=0.9).positive_class(["ham", "spam"]) == "spam"
