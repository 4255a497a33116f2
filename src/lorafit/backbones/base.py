"""What a backbone is: a model that maps token ids to hidden states, and the tokenizer that feeds it.

Everything above this package (the classifier, training, adapter files, serving) needs only what the
two protocols below state, so GPT-2 (:mod:`.gpt2`), lorafit's Llama decoder and any transformers model
(:mod:`.hf`) are interchangeable. :mod:`.loader` builds one from a :class:`BackboneSpec`.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ..files import atomic_path, from_known_fields
from .pairs import PairJoin


@runtime_checkable
class BackboneModule(Protocol):
    """The network: ids (B, T) and a right-padding mask (B, T) -> hidden states."""

    can_pool_last_block: bool  # True when hidden_states(..., at=) computes only the rows at `at`

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      at: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, D); with ``at`` (B,) positions, only those rows (B, D)."""
        ...


class Encoder(Protocol):
    """Texts to ids and back; ``pad_id`` fills right padding (pooling never reads it)."""

    pad_id: int

    def encode(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: list[int]) -> str: ...

    @property
    def pair_join(self) -> PairJoin:
        """How this tokenizer joins two texts (:mod:`.pairs`)."""
        ...

    def encode_pairs(self, pairs: list[tuple[str, str]], max_length: int | None = None) -> tuple[list[list[int]], int]:
        """Pairs of texts joined as :attr:`pair_join` says, cut to ``max_length``; and how many were cut."""
        ...


@dataclass
class BackboneSpec:
    """Where the base model comes from; stored in adapter.json so eval/predict can rebuild it."""

    model: str = "gpt2-small"  # preset, folder, .pth file, or hf:<hub id or folder>
    random_init: bool = False  # GPT-2 presets only: fresh weights, no download
    tokenizer: str | None = None  # folder with encoder.json + vocab.bpe (or vocab.json + merges.txt)
    gguf_file: str | None = None  # for hf: models shipped as GGUF
    n_heads: int | None = None  # for .pth files whose width is not a GPT-2 size
    seed: int = 42  # seeds random_init

    @property
    def is_hf(self) -> bool:
        return self.model.startswith("hf:")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BackboneSpec":
        return from_known_fields(cls, d)


@dataclass
class Backbone:
    """A loaded base: the network, its tokenizer, and what must match for an adapter to load into it."""

    module: nn.Module  # a BackboneModule
    encoder: Encoder | None  # None when no tokenizer was found and none is needed (inspect)
    hidden_size: int
    context_length: int
    architecture: dict  # what must match for an adapter to load (shapes, not weights)
    default_pooling: str = "last"  # "last" real token for decoders, "first" ([CLS]) for bidirectional models
    directory: Path | None = None

    def save_assets(self, directory: Path) -> None:
        """Write what a merged model needs besides its weights to load on its own (the tokenizer)."""
        if hasattr(self.module, "save_assets"):
            self.module.save_assets(directory)
            return
        for f in getattr(self.encoder, "files", None) or ():
            with atomic_path(directory / f.name) as tmp:
                shutil.copyfile(f, tmp)
