"""The metrics a classifier report needs, computed from probabilities, without scikit-learn."""

from __future__ import annotations

import numpy as np
import pandas as pd

LABEL_THRESHOLD = 0.5  # a multi-label classifier's label is on at this sigmoid, unless the run chose its own


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float | None:
    """Area under the ROC curve via the rank-sum (Mann-Whitney) statistic; ties get average ranks."""
    pos = y_true == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = pd.Series(score).rank(method="average").to_numpy()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, labels: list[str],
                           pred: np.ndarray | None = None) -> dict:
    """Accuracy, loss, per-class precision/recall/F1, confusion matrix (rows: true) and ROC-AUC
    (binary: of the second class's probability; more classes: macro one-vs-rest). ``pred``: the decisions
    when they are not the most probable class (an operating threshold)."""
    k = len(labels)
    pred = probs.argmax(axis=1) if pred is None else pred
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y_true, pred), 1)
    per_class = {}
    for i, name in enumerate(labels):
        tp, fp, fn = cm[i, i], cm[:, i].sum() - cm[i, i], cm[i, :].sum() - cm[i, i]
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        per_class[name] = {"precision": float(p), "recall": float(r),
                           "f1": float(2 * p * r / (p + r)) if p + r else 0.0, "support": int(cm[i, :].sum())}
    if k == 2:
        auc = roc_auc(y_true, probs[:, 1])
    else:
        aucs = [roc_auc((y_true == i).astype(int), probs[:, i]) for i in range(k)]
        aucs = [a for a in aucs if a is not None]
        auc = float(np.mean(aucs)) if aucs else None
    n = len(y_true)
    loss = float(-np.log(np.clip(probs[np.arange(n), y_true], 1e-12, None)).mean()) if n else float("nan")
    return {"n": n, "accuracy": float((pred == y_true).mean()) if n else float("nan"), "loss": loss,
            "per_class": per_class, "macro_f1": float(np.mean([c["f1"] for c in per_class.values()])),
            "roc_auc": auc, "confusion_matrix": cm.tolist()}


def _prf(tp: float, fp: float, fn: float) -> tuple[float, float, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return float(p), float(r), float(2 * p * r / (p + r)) if p + r else 0.0


def best_f1_threshold(y_true: np.ndarray, score: np.ndarray, default: float = LABEL_THRESHOLD) -> float:
    """The score threshold (predict positive when ``score >= t``) with the highest F1 on ``y_true`` (0/1):
    one-vs-rest, so it serves binary decisions and each label of a multi-label classifier alike. Ties go
    to the threshold nearest ``default``; without positives (or negatives) the answer is ``default``."""
    y = np.asarray(y_true).astype(bool)
    if y.all() or not y.any():
        return default
    order = np.argsort(-score, kind="stable")
    s, hits = score[order], y[order]
    tp = np.cumsum(hits)  # predicting the first k+1 (highest) scores as positive
    fp = np.cumsum(~hits)
    f1 = 2 * tp / (tp + fp + y.sum())
    last = np.r_[s[1:] != s[:-1], True]  # a threshold can only split between different scores
    f1 = np.where(last, f1, -1.0)
    below = np.r_[s[1:], s[-1] - 1.0]
    cuts = np.where(last, (s + below) / 2, np.inf)  # midway to the next lower score
    best = f1.max()
    candidates = cuts[np.isclose(f1, best)]
    return float(candidates[np.argmin(np.abs(candidates - default))])


def multilabel_metrics(y_true: np.ndarray, probs: np.ndarray, labels: list[str],
                       thresholds: list[float] | None = None) -> dict:
    """Multi-label metrics from (N, C) 0/1 targets and per-label probabilities: ``accuracy`` is subset
    accuracy (every label right), loss the mean binary cross-entropy, micro and macro F1, Hamming loss,
    per-label precision/recall/F1/support at ``thresholds`` (default :data:`LABEL_THRESHOLD` each), macro ROC-AUC over labels."""
    n, k = y_true.shape
    t = np.full(k, LABEL_THRESHOLD) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    pred = probs >= t  # (N, C)
    y = y_true.astype(bool)
    tp, fp, fn = (pred & y).sum(0), (pred & ~y).sum(0), (~pred & y).sum(0)
    per_class = {}
    for i, name in enumerate(labels):
        p, r, f = _prf(tp[i], fp[i], fn[i])
        per_class[name] = {"precision": p, "recall": r, "f1": f, "support": int(y[:, i].sum()),
                           "predicted": int(pred[:, i].sum()), "threshold": float(t[i])}
    aucs = [a for a in (roc_auc(y[:, i].astype(int), probs[:, i]) for i in range(k)) if a is not None]
    q = np.clip(probs, 1e-12, 1 - 1e-12)
    loss = float(-(y * np.log(q) + ~y * np.log(1 - q)).mean()) if n else float("nan")
    return {"n": n, "multi_label": True, "accuracy": float((pred == y).all(1).mean()) if n else float("nan"),
            "loss": loss, "per_class": per_class, "macro_f1": float(np.mean([c["f1"] for c in per_class.values()])),
            "micro_f1": _prf(tp.sum(), fp.sum(), fn.sum())[2],
            "hamming_loss": float((pred != y).mean()) if n else float("nan"),
            "roc_auc": float(np.mean(aucs)) if aucs else None, "confusion_matrix": None, "thresholds": t.tolist()}


def label_thresholds(y_true: np.ndarray, probs: np.ndarray) -> list[float]:
    """Per-label thresholds of a multi-label classifier: each label's :func:`best_f1_threshold`."""
    return [best_f1_threshold(y_true[:, i], probs[:, i]) for i in range(y_true.shape[1])]


def metrics_for(y_true: np.ndarray, probs: np.ndarray, labels: list[str], thresholds: list[float] | None = None) -> dict:
    """:func:`multilabel_metrics` for (N, C) targets, else :func:`classification_metrics`."""
    if y_true.ndim == 2:
        return multilabel_metrics(y_true, probs, labels, thresholds)
    return classification_metrics(y_true, probs, labels)
