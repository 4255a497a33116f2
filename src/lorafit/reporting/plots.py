"""PNG figures a person would rather look at than read: loss, accuracy, confusion matrix, reliability,
precision-recall and ROC curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..files import atomic_path


def _subplots(figsize: tuple[float, float], ncols: int = 1):
    """A figure of its own, drawn to files only: pyplot's global state and the user's backend stay untouched."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(1, ncols)


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")


def _epoch_axis(ax, records: list[dict]) -> None:
    """A second x axis in examples seen, under the epochs axis, as in the book's figure."""
    if not records:
        return
    top = ax.twiny()
    top.plot([r["examples_seen"] for r in records], [r["loss"] for r in records], alpha=0)
    top.set_xlabel("examples seen")


def plot_loss(train: list[dict], val: list[dict], epochs: list[dict], path: Path) -> None:
    fig, ax = _subplots((6.5, 4))
    ax.plot([r["epoch"] for r in train], [r["loss"] for r in train], label="training loss", lw=1, alpha=0.8)
    if len(train) > 10:
        k = max(2, len(train) // 20)
        smooth = np.convolve([r["loss"] for r in train], np.ones(k) / k, mode="valid")
        ax.plot([r["epoch"] for r in train][k - 1:], smooth, label=f"training loss ({k}-step mean)", lw=2)
    if val:
        ax.plot([r["epoch"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss (slice)", ms=3)
    full = [r for r in epochs if r.get("val_loss") is not None]
    if full:
        ax.plot([r["epoch"] for r in full], [r["val_loss"] for r in full], "s", label="validation loss (full)", ms=6)
    ax.set_xlabel("epochs")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title("Loss")
    ax.legend()
    _epoch_axis(ax, train)
    _save(fig, path)


def plot_accuracy(val: list[dict], epochs: list[dict], final: dict[str, float], path: Path) -> None:
    fig, ax = _subplots((6.5, 4))
    if val:
        ax.plot([r["epoch"] for r in val], [100 * r["val_accuracy"] for r in val], "o-", ms=3,
                label="validation accuracy (slice)")
    full = [r for r in epochs if r.get("val_accuracy") is not None]
    if full:
        ax.plot([r["epoch"] for r in full], [100 * r["val_accuracy"] for r in full], "s-", ms=6,
                label="validation accuracy (full)")
    for i, (name, acc) in enumerate(final.items()):
        ax.axhline(100 * acc, ls="--", lw=1, color=f"C{i + 2}", label=f"final {name}: {100 * acc:.2f} %")
    ax.set_xlabel("epochs")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy")
    ax.legend(loc="lower right")
    _save(fig, path)


def plot_confusion(cm: list[list[int]], labels: list[str], path: Path, title: str = "Test confusion matrix") -> None:
    cm = np.asarray(cm)
    fig, ax = _subplots((1.2 * len(labels) + 2.5, 1.2 * len(labels) + 2))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    _save(fig, path)


def plot_validation_curves(curves: dict[str, list[dict]], path: Path) -> None:
    """Several runs' validation loss and accuracy against examples seen, overlaid: lines for the
    validation slices (``eval`` records), squares for the full validation at each epoch's end."""
    fig, axes = _subplots((11, 4), 2)
    for i, (name, records) in enumerate(curves.items()):
        for ax, key, scale in ((axes[0], "val_loss", 1), (axes[1], "val_accuracy", 100)):
            for event, style in (("eval", dict(ls="-", marker="o", ms=2, lw=1.2, label=name)),
                                 ("epoch", dict(ls="none", marker="s", ms=7))):
                rs = [r for r in records if r["event"] == event and r.get(key) is not None]
                ax.plot([r["examples_seen"] for r in rs], [scale * r[key] for r in rs], color=f"C{i}", **style)
    for ax, title in ((axes[0], "validation loss"), (axes[1], "validation accuracy (%)")):
        ax.set_xlabel("examples seen")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(title="lines: slices, squares: full set", fontsize=8)
    _save(fig, path)


def plot_reliability(before: dict, after: dict, ece: tuple[float, float], temperature: float, split: str,
                     path: Path) -> None:
    """Reliability diagram: accuracy against confidence per bin, before and after temperature scaling;
    the diagonal is perfect calibration, bar widths follow the bins, marker areas their counts."""
    fig = Figure(figsize=(6, 6.4))
    ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    edges = np.asarray(before["edges"])
    mids = (edges[:-1] + edges[1:]) / 2
    for i, (name, r, e) in enumerate((("before", before, ece[0]), (f"after (T = {temperature:.3g})", after, ece[1]))):
        keep = [k for k, c in enumerate(r["count"]) if c]
        ax.plot([r["confidence"][k] for k in keep], [r["accuracy"][k] for k in keep], "o-", color=f"C{i}",
                label=f"{name}: ECE {100 * e:.2f} %")
        hist.bar(mids + (i - 0.5) * 0.45 * (edges[1] - edges[0]), r["count"], width=0.45 * (edges[1] - edges[0]),
                 color=f"C{i}", label=name)
    lo = min(0.5, *(v for r in (before, after) for v in r["confidence"] if v is not None)) - 0.02
    ax.set_xlim(lo, 1.01)
    ax.set_ylim(min(lo, *(v for r in (before, after) for v in r["accuracy"] if v is not None)) - 0.02, 1.01)
    ax.set_ylabel("accuracy in bin")
    ax.set_title(f"Reliability on the {split} split (top-label confidence)")
    ax.legend(loc="upper left", fontsize=9)
    ax.grid(alpha=0.3)
    hist.set_yscale("log")
    hist.set_xlabel("confidence (probability of the predicted class)")
    hist.set_ylabel("texts")
    _save(fig, path)


def _star(ax, xy: tuple[float, float], colour: int, label: str) -> None:
    """The operating point on a curve: a star in the curve's colour (``C{colour}``)."""
    ax.plot([xy[0]], [xy[1]], marker="*", ms=15, ls="none", color=f"C{colour}", markeredgecolor="black", label=label)


def plot_pr(curves: dict[str, dict], points: dict[str, tuple[float, float]], rule: str, title: str,
            path: Path) -> None:
    """Precision against recall, one line per curve; ``points``: curve name -> (recall, precision) of the
    operating threshold ``rule`` on it, a star in the curve's colour."""
    fig, ax = _subplots((6, 4.6))
    for i, (name, c) in enumerate(curves.items()):
        ax.step(np.r_[0.0, c["recall"]], np.r_[1.0, c["precision"]], where="post", color=f"C{i}", label=name)
        if name in points:
            r, p = points[name]
            _star(ax, (r, p), i, f"{rule} on {name}: recall {100 * r:.1f} %, precision {100 * p:.1f} %")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.01)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    _save(fig, path)


def plot_roc(curves: dict[str, dict], points: dict[str, tuple[float, float]], rule: str, title: str,
             path: Path) -> None:
    """True- against false-positive rate, one line per curve (``name`` -> curve with its ``auc``);
    ``points``: curve name -> (fpr, tpr) of the operating threshold ``rule``, a star in the curve's colour."""
    fig, ax = _subplots((6, 4.6))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    for i, (name, c) in enumerate(curves.items()):
        ax.plot(c["fpr"], c["tpr"], color=f"C{i}", label=f"{name} (AUC {c['auc']:.4f})")
        if name in points:
            f, t = points[name]
            _star(ax, (f, t), i, f"{rule} on {name}: FPR {100 * f:.2f} %, TPR {100 * t:.1f} %")
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate (recall)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)
