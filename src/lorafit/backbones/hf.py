"""Any Hugging Face transformers model as a backbone: ``--model hf:<hub id or folder>`` (``--gguf-file``).

The base model (``AutoModel``: no LM head) is wrapped so that it exposes ``hidden_states``, like
lorafit's GPT-2; LoRA injection, the head, pooling, training, adapters, eval and predict are shared.
Needs the optional extra ``lorafit[hf]``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from ..errors import FieldError, LorafitError
from .base import Backbone, BackboneSpec
from .llama import LlamaDecoder, supports
from .pairs import PairJoin, join_ids, split_pairs

# Bidirectional models (BERT and kin) read their [CLS] token; every other model (decoders) its last real token.
BIDIRECTIONAL_TYPES = {"bert", "roberta", "distilbert", "deberta", "deberta-v2", "electra", "albert", "xlm-roberta",
                 "camembert", "mpnet", "modernbert"}


def require_transformers(what: str = "{model} hf:..."):
    """The transformers module (an optional extra), quiet; ``what`` names the setting that needs it (fields as
    ``{field}``)."""
    try:
        import transformers
    except ImportError as e:
        raise FieldError(what + " needs transformers: pip install 'lorafit[hf]'") from e
    transformers.logging.set_verbosity_error()
    return transformers


def float32(transformers) -> dict:
    """``from_pretrained``'s keyword for fp32 weights: ``dtype`` from transformers 4.56, ``torch_dtype`` before.
    Always passed: transformers 5 otherwise loads a checkpoint in its own dtype."""
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": torch.float32}


class HFBackbone(nn.Module):
    """A transformers base model behind lorafit's backbone interface.

    Decoders get no attention mask: batches are right-padded and attention is causal, so real tokens
    never see padding, and without a mask the attention kernel runs its faster causal path. (lorafit's
    own Llama decoder reads the mask only to leave the padding out of its matmuls.)
    """

    def __init__(self, model: nn.Module, tokenizer, causal: bool):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.causal = causal

    @property
    def can_pool_last_block(self) -> bool:
        return isinstance(self.model, LlamaDecoder)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      at: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(self.model, LlamaDecoder):
            return self.model.hidden_states(input_ids, attention_mask, at)  # (B, T, D), or (B, D) at `at`
        mask = None if self.causal else attention_mask
        return self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (B, T, D)

    def save_assets(self, directory: Path) -> None:
        """config.json + tokenizer files: a merged classifier then loads without the original model."""
        self.model.config.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)


class HFEncoder:
    """Texts to ids with the model's own tokenizer (its special tokens included, no truncation here)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    @functools.cached_property
    def pair_join(self) -> PairJoin:
        """The tokenizer's pair template where it has one that marks the second text, else ``a EOS b`` inside
        its single-text template (see :mod:`.pairs`)."""
        t = self.tokenizer
        if t.num_special_tokens_to_add(pair=True) > t.num_special_tokens_to_add(pair=False):
            return PairJoin("template")
        sep = t.eos_token or t.sep_token
        if sep is None:
            raise LorafitError(f"{t.name_or_path}: the tokenizer has no pair template and no eos or sep token to "
                               "put between two texts")
        return PairJoin("sep", sep)

    @functools.cached_property
    def single_template(self) -> tuple[list[int], list[int]]:
        """The special ids the tokenizer puts before and after one text (``[bos]``, ``[]``; ``[CLS]``, ``[SEP]``):
        a pair joined by ``sep`` keeps them around both texts, a text cut into windows (lorafit.data.windows) in
        every window. None found where the text's own ids are not inside its encoding: ``[]``, ``[]``."""
        full = self.tokenizer("x", add_special_tokens=True)["input_ids"]
        plain = self.tokenizer("x", add_special_tokens=False)["input_ids"]
        at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), None)
        return ([], []) if at is None else (full[:at], full[at + len(plain):])

    def encode_pairs(self, pairs: list[tuple[str, str]], max_length: int | None = None) -> tuple[list[list[int]], int]:
        """Pairs joined as :attr:`pair_join` says, cut longest first to ``max_length`` ids (as transformers
        cuts them); and how many were cut."""
        t, (firsts, seconds) = self.tokenizer, split_pairs(pairs)
        if self.pair_join.join == "template":
            ids = t(firsts, seconds, add_special_tokens=True, truncation=False)["input_ids"]
            over = [i for i, x in enumerate(ids) if max_length is not None and len(x) > max_length]
            if over:
                cut = t([firsts[i] for i in over], [seconds[i] for i in over], add_special_tokens=True,
                        truncation="longest_first", max_length=max_length)["input_ids"]
                for i, x in zip(over, cut):
                    ids[i] = x
            return ids, len(over)
        a, b = (t(part, add_special_tokens=False)["input_ids"] for part in (firsts, seconds))
        prefix, suffix = self.single_template
        return join_ids(a, b, prefix, [t.convert_tokens_to_ids(self.pair_join.sep)], suffix, max_length)


