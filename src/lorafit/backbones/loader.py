"""From a :class:`BackboneSpec` to a loaded :class:`Backbone`: GPT-2 from any weight source, or ``hf:``."""

from __future__ import annotations

from pathlib import Path

from ..errors import FieldError, LorafitError
from .base import Backbone, BackboneSpec
from .gpt2 import GPTConfig, GPTModel
from .hf import hf_skeleton, load_hf_backbone
from .tokenizer import TiktokenEncoder, find_bpe_files, from_files, load_tokenizer, locate
from .weights import empty_model, load_gpt2


def load_backbone(spec: BackboneSpec, *, lm_head: bool = True, need_tokenizer: bool = True) -> Backbone:
    """The base model ``spec`` names. ``lm_head=False``: without GPT-2's LM head (a classifier's base;
    ``hf:`` models load without one anyway). ``need_tokenizer=False`` (inspect) tolerates a missing tokenizer."""
    if spec.is_hf:
        return load_hf_backbone(spec)
    if spec.gguf_file:
        raise FieldError("{gguf_file} only applies to {model} hf:<id or folder>")
    loaded = load_gpt2(spec.model, random_init=spec.random_init, n_heads=spec.n_heads, seed=spec.seed,
                       lm_head=lm_head)
    return gpt2_backbone(loaded.model, spec.tokenizer, loaded.directory, need_tokenizer)


def gpt2_backbone(model: GPTModel, tokenizer_dir, model_dir, need_tokenizer: bool = True) -> Backbone:
    files = locate(tokenizer_dir, model_dir)
    cfg = model.cfg
    encoder = None
    if files or need_tokenizer:
        encoding = from_files(*files) if files else load_tokenizer()
        if encoding.n_vocab > cfg.vocab_size:
            raise LorafitError(f"the tokenizer has {encoding.n_vocab} tokens but the model only {cfg.vocab_size}")
        encoder = TiktokenEncoder(encoding, files)
    return Backbone(model, encoder, cfg.emb_dim, cfg.context_length, {"kind": "gpt2", **cfg.to_dict()}, "last",
                    model_dir)


def backbone_skeleton(architecture: dict, directory: Path, spec: BackboneSpec) -> Backbone:
    """The base's architecture with uninitialised weights, for loading a merged model saved in ``directory``."""
    if architecture.get("kind") == "hf":
        return hf_skeleton(directory)
    model = empty_model(GPTConfig.from_dict(architecture), lm_head=False)
    tokenizer_dir = directory if find_bpe_files(directory) else None
    if tokenizer_dir is None and spec.tokenizer and Path(spec.tokenizer).is_dir():
        tokenizer_dir = spec.tokenizer
    return gpt2_backbone(model, tokenizer_dir, None)
