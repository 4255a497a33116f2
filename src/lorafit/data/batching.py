"""Token batches padded to their own longest sequence, never to the dataset's longest or the context.

Training order: shuffle, then sort by length inside chunks of ``bucket`` batches, then shuffle the
batches — most padding disappears while every epoch still sees a fresh random order. Evaluation
sorts everything by length (results are put back in the input order). Texts chunked into windows
(:mod:`.windows`) are cut when their batch is made: a batch of texts holds all their windows as rows.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd
import torch

from ..errors import LorafitError, SettingError
from .datasets import TEXT, TEXT_PAIR, encode_labels
from .windows import LongTexts, Windows, frame_of, pool_windows

Input = str | tuple[str, str]  # one text, or a pair of texts (a pair classifier's input)


@dataclass
class Encoded:
    ids: list[list[int]]  # each text's tokens (whole when chunked: cut into windows per batch)
    labels: np.ndarray | None  # (N,) class indices, (N, C) 0/1 rows for multi-label, or None for unlabelled texts
    truncated: int  # how many texts were cut to the context length
    windows: Windows | None = None  # chunked: how each text is cut (None: every text is one row)

    @property
    def chunked(self) -> int:
        """Texts longer than one window."""
        return 0 if self.windows is None else sum(len(x) > self.windows.size for x in self.ids)

    @property
    def n_windows(self) -> int:
        """Rows the model runs on: every window of every text."""
        return len(self.ids) if self.windows is None else sum(self.windows.count(len(x)) for x in self.ids)

    def subset(self, n: int) -> "Encoded":
        """The first ``n`` texts."""
        return Encoded(self.ids[:n], None if self.labels is None else self.labels[:n], 0, self.windows)


def pairs_of(texts: list, where: str, pair: bool | None = None) -> list[tuple[str, str]] | None:
    """``texts`` as pairs (every input two texts: a list or tuple), or None (every input one text); mixed
    inputs are refused, as is the wrong kind for a classifier of single texts (``pair=False``) or of pairs
    (``pair=True``)."""
    is_pair = [isinstance(t, (list, tuple)) for t in texts]
    if any(is_pair) and not all(is_pair):
        raise LorafitError(f"{where}: input {is_pair.index(not is_pair[0])} is {'one text' if is_pair[0] else 'a pair'}"
                           f", input 0 {'a pair' if is_pair[0] else 'one text'}: give every input the same way")
    bad = next((i for i, t in enumerate(texts) if is_pair[i] and (len(t) != 2 or not all(isinstance(x, str) for x in t))), None)
    if bad is not None:
        raise LorafitError(f"{where}: input {bad} is not a pair of two texts")
    given = bool(texts) and all(is_pair)
    if pair is not None and texts and given != pair:
        raise LorafitError(f"{where}: the model classifies {'pairs of texts' if pair else 'single texts'}; "
                           f"got {'pairs' if given else 'single texts'}")
    return [tuple(t) for t in texts] if given else None


def encode_texts(encoder, texts: list[Input], labels: np.ndarray | None, context_length: int, where: str = "data",
                 warn: bool = True, pair: bool | None = None, long: LongTexts | None = None) -> Encoded:
    """Tokenise; texts longer than the window (``long.max_length``, else the context) keep their first
    tokens, with a warning (``warn=False``: counted only, for a caller that warns once about many calls), or
    with ``long.long == "chunk"`` are kept whole, to be cut into windows per batch. Pairs of texts (see
    :func:`pairs_of`; ``pair``: what the model takes) are joined as the encoder joins them and cut longest
    first (never chunked: which window would hold which text?)."""
    long = long or LongTexts()
    pairs = pairs_of(list(texts), where, pair)
    windows = long.windows(context_length, frame_of(encoder))
    limit = long.length(context_length)
    if pairs is not None:
        if windows is not None:
            raise SettingError("{long} chunk reads single texts; pairs of texts are cut longest first to the window")
        ids, truncated = encoder.encode_pairs(pairs, limit)
    else:
        ids = encoder.encode(list(texts))
        truncated = 0 if windows is not None else sum(len(x) > limit for x in ids)
        if truncated:
            ids = [x[:limit] for x in ids]
    if truncated and warn:
        what = "pair(s) of texts" if pairs is not None else "text(s)"
        warnings.warn(f"{where}: {truncated} {what} longer than {limit} tokens were truncated", stacklevel=2)
    ids = [x if x else [encoder.pad_id] for x in ids]  # an empty encoding still needs one position
    return Encoded(ids, labels, truncated, windows)


def encode_frame(encoder, context_length: int, df: pd.DataFrame, labels: list[str], where: str,
                 multi_label: bool = False, long: LongTexts | None = None) -> Encoded:
    """A (text, label) frame (or text, text_pair, label), tokenised, with class indices for ``labels``
    (multi-label: 0/1 rows)."""
    return encode_texts(encoder, frame_inputs(df), encode_labels(df, labels, where, multi_label), context_length,
                        where=where, long=long)


def frame_inputs(df: pd.DataFrame) -> list[Input]:
    """A frame's texts, or its pairs of texts (``text``, ``text_pair``)."""
    if TEXT_PAIR in df.columns:
        return list(zip(df[TEXT].tolist(), df[TEXT_PAIR].tolist()))
    return df[TEXT].tolist()


