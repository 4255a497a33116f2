"""PNG figures a person would rather look at than read: loss, accuracy, confusion matrix."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..files import atomic_path  # noqa: E402


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)


def _epoch_axis(ax, records: list[dict]) -> None:
    """A second x axis in examples seen, under the epochs axis, as in the book's figure."""
    if not records:
        return
    top = ax.twiny()
    top.plot([r["examples_seen"] for r in records], [r["loss"] for r in records], alpha=0)
    top.set_xlabel("examples seen")


def plot_loss(train: list[dict], val: list[dict], epochs: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4))
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
    fig, ax = plt.subplots(figsize=(6.5, 4))
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
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2.5, 1.2 * len(labels) + 2))
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
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
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
