"""Runs side by side after a small sweep: one table of settings and results, one figure of their
validation curves (what ``lorafit compare`` prints and draws)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import FieldError, LorafitError
from ..files import read_json
from .plots import plot_validation_curves
from .report import percent

HEADER = ("run", "rank", "alpha", "lr", "epochs", "precision", "val acc", "test acc", "test macro F1", "s / epoch",
          "peak memory")


@dataclass
class RunSummary:
    name: str  # the directory as the user gave it
    report: dict  # report.json
    curve: list[dict]  # the eval and epoch records of metrics.jsonl

    def row(self) -> tuple[str, ...]:
        r = self.report
        lora, speed, metrics = r["model"]["lora"], r["speed"], r["metrics"]
        epochs = len(r["epochs"])
        f1 = f"{metrics['test']['macro_f1']:.4f}" if "test" in metrics else "n/a"
        memory = (f"{speed['peak_gpu_mb']:,.0f} MiB GPU" if "peak_gpu_mb" in speed
                  else f"{speed['peak_rss_mb']:,.0f} MiB RSS")
        return (self.name, str(lora["rank"]), f"{lora['alpha']:g}", f"{r['train']['lr']:g}", str(epochs),
                speed["precision"], percent(metrics.get("val", {}).get("accuracy")),
                percent(metrics.get("test", {}).get("accuracy")), f1, f"{speed['train_seconds'] / epochs:.1f}", memory)


def read_summary(directory: str | Path) -> RunSummary:
    """A finished run's report and validation records; a folder that is not one is refused in one line."""
    d = Path(directory)
    if not d.is_dir():
        raise LorafitError(f"{d}: not found (expected a run directory written by lorafit train)")
    path = d / "report.json"
    if not path.is_file():
        raise LorafitError(f"{d}: not a finished lorafit run (no report.json; an interrupted run has none "
                           f"until it is resumed)")
    report = read_json(path)
    summary = RunSummary(str(directory), report, [])
    try:
        summary.row()
    except (KeyError, TypeError, ZeroDivisionError) as e:
        raise LorafitError(f"{path}: not a lorafit run report (missing or bad {e})") from e
    metrics = d / "metrics.jsonl"
    lines = metrics.read_text(encoding="utf-8").splitlines() if metrics.is_file() else []
    try:
        records = [json.loads(line) for line in lines if line.strip()]
    except json.JSONDecodeError as e:
        raise LorafitError(f"{metrics}: not valid JSON lines ({e})") from e
    summary.curve = [r for r in records if r.get("event") in ("eval", "epoch")] or report["epochs"]
    return summary


def format_table(runs: list[RunSummary]) -> str:
    """A Markdown table: readable in a terminal, pasteable into a README."""
    rows = [HEADER, *(r.row() for r in runs)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    right = [i > 0 for i in range(len(HEADER))]
    line = lambda row: "| " + " | ".join(c.rjust(w) if r else c.ljust(w)  # noqa: E731
                                         for c, w, r in zip(row, widths, right)) + " |"
    rule = "|" + "|".join("-" * (w + 1) + (":" if r else "-") for w, r in zip(widths, right)) + "|"
    return "\n".join([line(HEADER), rule, *(line(row) for row in rows[1:])])


def expand_tune_folders(directories: list[str | Path]) -> list[str | Path]:
    """A ``lorafit tune`` folder stands for its finished trials (pruned ones have no report)."""
    out = []
    for d in directories:
        if (Path(d) / "study.journal").is_file():
            out += sorted(str(t) for t in Path(d).glob("trial-*") if (t / "report.json").is_file())
        else:
            out.append(d)
    return out


def compare_runs(directories: list[str | Path], png: str | Path) -> str:
    """Load every run (all refused before anything is drawn), write the overlaid curves, return the table."""
    runs = [read_summary(d) for d in expand_tune_folders(directories)]
    try:
        plot_validation_curves({r.name: r.curve for r in runs}, Path(png))
    except OSError as e:
        raise FieldError("{png} {}: cannot write ({})", png, e.strerror or e) from e
    return format_table(runs)