def shown(text: Input) -> str:
    """An input as one line of text for reports and explanations: a pair as ``a ‖ b``."""
    return text if isinstance(text, str) else f"{text[0]} \u2016 {text[1]}"


def text_fields(text: Input) -> dict:
    """An input as a prediction's fields: ``text``, and ``text_pair`` for a pair (transformers' names)."""
    return {TEXT: text} if isinstance(text, str) else {TEXT: text[0], TEXT_PAIR: text[1]}


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) right-padded
    attention_mask: torch.Tensor  # (B, T) 1 on real tokens
    labels: torch.Tensor | None  # (B,) class indices, or (B, C) float 0/1 for multi-label
    index: np.ndarray  # (B,) positions of these texts in the dataset
    owner: torch.Tensor | None = None  # chunked: (R,) the text (0..B-1) each of the R rows is a window of
    pool: str = "mean"  # chunked: how a text's window logits become its own

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device),
                     None if self.labels is None else self.labels.to(device), self.index,
                     None if self.owner is None else self.owner.to(device), self.pool)

    def pooled(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's row logits (R, C) -> one row per text (B, C): chunked texts' windows pooled."""
        return logits if self.owner is None else pool_windows(logits, self.owner, len(self.index), self.pool)


INFERENCE_MULTIPLE = 8  # inference batches are padded to a multiple of this length: see padded_length


def padded_length(longest: int, multiple: int = 1) -> int:
    """A batch's padded length: its longest sequence rounded up to ``multiple``. Inference rounds (to
    ``INFERENCE_MULTIPLE``) so that a stream of batches meets few distinct shapes: oneDNN builds kernels and
    scratch per shape, and scoring 10,000 texts in bf16 grew RSS by 212-260 MiB without it (issue 22).
    The padding is masked, so results do not change."""
    return -(-longest // multiple) * multiple


def collate(data: Encoded, index: np.ndarray, pad_id: int, multiple: int = 1) -> Batch:
    seqs, owner = [data.ids[i] for i in index], None
    if data.windows is not None:
        seqs, owner = data.windows.split(seqs)
    t = padded_length(max(len(s) for s in seqs), multiple)
    input_ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for row, s in enumerate(seqs):
        input_ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[row, : len(s)] = 1
    labels = None if data.labels is None else torch.as_tensor(
        data.labels[index], dtype=torch.float32 if data.labels.ndim == 2 else torch.long)
    return Batch(input_ids, mask, labels, index, owner, data.windows.pool if data.windows else "mean")


def train_order(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, bucket: int = 32) -> list[np.ndarray]:
    """Batches of indices for one epoch: shuffled, length-sorted within chunks of ``bucket`` batches
    (``bucket`` 1 or 0 turns sorting off), then the batches shuffled."""
    order = rng.permutation(len(lengths))
    if bucket > 1:
        chunk = batch_size * bucket
        order = np.concatenate([c[np.argsort(lengths[c], kind="stable")]
                                for c in np.array_split(order, max(1, -(-len(order) // chunk)))])
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))] if bucket > 1 else batches


def eval_order(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    order = np.argsort(lengths, kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def iterate(data: Encoded, order: list[np.ndarray], pad_id: int, multiple: int = 1) -> Iterator[Batch]:
    for index in order:
        yield collate(data, index, pad_id, multiple)


def lengths_of(data: Encoded) -> np.ndarray:
    return np.array([len(x) for x in data.ids])
