"""Token batches padded to their own longest sequence, never to the dataset's longest or the context.

Training order: shuffle, then sort by length inside chunks of ``bucket`` batches, then shuffle the
batches — most padding disappears while every epoch still sees a fresh random order. Evaluation
sorts everything by length (results are put back in the input order).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd
import torch

from .datasets import encode_labels


@dataclass
class Encoded:
    ids: list[list[int]]
    labels: np.ndarray | None  # (N,) class indices, (N, C) 0/1 rows for multi-label, or None for unlabelled texts
    truncated: int  # how many texts were cut to the context length


def encode_texts(encoder, texts: list[str], labels: np.ndarray | None, context_length: int, where: str = "data",
                 warn: bool = True) -> Encoded:
    """Tokenise; texts longer than the context keep their first ``context_length`` tokens, with a warning
    (``warn=False``: counted only, for a caller that warns once about many calls)."""
    ids = encoder.encode(list(texts))
    truncated = sum(len(x) > context_length for x in ids)
    if truncated and warn:
        warnings.warn(f"{where}: {truncated} text(s) longer than {context_length} tokens were truncated", stacklevel=2)
    if truncated:
        ids = [x[:context_length] for x in ids]
    ids = [x if x else [encoder.pad_id] for x in ids]  # an empty encoding still needs one position
    return Encoded(ids, labels, truncated)


def encode_frame(encoder, context_length: int, df: pd.DataFrame, labels: list[str], where: str,
                 multi_label: bool = False) -> Encoded:
    """A (text, label) frame, tokenised, with class indices for ``labels`` (multi-label: 0/1 rows)."""
    return encode_texts(encoder, df["text"].tolist(), encode_labels(df, labels, where, multi_label), context_length,
                        where=where)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) right-padded
    attention_mask: torch.Tensor  # (B, T) 1 on real tokens
    labels: torch.Tensor | None  # (B,) class indices, or (B, C) float 0/1 for multi-label
    index: np.ndarray  # (B,) positions of these rows in the dataset

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device),
                     None if self.labels is None else self.labels.to(device), self.index)


def collate(data: Encoded, index: np.ndarray, pad_id: int) -> Batch:
    seqs = [data.ids[i] for i in index]
    t = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for row, s in enumerate(seqs):
        input_ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[row, : len(s)] = 1
    labels = None if data.labels is None else torch.as_tensor(
        data.labels[index], dtype=torch.float32 if data.labels.ndim == 2 else torch.long)
    return Batch(input_ids, mask, labels, index)


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


def iterate(data: Encoded, order: list[np.ndarray], pad_id: int) -> Iterator[Batch]:
    for index in order:
        yield collate(data, index, pad_id)


def lengths_of(data: Encoded) -> np.ndarray:
    return np.array([len(x) for x in data.ids])
