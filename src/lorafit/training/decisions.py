"""After training, what turns scores into decisions a person can trust: calibrated probabilities (a
temperature fitted on validation), an operating threshold when asked for, the figures that show both, and
the test messages the model got most wrong with the tokens that misled it.

The temperature and thresholds go into adapter.json, so that eval, predict, serve and the exports apply
them; report.json gets what was fitted and what it measured on every split.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..adapters.classifier import Classifier
from ..adapters.storage import ClassifierSpec, save_spec
from ..data.batching import Encoded, shown
from ..inference.evaluate import split_metrics
from ..inference.explain import classifier_forward, explain_ids, resolve_method, token_embedding
from ..reporting.calibration import Calibration, DecisionConfig, calibrate, decide, pr_curve, reliability, roc_curve
from ..reporting.metrics import roc_auc
from ..reporting.plots import plot_pr, plot_reliability, plot_roc
from ..runtime import Compute

FIGURES = ("reliability.png", "pr_curve.png", "roc_curve.png")
MOST_WRONG = 5  # test mistakes report.md explains


@dataclass
class Kept:
    """The kept classifier after training, for the explanations of its worst mistakes."""

    model: Classifier
    encoder: object  # lorafit.backbones.base.Encoder
    compute: Compute
    test_texts: list  # texts, or pairs of texts


def decide_run(out: Path, spec: ClassifierSpec, probs: dict[str, np.ndarray], enc: dict[str, Encoded],
               cfg: DecisionConfig, kept: Kept | None = None) -> tuple[ClassifierSpec, dict, dict]:
    """Calibrate on ``val``, pick the threshold, save them in the adapter, draw the figures; with ``kept``,
    explain the test messages the model got most wrong.

    ``probs``: the kept adapter's probabilities per split. Returns the completed spec, the metrics of the
    calibrated model (what ``lorafit eval`` gives), and report.json's calibration entries.
    """
    y = {k: e.labels for k, e in enc.items()}
    calib = calibrate(probs, y, spec.labels, cfg)
    spec = replace(spec, temperature=calib.temperature, thresholds=calib.thresholds)
    save_spec(out, spec)
    calibrated = {k: calib.apply(p) for k, p in probs.items()}
    draw(out, probs, calibrated, y, spec.labels, calib, cfg)
    report = dict(calib.report)
    if kept is not None and len(y.get("test", ())):
        report["most_wrong"] = most_wrong(kept, enc["test"], calibrated["test"], spec)
    return spec, split_metrics(calibrated, enc, spec.labels, spec.thresholds), report


def most_wrong(kept: Kept, test: Encoded, probs: np.ndarray, spec: ClassifierSpec, n: int = MOST_WRONG) -> list[dict]:
    """The ``n`` misclassified test texts of lowest probability for their true class, each with the tokens
    that pushed most towards the (wrong) decision."""
    labels = spec.labels
    decided = decide(probs, labels, spec.thresholds)
    p_true = probs[np.arange(len(test.labels)), test.labels]
    fits = (lambda i: True) if test.windows is None else (lambda i: test.windows.fits(test.ids[i]))
    # a chunked text is decided by several windows: the token attributions here read one sequence only
    wrong = [i for i in np.argsort(p_true, kind="stable") if decided[i] != test.labels[i] and fits(i)][:n]
    if not wrong:
        return []
    method, model = resolve_method("auto"), kept.model
    embedding = token_embedding(model.backbone)

    logits = classifier_forward(model, kept.compute)

    def forward(ids):  # the calibrated logits, as predict computes them
        return logits(ids) / spec.temperature

    was_training = model.training
    model.eval()
    rows = []
    for i in wrong:
        e = explain_ids(forward, embedding, kept.encoder, shown(kept.test_texts[i]), test.ids[i], labels, int(decided[i]),
                        method, refine=1)  # bounded after training: no refining (the gap is shown)
        rows.append({"text": e.text, "label": labels[test.labels[i]], "predicted": e.label, "p_true": float(p_true[i]),
                     "method": e.method, "top_tokens": e.top(3)})
    model.train(was_training)
    return rows


def draw_labels(out: Path, probs: dict[str, np.ndarray], y: dict[str, np.ndarray], labels: list[str],
                thresholds: dict[str, float]) -> None:
    """A multi-label run's pr_curve.png and roc_curve.png: every label against its absence on the held-out
    split, each with a star at its own threshold."""
    split = _shown_split(y)
    series, pr_points, roc_points = {}, {}, {}
    for k, name in enumerate(labels):
        scores, positive = probs[split][:, k], y[split][:, k].astype(bool)
        if not positive.any() or positive.all():
            continue
        key = f"{name} ({split})"
        series[key] = (scores, positive)
        if name in thresholds:
            called = scores >= thresholds[name]
            tp = int((called & positive).sum())
            if called.any():
                pr_points[key] = (tp / int(positive.sum()), tp / int(called.sum()))
            roc_points[key] = (int((called & ~positive).sum()) / int((~positive).sum()), tp / int(positive.sum()))
    title = f"each label against its absence, {split} split"
    plot_pr({s: pr_curve(*v) for s, v in series.items()}, pr_points, "its threshold", f"Precision-recall: {title}",
            out / FIGURES[1])
    plot_roc({s: {**roc_curve(*v), "auc": roc_auc(v[1].astype(int), v[0])} for s, v in series.items()},
             roc_points, "its threshold", f"ROC: {title}", out / FIGURES[2])


def _shown_split(y: dict[str, np.ndarray]) -> str:
    """The held-out split the figures show: test, or val when there is no test."""
    return "test" if len(y.get("test", ())) else "val"


def draw(out: Path, before: dict[str, np.ndarray], after: dict[str, np.ndarray], y: dict[str, np.ndarray],
         labels: list[str], calib: Calibration, cfg: DecisionConfig) -> None:
    """reliability.png (held-out split, before and after), pr_curve.png and roc_curve.png (calibrated)."""
    split = _shown_split(y)
    stats = calib.report["calibration"]["splits"][split]
    plot_reliability(reliability(before[split], y[split]), reliability(after[split], y[split]),
                     (stats["ece_before"], stats["ece_after"]), calib.temperature, split, out / FIGURES[0])
    point = calib.report.get("operating_point")
    if len(labels) == 2 or point:
        name = point["class"] if point else (cfg.positive or labels[1])
        k = labels.index(name)
        series = {s: (after[s][:, k], y[s] == k) for s in ("val", "test") if len(y.get(s, ()))}
        title = f"{name} against the rest"
    else:  # one-vs-rest per class on the held-out split
        series = {f"{name} ({split})": (after[split][:, k], y[split] == k) for k, name in enumerate(labels)}
        title = f"each class against the rest, {split} split"
    series = {s: v for s, v in series.items() if v[1].any() and not v[1].all()}
    pr_points, roc_points, rule = {}, {}, ""
    if point:
        rule = f"P({point['class']}) >= {point['threshold']:.3g}"
        for s, (_, positive) in series.items():
            at = point[s]
            if at["precision"] is not None:
                pr_points[s] = (at["recall"], at["precision"])
            roc_points[s] = (at["false_positives"] / int((~positive).sum()), at["recall"])
    plot_pr({s: pr_curve(*v) for s, v in series.items()}, pr_points, rule, f"Precision-recall: {title}",
            out / FIGURES[1])
    plot_roc({s: {**roc_curve(*v), "auc": roc_auc(v[1].astype(int), v[0])} for s, v in series.items()},
             roc_points, rule, f"ROC: {title}", out / FIGURES[2])
