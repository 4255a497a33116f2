"""Two texts read as one sequence (paraphrase, entailment, question and answer): how each base joins a pair.

A base whose tokenizer has a pair template of its own (BERT's ``[CLS] a [SEP] b [SEP]``, Llama's
``<s> a <s> b``) joins pairs with it, exactly as transformers' ``tokenizer(a, b)`` does (``template``).
GPT-2's tokenizer puts nothing between two texts (``tokenizer(a, b)`` is ``a`` and ``b`` run together),
and neither do tokenizers built like it (SmolLM2's): lorafit puts the end-of-text token between them,
inside the single-text template (``sep``: ``a <|endoftext|> b``), and the exports write that template into
tokenizer.json so that transformers reproduces it. The join is stored in adapter.json (``text_pair``), so
eval, predict, serve and the exports join pairs the same way without being told, and a base whose
tokenizer would join them otherwise is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

JOINS = ("sep", "template")


@dataclass(frozen=True)
class PairJoin:
    """How a classifier's base reads a pair of texts, and which data columns the pairs came from."""

    join: str | None = None  # "sep" or "template" (see the module); None: not decided yet (the base decides)
    sep: str | None = None  # "sep": the token between the two texts
    columns: tuple[str, str] = ("text", "text_pair")  # the training data's columns: predict --file's defaults

    def to_dict(self) -> dict:
        return {"join": self.join, "sep": self.sep, "columns": list(self.columns)}

    @classmethod
    def from_dict(cls, d: dict | None) -> "PairJoin | None":
        if d is None:
            return None
        return cls(d.get("join"), d.get("sep"), tuple(d.get("columns") or ("text", "text_pair")))

    def describe(self) -> str:
        """The join in words, for messages and model cards."""
        if self.join == "sep":
            return f"first text, {self.sep}, second text"
        return "the tokenizer's own pair template"


def truncate_longest_first(first: list[int], second: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Both texts' ids cut to ``budget`` ids together as transformers' default ``longest_first`` truncation
    cuts them (the rule of the tokenizers library, so that exported tokenizers truncate pairs the same): the
    shorter text keeps its length while it fits beside the longer one's rest, else both get half."""
    short, long_ = sorted((len(first), len(second)))
    if short + long_ <= budget:
        return first, second
    long_ = long_ if short > budget else max(short, budget - short)
    if short + long_ > budget:
        short, long_ = budget // 2, budget // 2 + budget % 2
    a, b = (long_, short) if len(first) > len(second) else (short, long_)
    return first[:a], second[:b]


def join_ids(firsts: list[list[int]], seconds: list[list[int]], prefix: list[int], middle: list[int],
             suffix: list[int], max_length: int | None) -> tuple[list[list[int]], int]:
    """``prefix + a + middle + b + suffix`` for every pair of ids, both texts cut longest first (see
    :func:`truncate_longest_first`) to fit ``max_length``; the joined ids and how many pairs were cut."""
    fixed, out, cut = len(prefix) + len(middle) + len(suffix), [], 0
    for a, b in zip(firsts, seconds):
        if max_length is not None and len(a) + len(b) + fixed > max_length:
            a, b = truncate_longest_first(a, b, max(max_length - fixed, 0))
            cut += 1
        out.append([*prefix, *a, *middle, *b, *suffix])
    return out, cut


def split_pairs(pairs: Sequence[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """[(a, b), ...] -> ([a, ...], [b, ...])."""
    return [a for a, _ in pairs], [b for _, b in pairs]