def _prepare_tokenizer(tokenizer, where: str):
    """Decoders often have no pad token; any id works (pooling never reads padding), eos is customary."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise LorafitError(f"{where}: the tokenizer has no pad, eos or unk token to pad with")
        tokenizer.pad_token = fallback
    return tokenizer


def _backbone(model: nn.Module, tokenizer, where: str) -> Backbone:
    cfg = model.config
    tokenizer = _prepare_tokenizer(tokenizer, where)
    context = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 512
    model_max = getattr(tokenizer, "model_max_length", None)
    if model_max and model_max < context:
        context = model_max
    hidden = getattr(cfg, "hidden_size", None) or cfg.d_model
    arch = {"kind": "hf", "model_type": cfg.model_type, "hidden_size": hidden,
            "num_hidden_layers": getattr(cfg, "num_hidden_layers", None), "vocab_size": cfg.vocab_size}
    bidirectional = cfg.model_type in BIDIRECTIONAL_TYPES
    return Backbone(HFBackbone(model, tokenizer, causal=not bidirectional), HFEncoder(tokenizer), hidden, context,
                    arch, "first" if bidirectional else "last")


def native(model: nn.Module) -> nn.Module:
    """lorafit's own decoder in place of transformers' where it computes the same function faster."""
    if not supports(model.config):
        return model
    ours = LlamaDecoder(model.config)
    ours.load_state_dict(model.state_dict())  # same names; strict: anything unexpected fails loudly
    return ours


def load_hf_backbone(spec: BackboneSpec) -> Backbone:
    transformers = require_transformers()
    ident = spec.model.removeprefix("hf:")
    kwargs = {"gguf_file": spec.gguf_file} if spec.gguf_file else {}
    where = f"{spec.model}" + (f" (GGUF file {spec.gguf_file})" if spec.gguf_file else "")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(ident, **kwargs)
        model = transformers.AutoModel.from_pretrained(ident, **float32(transformers), **kwargs)
    except (OSError, ValueError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FieldError("{model} {}: cannot load ({})", where, first) from e
    backbone = _backbone(native(model).eval(), tokenizer, where)
    local = Path(ident)
    backbone.directory = local if local.is_dir() else None
    return backbone


def hf_skeleton(directory: Path) -> Backbone:
    """The architecture saved beside a merged classifier, with uninitialised weights to load into."""
    transformers = require_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(directory)
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as e:
        raise LorafitError(f"{directory}: cannot read the merged model's config or tokenizer ({e})") from e
    # Built for real (not on the meta device): non-persistent buffers such as rotary frequencies are
    # not in the saved weights and must be computed.
    model = LlamaDecoder(config) if supports(config) else transformers.AutoModel.from_config(config)
    return _backbone(model.eval(), tokenizer, str(directory))
