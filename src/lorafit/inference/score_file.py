"""Scoring a file of any length (``predict --file``): rows are read, tokenised and classified a chunk at a
time, so memory stays flat however long the file; the next chunk is read and tokenised in a background
thread while the model runs on this one (tiktoken's batch encoding runs in threads of its own and releases
the GIL), so the model is what sets the pace."""

from __future__ import annotations

import contextlib
import itertools
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from ..data.batching import encode_texts
from ..data.rows import Chunk, RowReader, RowWriter
from ..errors import LorafitError
from ..reporting.calibration import thresholds_for
from .predict import labelled, load_for_inference, predict_proba

PREDICTED, PROBABILITY, PROB_PREFIX = "predicted", "probability", "prob_"


@dataclass
class FileScore:
    """What one scoring pass did."""

    rows: int
    seconds: float  # reading, tokenising, the model and writing; the model's loading not included
    truncated: int  # texts cut to the model's window (none when the run chunks long texts)

    @property
    def texts_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("nan")


class FileScorer:
    """A saved run loaded once for inference (merged, in the chosen precision), scoring readers' chunks and
    deciding their labels as ``predict`` does (:func:`.predict.labelled`)."""

    def __init__(self, run: str | Path, *, device: str = "auto", precision: str = "auto", batch_size: int = 32,
                 threshold: float | dict | None = None):
        self.loaded = load_for_inference(run, device, precision)
        self.labels = self.loaded.labels
        self.thresholds = thresholds_for(self.loaded.spec.thresholds, self.labels, threshold)  # a bad one fails now
        self.batch_size, self.truncated = batch_size, 0

    @property
    def text_col(self) -> str | None:
        """The columns a file's texts are read from by default: a pair classifier's two training columns."""
        return ",".join(self.loaded.spec.text_pair.columns) if self.loaded.spec.pair else None

    def _encoded(self, reader: RowReader):
        backbone = self.loaded.backbone
        for chunk in reader.chunks():
            yield chunk, encode_texts(backbone.encoder, chunk.texts, None, backbone.context_length,
                                      where=f"--file {reader.path}", warn=False, pair=self.loaded.spec.pair,
                                      long=self.loaded.spec.long)

    def chunks(self, reader: RowReader) -> Iterator[tuple[Chunk, np.ndarray]]:
        """(chunk, class probabilities (n, C)) for each chunk of ``reader``, in the file's order."""
        source, backbone = self._encoded(reader), self.loaded.backbone
        with ThreadPoolExecutor(1, thread_name_prefix="lorafit-read") as pool:
            ahead = pool.submit(next, source, None)
            while (item := ahead.result()) is not None:
                ahead = pool.submit(next, source, None)  # the next chunk is read while this one is scored
                chunk, encoded = item
                self.truncated += encoded.truncated
                yield chunk, predict_proba(self.loaded.model, encoded, backbone.encoder.pad_id,
                                           batch_size=self.batch_size, compute=self.loaded.compute)
        if self.truncated:
            warnings.warn(f"--file {reader.path}: {self.truncated} text(s) longer than "
                          f"{self.loaded.spec.long.length(backbone.context_length)} tokens were truncated", stacklevel=2)

    def output_columns(self, reader: RowReader) -> list[str]:
        """The input's columns, then the prediction's; a name taken by both is refused."""
        ours = [PREDICTED, PROBABILITY, *(PROB_PREFIX + name for name in self.labels)]
        taken = next((c for c in ours if c in reader.columns), None)
        if taken is not None:
            raise LorafitError(f"--file {reader.path}: already has a column {taken!r}, which the prediction "
                               "writes; rename it")
        return [*reader.columns, *ours]

    def records(self, chunk: Chunk, probs: np.ndarray) -> list[dict]:
        """Each input row with its decided label (multi-label: the labels over their thresholds, joined by |),
        that label's probability and every label's."""
        return [{**row, PREDICTED: p["label"], PROBABILITY: round(p["probability"], 6) if "probability" in p else "",
                 **{PROB_PREFIX + name: round(q, 6) for name, q in p["probabilities"].items()}}
                for row, p in zip(chunk.rows, labelled(self.loaded, chunk.texts, probs, self.thresholds))]


def score_file(scorer: FileScorer, reader: RowReader, out: str | Path, *, progress: bool = True) -> FileScore:
    """Score every row of ``reader`` into ``out`` (CSV or JSON lines), with a progress bar on stderr; ``out``
    appears only when the whole file has been scored."""
    start = time.perf_counter()
    with contextlib.closing(scorer.chunks(reader)) as chunks:
        first = next(chunks, None)
        if first is None:
            raise LorafitError(f"--file {reader.path}: no texts to score")
        bar = tqdm(total=reader.count_lines(), unit=" texts", file=sys.stderr, disable=not progress,
                   mininterval=0.5, dynamic_ncols=True)
        with RowWriter(out, scorer.output_columns(reader)) as writer, bar:
            for chunk, probs in itertools.chain([first], chunks):
                writer.write(scorer.records(chunk, probs))
                bar.update(len(chunk.rows))
            bar.total = bar.n  # the line count was an estimate (blank lines, quoted line breaks)
    return FileScore(writer.written, time.perf_counter() - start, scorer.truncated)
