"""Probabilities that mean what they say, and an operating point a person picks.

Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks"): one number T divides
every logit, fitted on the validation split by minimising its negative log-likelihood; the ranking, hence
accuracy and ROC-AUC, is unchanged. Expected calibration error (ECE) measures the gap between confidence
and accuracy over equal-width confidence bins, before and after. An operating threshold for one class
(one-vs-rest, so binary and multi-class alike) is picked on the validation split to meet a precision or a
recall target; the test split then says what that promise is worth on unseen texts.

softmax(z) is unchanged by adding a constant to a row, so log-probabilities serve as logits here.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from ..errors import SettingError, UsageError

BINS = 15
T_RANGE = (0.05, 20.0)  # a perfectly separated validation split would push T to 0: bounded instead
TINY = 1e-45  # the smallest float32 probability: log of a zero probability stays finite


@dataclass(frozen=True)
class DecisionConfig:
    """What ``lorafit train`` does after training: calibrate, and pick a threshold (``--target-*``)."""

    calibrate: bool = True  # fit a temperature on the validation split
    target_precision: float | None = None  # pick the threshold giving at least this precision on validation
    target_recall: float | None = None  # ... or at least this recall
    positive: str | None = None  # the class the target is about; binary tasks: the second label

    def __post_init__(self) -> None:
        if self.target_precision is not None and self.target_recall is not None:
            raise SettingError("give {target_precision} or {target_recall}, not both")
        for name in ("target_precision", "target_recall"):
            v = getattr(self, name)
            if v is not None and not 0 < v <= 1:
                raise SettingError("{%s} must be in (0, 1], got {:g}" % name, v)

    @property
    def target(self) -> tuple[str, float] | None:
        if self.target_precision is not None:
            return "precision", self.target_precision
        if self.target_recall is not None:
            return "recall", self.target_recall
        return None

    def positive_class(self, labels: list[str]) -> str:
        """The class a threshold is about: ``positive``, or the second of two labels."""
        if self.positive is not None:
            if self.positive not in labels:
                raise SettingError("{positive} {!r} is not one of the labels {}", self.positive, _some(labels))
            return self.positive
        if len(labels) != 2:
            raise SettingError("{target_precision}/{target_recall} with {} classes need {positive} (one of {}): the "
                               "threshold is that class's, one-vs-rest", len(labels), _some(labels))
        return labels[1]


def _some(labels: list[str], n: int = 10) -> str:
    """Labels for a one-line message: all of a few, the first ``n`` of many."""
    return ", ".join(labels[:n]) + (f", ... ({len(labels)} in all)" if len(labels) > n else "")


def as_logits(probs: np.ndarray) -> np.ndarray:
    """Log-probabilities (N, C): logits up to a per-row constant, which softmax ignores."""
    return np.log(np.clip(probs, TINY, None))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true classes at ``temperature``."""
    z = logits / temperature
    m = z.max(axis=1, keepdims=True)
    log_norm = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
    return float((log_norm - z[np.arange(len(y)), y]).mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The T minimising the NLL of softmax(logits / T) on (logits, y).

    NLL is convex in 1/T, so a golden-section search over log T finds its minimum; T stays in
    :data:`T_RANGE`.
    """
    if len(y) == 0:
        return 1.0
    lo, hi = np.log(T_RANGE[0]), np.log(T_RANGE[1])
    ratio = (np.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(logits, y, np.exp(a)), nll(logits, y, np.exp(b))
    for _ in range(80):  # the bracket shrinks 0.618x a step: far below any meaningful digit of T
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(logits, y, np.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(logits, y, np.exp(b))
    return float(np.exp((lo + hi) / 2))


def reliability(probs: np.ndarray, y: np.ndarray, bins: int = BINS) -> dict:
    """Top-label reliability: per equal-width confidence bin, its count, mean confidence and accuracy."""
    conf, correct = probs.max(axis=1), (probs.argmax(axis=1) == y).astype(float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore"):
        confidence = np.bincount(which, conf, bins) / count
        accuracy = np.bincount(which, correct, bins) / count
    return {"edges": edges.tolist(), "count": count.tolist(),
            "confidence": [None if np.isnan(v) else float(v) for v in confidence],
            "accuracy": [None if np.isnan(v) else float(v) for v in accuracy]}


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = BINS) -> float:
    """Sum over bins of (share of examples) x |accuracy - mean confidence|."""
    r = reliability(probs, y, bins)
    n = max(len(y), 1)
    return float(sum(c / n * abs(a - p) for c, a, p in zip(r["count"], r["accuracy"], r["confidence"]) if c))


# -- one class's scores against the rest ---------------------------------------------------------------
def _counts(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """At each distinct score as threshold (highest first, ``score >= t`` is positive): (t, TP, FP)."""
    order = np.argsort(-scores, kind="mergesort")
    s, p = scores[order], positive[order].astype(np.int64)
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # the last index of each run of equal scores
    return s[last], np.cumsum(p)[last], np.cumsum(1 - p)[last]


def pr_curve(scores: np.ndarray, positive: np.ndarray) -> dict:
    """Precision and recall at every distinct threshold, highest threshold first."""
    t, tp, fp = _counts(scores, positive)
    return {"threshold": t, "precision": tp / (tp + fp), "recall": tp / max(int(positive.sum()), 1)}


def roc_curve(scores: np.ndarray, positive: np.ndarray) -> dict:
    """False- and true-positive rates, starting at (0, 0) (a threshold above every score)."""
    t, tp, fp = _counts(scores, positive)
    n_pos, n_neg = max(int(positive.sum()), 1), max(int((~positive).sum()), 1)
    return {"threshold": np.r_[np.inf, t], "fpr": np.r_[0.0, fp / n_neg], "tpr": np.r_[0.0, tp / n_pos]}


def pick_threshold(scores: np.ndarray, positive: np.ndarray, target: str, value: float) -> tuple[float, bool]:
    """(threshold, reached): the lowest threshold with precision >= value (the most recall that keeps the
    promise), or the highest with recall >= value. Unreachable precision: the threshold of best precision.

    The threshold sits halfway between the chosen validation score and the next lower one: the same
    decisions on validation, and a rounding difference elsewhere (bf16, another batch) cannot flip a text
    that sat exactly on it.
    """
    if not positive.any():
        raise UsageError("the validation split has no example of the positive class: no threshold can be picked")
    curve = pr_curve(scores, positive)
    reached = True
    if target == "recall":
        k = np.nonzero(curve["recall"] >= value - 1e-12)[0][0]
    else:
        ok = np.nonzero(curve["precision"] >= value - 1e-12)[0]
        reached = bool(len(ok))
        k = ok[-1] if reached else np.nonzero(curve["precision"] == curve["precision"].max())[0][-1]
    t = curve["threshold"]
    below = t[k + 1] if k + 1 < len(t) else 0.0
    return float((t[k] + below) / 2), reached


def precision_recall_at(scores: np.ndarray, positive: np.ndarray, threshold: float) -> dict:
    said = scores >= threshold
    tp, fp, fn = int((said & positive).sum()), int((said & ~positive).sum()), int((~said & positive).sum())
    return {"precision": tp / (tp + fp) if tp + fp else None, "recall": tp / (tp + fn) if tp + fn else None,
            "true_positives": tp, "false_positives": fp, "false_negatives": fn}


def decide(probs: np.ndarray, labels: list[str], thresholds: dict[str, float] | None) -> np.ndarray:
    """Class index per row. A class with a threshold is chosen when its probability reaches it (the most
    probable such class, if several); otherwise the most probable class without one. No thresholds: argmax."""
    if not thresholds:
        return probs.argmax(axis=1)
    has = np.array([name in thresholds for name in labels])
    t = np.array([thresholds.get(name, np.inf) for name in labels])
    reached = probs >= t  # (N, C); False wherever a class has no threshold
    chosen = np.where(reached, probs, -1.0).argmax(axis=1)
    rest = np.where(has, -1.0, probs).argmax(axis=1) if not has.all() else probs.argmax(axis=1)
    return np.where(reached.any(axis=1), chosen, rest)


@dataclass
class Calibration:
    """What calibration chose (the adapter keeps ``temperature`` and ``thresholds``) and what it measured."""

    temperature: float = 1.0
    thresholds: dict[str, float] = field(default_factory=dict)
    report: dict = field(default_factory=dict)

    def apply(self, probs: np.ndarray) -> np.ndarray:
        return softmax(as_logits(probs), self.temperature)


def calibrate(probs: dict[str, np.ndarray], y: dict[str, np.ndarray], labels: list[str],
              cfg: DecisionConfig) -> Calibration:
    """Temperature and threshold from the ``val`` split; both measured on every split (``test`` is the
    honest number). ``probs``: uncalibrated probabilities per split."""
    logits = {k: as_logits(p) for k, p in probs.items()}
    method = "temperature scaling" if cfg.calibrate else "none"
    if cfg.calibrate and not (probs["val"].argmax(axis=1) != y["val"]).any():
        # without a mistake the NLL falls forever as T -> 0: nothing to calibrate against
        method = "none: the validation split has no mistake to calibrate against"
    t = fit_temperature(logits["val"], y["val"]) if method == "temperature scaling" else 1.0
    report = {"method": method, "fitted_on": "val", "temperature": t, "bins": BINS, "splits": {}}
    for split in probs:
        after = softmax(logits[split], t)
        report["splits"][split] = {
            "nll_before": nll(logits[split], y[split]), "nll_after": nll(logits[split], y[split], t),
            "ece_before": expected_calibration_error(probs[split], y[split]),
            "ece_after": expected_calibration_error(after, y[split])}
    out = Calibration(t, {}, {"calibration": report})
    if cfg.target:
        out.thresholds, out.report["operating_point"] = _operating_point(
            {k: softmax(v, t) for k, v in logits.items()}, y, labels, cfg)
    return out


def _operating_point(probs: dict[str, np.ndarray], y: dict[str, np.ndarray], labels: list[str],
                     cfg: DecisionConfig) -> tuple[dict[str, float], dict]:
    name = cfg.positive_class(labels)
    k = labels.index(name)
    target, value = cfg.target
    threshold, reached = pick_threshold(probs["val"][:, k], y["val"] == k, target, value)
    if not reached:
        warnings.warn(f"no threshold reaches precision {value:g} for {name!r} on the validation split; "
                      f"using the one of best precision ({threshold:.4g})", stacklevel=2)
    point = {"class": name, "target": target, "value": value, "threshold": threshold, "reached_on_val": reached}
    for split, p in probs.items():
        point[split] = precision_recall_at(p[:, k], y[split] == k, threshold)
    return {name: threshold}, point



def thresholds_for(saved: dict[str, float], labels: list[str], override: float | dict | None) -> dict[str, float]:
    """The thresholds a call applies: the saved ones, or ``override`` (a number: for the saved threshold's
    class, or the second of two labels; a dict: class -> threshold)."""
    if override is None:
        return dict(saved)
    if isinstance(override, dict):
        unknown = [k for k in override if k not in labels]
        if unknown:
            raise UsageError(f"threshold for {unknown[0]!r}: not one of the labels {_some(labels)}")
        pairs = override.items()
    elif len(saved) == 1:
        pairs = [(next(iter(saved)), override)]
    elif len(labels) == 2:
        pairs = [(labels[1], override)]
    else:
        raise UsageError(f"a bare threshold needs a class with {len(labels)} classes: give CLASS=VALUE "
                         f"(one of {_some(labels)})")
    out = {str(k): float(v) for k, v in pairs}
    bad = [f"{k}={v:g}" for k, v in out.items() if not 0 <= v <= 1]
    if bad:
        raise UsageError(f"threshold {bad[0]}: a probability threshold is in [0, 1]")
    return out
