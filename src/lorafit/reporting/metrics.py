"""The metrics a classifier report needs, computed from probabilities, without scikit-learn."""

from __future__ import annotations

import numpy as np
import pandas as pd


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
