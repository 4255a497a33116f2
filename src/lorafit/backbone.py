"""A backbone is a model that maps token ids to hidden states, plus the tokenizer that feeds it.

GPT-2 is lorafit's own (:mod:`lorafit.model`); ``hf:<id or folder>`` wraps any transformers model
(:mod:`lorafit.hf`). Both expose ``hidden_states(input_ids, attention_mask) -> (B, T, D)``, which is
all the classifier, the training loop and the adapter files need.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from torch import nn

from .errors import LorafitError
from .files import atomic_path


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
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class TiktokenEncoder:
    """Texts to ids with GPT-2's BPE; special-token text in user data stays plain text."""

    def __init__(self, encoding, files: tuple[Path, Path] | None = None):
        self.encoding = encoding
        self.files = files  # the BPE files it was built from, copied beside merged models
        self.pad_id = encoding.eot_token  # <|endoftext|> pads, as in the book; pooling never reads it

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(texts)

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)


@dataclass
class Backbone:
    module: nn.Module  # has hidden_states(input_ids, attention_mask) -> (B, T, D)
    encoder: object  # has encode(texts) -> list[list[int]], pad_id, decode(ids)
    hidden_size: int
    context_length: int
    architecture: dict  # what must match for an adapter to load (shapes, not weights)
    default_pooling: str = "last"  # "last" real token for decoders, "first" ([CLS]) for encoders
    directory: Path | None = None

    def save_assets(self, directory: Path) -> None:
        """Write what a merged model needs besides its weights to load on its own (the tokenizer)."""
        if hasattr(self.module, "save_assets"):
            self.module.save_assets(directory)
            return
        for f in self.encoder.files or ():
            with atomic_path(directory / f.name) as tmp:
                shutil.copyfile(f, tmp)


def load_backbone(spec: BackboneSpec) -> Backbone:
    if spec.is_hf:
        from .hf import load_hf_backbone

        return load_hf_backbone(spec)
    if spec.gguf_file:
        raise LorafitError("--gguf-file only applies to --model hf:<id or folder>")
    from .weights import load_gpt2

    loaded = load_gpt2(spec.model, random_init=spec.random_init, n_heads=spec.n_heads, seed=spec.seed)
    return _gpt2_backbone(loaded.model, spec.tokenizer, loaded.directory)


def _gpt2_backbone(model, tokenizer_dir, model_dir) -> Backbone:
    from .tokenizer import from_files, load_tokenizer, locate

    files = locate(tokenizer_dir, model_dir)
    encoding = from_files(*files) if files else load_tokenizer()
    cfg = model.cfg
    if encoding.n_vocab > cfg.vocab_size:
        raise LorafitError(f"the tokenizer has {encoding.n_vocab} tokens but the model only {cfg.vocab_size}")
    return Backbone(model, TiktokenEncoder(encoding, files), cfg.emb_dim, cfg.context_length,
                    {"kind": "gpt2", **cfg.to_dict()}, "last", model_dir)


def backbone_skeleton(architecture: dict, directory: Path, spec: BackboneSpec) -> Backbone:
    """The base's architecture with uninitialised weights, for loading a merged model saved in ``directory``."""
    if architecture.get("kind") == "hf":
        from .hf import hf_skeleton

        return hf_skeleton(directory)
    from .model import GPTConfig
    from .tokenizer import find_bpe_files
    from .weights import empty_model

    model = empty_model(GPTConfig.from_dict(architecture))
    model.out_head = None  # a merged classifier's state dict has the classification head instead
    tokenizer_dir = directory if find_bpe_files(directory) else None
    if tokenizer_dir is None and spec.tokenizer and Path(spec.tokenizer).is_dir():
        tokenizer_dir = spec.tokenizer
    return _gpt2_backbone(model, tokenizer_dir, None)
