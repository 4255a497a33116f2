"""Where a lorafit classifier's pieces sit in transformers' sequence classifiers, and the check that both agree.

lorafit's GPT-2 keeps the book's names and separate W_query / W_key / W_value; transformers' GPT-2 has
one fused ``c_attn`` (Conv1D, weights stored [in, out]). lorafit's Llama decoder has transformers' own
names. Both transformers classifiers (``GPT2ForSequenceClassification``, ``LlamaForSequenceClassification``)
pool the last token that is not ``pad_token_id`` and apply a bias-free ``score``; lorafit pools the last
real token and its head may have a bias. This module is the one table between the two name spaces and
the head conversion; :mod:`.peft_format` and :mod:`.hf_format` write files from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..backbones.pairs import PairJoin, split_pairs
from ..data.batching import Encoded, collate, frame_inputs, pairs_of
from ..data.datasets import TEXT, TEXT_PAIR, read_table
from ..errors import FieldError, LorafitError
from ..files import read_json, write_json
from .classifier import Classifier, probabilities
from .storage import ClassifierSpec

# lorafit GPT-2 layer (under backbone.trf_blocks.{i}.) -> (transformers module under transformer.h.{i}., slot)
_GPT2_LAYERS = {
    "att.W_query": ("attn.c_attn", 0), "att.W_key": ("attn.c_attn", 1), "att.W_value": ("attn.c_attn", 2),
    "att.out_proj": ("attn.c_proj", 0), "ff.layers.0": ("mlp.c_fc", 0), "ff.layers.2": ("mlp.c_proj", 0),
}
_GPT2_FROM_HF = {}
for _ours, (_theirs, _slot) in _GPT2_LAYERS.items():
    _GPT2_FROM_HF.setdefault(_theirs, []).append(_ours)
_GPT2_BLOCK = re.compile(r"backbone\.trf_blocks\.(\d+)\.(.+)")
_HF_GPT2_BLOCK = re.compile(r"transformer\.h\.(\d+)\.(.+)")
_LLAMA_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
GPT2_SLOTS = 3  # c_attn stacks query, key, value on its output axis


@dataclass
class Layout:
    """A lorafit classifier's transformers counterpart."""

    kind: str  # "gpt2" or "llama"
    architecture: str  # transformers class name
    n_layers: int
    fan_in_fan_out: bool  # GPT-2's Conv1D stores weights [in, out]

    def hf_name(self, ours: str) -> tuple[str, int]:
        """A lorafit LoRA layer name (as in the Classifier) -> (transformers module name, output slot)."""
        if self.kind == "gpt2":
            m = _GPT2_BLOCK.fullmatch(ours)
            if m and m.group(2) in _GPT2_LAYERS:
                theirs, slot = _GPT2_LAYERS[m.group(2)]
                return f"transformer.h.{m.group(1)}.{theirs}", slot
        elif ours.startswith("backbone.model.layers."):
            return ours.removeprefix("backbone."), 0
        raise LorafitError(f"LoRA layer {ours} has no counterpart in transformers' {self.architecture}")

    def lorafit_names(self, theirs: str) -> list[str]:
        """A transformers module name -> the lorafit layers (relative to the backbone) it holds, in slot order."""
        if self.kind == "gpt2":
            m = _HF_GPT2_BLOCK.fullmatch(theirs)
            if m and m.group(2) in _GPT2_FROM_HF and int(m.group(1)) < self.n_layers:
                return [f"trf_blocks.{m.group(1)}.{ours}" for ours in _GPT2_FROM_HF[m.group(2)]]
        else:
            m = _LLAMA_LAYER.fullmatch(theirs)
            if m and int(m.group(1)) < self.n_layers and m.group(2).endswith("_proj"):
                return [theirs]
        raise LorafitError(f"LoRA on {theirs}: lorafit puts LoRA on the linear layers of the "
                           f"{self.architecture}'s blocks only")

    def suffix(self, theirs: str) -> str:
        """``transformer.h.3.attn.c_attn`` -> ``attn.c_attn``: the name PEFT's target_modules match on."""
        return theirs.split(".", 3)[3]

    def block_prefix(self, i: int) -> str:
        return f"transformer.h.{i}." if self.kind == "gpt2" else f"model.layers.{i}."

    def slots(self, theirs: str) -> int:
        return GPT2_SLOTS if self.kind == "gpt2" and theirs.endswith("attn.c_attn") else 1


def layout_of(spec: ClassifierSpec) -> Layout:
    """The transformers layout of a classifier, or a one-line refusal for bases without one."""
    arch = spec.architecture
    if spec.pooling != "last":
        raise LorafitError(f"pooling {spec.pooling!r}: transformers' decoder classifiers pool the last token only")
    if arch.get("kind") == "gpt2":
        return Layout("gpt2", "GPT2ForSequenceClassification", arch["n_layers"], True)
    if arch.get("kind") == "hf" and arch.get("model_type") == "llama":
        return Layout("llama", "LlamaForSequenceClassification", arch["num_hidden_layers"], False)
    kind = arch.get("model_type") or arch.get("kind")
    raise LorafitError(f"a {kind} base: export to transformers covers GPT-2 and Llama-architecture models")


def head_for_transformers(model: Classifier, layout: Layout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The head as transformers' bias-free ``score`` weight, plus any base tensors that must change with it.

    A head bias b has no place in ``score``. In GPT-2 the final LayerNorm's output feeds only the head,
    so its shift β can take it: W (β + δ) = W β + b for δ = W⁺ b, exact when W has full row rank
    (checked). Llama's RMSNorm has no shift: such a head is refused.
    """
    weight = model.head.weight.detach().float()  # (C, D)
    bias = model.head.bias
    if bias is None or not bias.detach().any():
        return weight, {}
    if layout.kind != "gpt2":
        raise FieldError("the head has a bias, which {}'s score cannot hold; train with {head_bias=False} to export "
                         "this model", layout.architecture)
    b = bias.detach().double()  # (C,)
    w = weight.double()
    delta = torch.linalg.pinv(w) @ b  # (D,)
    if (w @ delta - b).abs().max() > 1e-6 * max(1.0, b.abs().max().item()):
        raise FieldError("the head's bias cannot be folded into GPT-2's final LayerNorm (its weight rows are "
                         "linearly dependent); train with {head_bias=False} to export this model")
    norm = model.backbone.final_norm
    shift = (norm.shift.detach().double() + delta).float()
    return weight, {"transformer.ln_f.weight": norm.scale.detach().float(), "transformer.ln_f.bias": shift}


def label_maps(labels: list[str]) -> tuple[dict[int, str], dict[str, int]]:
    return dict(enumerate(labels)), {name: i for i, name in enumerate(labels)}


def sample_texts(directory, n: int = 13, pair: bool = False) -> list:
    """Texts (``pair``: pairs of texts) to compare predictions on: a few fixed ones, plus the first ``n`` of
    the run's own test split where it has one."""
    texts = ["Hello", "A longer sentence, with punctuation; and digits: 1, 22, 333!", "Accents too: café, naïve"]
    if pair:
        texts = [("Hello", "Accents too: café, naïve"), ("A longer sentence, with punctuation;", "and digits: 1, 22, 333!")]
    test = Path(directory) / "test.csv"
    if test.is_file():  # texts only: any label set will do
        texts += frame_inputs(read_table(test, [TEXT, TEXT_PAIR] if pair else None, multi_label=True).head(n))
    return texts


def encoded(encoder, texts: list, where: str) -> list[list[int]]:
    """lorafit's ids of texts, or of pairs of texts (joined as the encoder joins them), uncut."""
    pairs = pairs_of(list(texts), where)
    return encoder.encode(list(texts)) if pairs is None else encoder.encode_pairs(pairs)[0]


def within(encoder, texts: list, limit: int, where: str) -> list:
    """The texts (or pairs) whose ids fit ``limit`` tokens: an agreement check runs each one whole, and a run's
    test split may hold longer ones (truncated or, with ``--long chunk``, cut into windows by lorafit)."""
    return [t for t, ids in zip(texts, encoded(encoder, texts, where)) if len(ids) <= limit]


def padded(encoder, texts: list, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``texts`` (or pairs) as one right-padded batch (ids, mask); an input whose last token is the pad token
    is refused (transformers' pooling would skip it, lorafit's reads it)."""
    ids, pad = encoded(encoder, texts, where), encoder.pad_id
    for text, row in zip(texts, ids):
        if row and row[-1] == pad:
            raise LorafitError(f"{where}: {text[:40]!r} ends with the pad token {pad}, which transformers' pooling "
                               "skips; lorafit pools it")
    batch = collate(Encoded(ids, None, 0), np.arange(len(ids)), pad)
    return batch.input_ids, batch.attention_mask


def check_tokenizer(encoder, hf_tokenizer, texts: list, where: str) -> None:
    """transformers' tokenizer must split every text as lorafit's does, and join every pair as it does
    (``tokenizer(first, second)``)."""
    pairs = pairs_of(list(texts), where)
    theirs = hf_tokenizer(list(texts))["input_ids"] if pairs is None else hf_tokenizer(*split_pairs(pairs))["input_ids"]
    for text, a, b in zip(texts, encoded(encoder, texts, where), theirs):
        if list(a) != list(b):
            raise LorafitError(f"{where}: the transformers tokenizer splits {text[:40]!r} differently from lorafit's")


def check_same_predictions(ours: torch.Tensor, hf_model, batch: torch.Tensor, mask: torch.Tensor, where: str,
                           atol: float = 1e-5, multi_label: bool = False) -> float:
    """lorafit's logits ``ours`` (B, C) against the transformers model's on the same right-padded batch
    (pooled by its pad id); refuse a probability (softmax, or multi-label each sigmoid) further apart than
    ``atol``. Returns the largest difference."""
    with torch.no_grad():
        theirs = hf_model(input_ids=batch, attention_mask=mask).logits.float()
    diff = (probabilities(ours.float(), multi_label) - probabilities(theirs, multi_label)).abs().max().item()
    if not diff <= atol:
        raise LorafitError(f"{where}: transformers' probabilities differ from lorafit's by {diff:.2e} "
                           f"(more than {atol:g}); nothing written")
    return diff


def save_tokenizer(tokenizer, directory: Path) -> None:
    """``tokenizer.save_pretrained``, readable by transformers 4 as well as 5: 5 names a plain fast tokenizer
    ``TokenizersBackend``, a class 4 lacks (optimum-onnx, which serves ONNX exports, still needs 4)."""
    tokenizer.save_pretrained(directory)
    path = directory / "tokenizer_config.json"
    config = read_json(path)
    if config.get("tokenizer_class") == "TokenizersBackend":
        write_json(path, {**config, "tokenizer_class": "PreTrainedTokenizerFast"})


PAIR_POOLING = (4, 49)  # transformers pools the rightmost non-pad token from 4.49 (PR 35911), before it the token
# before the first pad token: a pair joined by the pad token would be read up to its separator only


def transformers_tokenizer(transformers, backbone, layout: Layout, spec: ClassifierSpec, where: str):
    """The base's tokenizer as transformers' (GPT-2: from the same BPE files lorafit's tiktoken reads); a pair
    classifier that joins pairs with a separator gets that join as the tokenizer's pair template."""
    join = spec.text_pair
    if layout.kind == "llama":
        tokenizer = backbone.module.tokenizer  # loaded for this export only
    else:
        files = getattr(backbone.encoder, "files", None)
        if not files and backbone.directory is not None and (Path(backbone.directory) / "vocab.json").is_file():
            files = (Path(backbone.directory) / "vocab.json", Path(backbone.directory) / "merges.txt")
        if not files:
            raise FieldError("{export_hf}: the GPT-2 tokenizer's files (vocab.json + merges.txt or encoder.json + "
                             "vocab.bpe) are not known for this run; train with {tokenizer} DIR")
        pad = backbone.encoder.decode([backbone.encoder.pad_id])
        # a pair template needs the fast tokenizer (GPT2Tokenizer is the slow one before transformers 5)
        cls = transformers.GPT2TokenizerFast if join is not None else transformers.GPT2Tokenizer
        # the two files positionally: transformers 4.x names them vocab_file / merges_file, 5.x vocab / merges
        tokenizer = cls(str(files[0]), str(files[1]), unk_token=pad, bos_token=pad, eos_token=pad, pad_token=pad)
    if join is not None and join.join == "sep":
        _check_pair_pooling(transformers, backbone.encoder, join, where)
        with_pair_template(tokenizer, backbone.encoder, join, where)
    if layout.kind == "llama" or join is not None:
        # a generic tokenizer also returns token_type_ids, which Llama's forward refuses (transformers < 4.5x)
        # and GPT-2's adds to its embeddings
        tokenizer.model_input_names = tokenizer.init_kwargs["model_input_names"] = ["input_ids", "attention_mask"]
    return tokenizer


def with_pair_template(tokenizer, encoder, join: PairJoin, where: str) -> None:
    """Give a fast ``tokenizer`` lorafit's ``sep`` join as its pair template (tokenizer.json's post-processor),
    so that ``tokenizer(first, second)`` gives lorafit's ids: the single-text template around
    ``first SEP second``, every token of type 0. A token name the template syntax cannot hold is refused."""
    from tokenizers import processors

    prefix, suffix = getattr(encoder, "single_template", ([], []))
    pre, suf = (tokenizer.convert_ids_to_tokens(list(ids)) for ids in (prefix, suffix))
    names = [*pre, join.sep, *suf]
    bad = next((n for n in names if ":" in n or " " in n or n.startswith("$")), None)
    if bad is not None:
        raise LorafitError(f"{where}: the special token {bad!r} cannot be written in tokenizer.json's pair template, "
                           "so transformers could not join pairs as lorafit does; nothing written")
    typed = lambda tokens: [f"{t}:0" for t in tokens]  # noqa: E731
    template = processors.TemplateProcessing(
        single=[*typed(pre), "$A:0", *typed(suf)], pair=[*typed(pre), "$A:0", f"{join.sep}:0", "$B:0", *typed(suf)],
        special_tokens=[(n, tokenizer.convert_tokens_to_ids(n)) for n in dict.fromkeys(names)])
    backend = tokenizer.backend_tokenizer
    old = backend.post_processor  # GPT-2's ByteLevel only trims offsets: kept in front where it can be
    keep = isinstance(old, processors.ByteLevel) and hasattr(processors, "Sequence")
    backend.post_processor = processors.Sequence([old, template]) if keep else template


def _check_pair_pooling(transformers, encoder, join: PairJoin, where: str) -> None:
    """Refuse to export a pair classifier whose separator is the pad token where transformers would pool the
    token before it (see ``PAIR_POOLING``)."""
    version = tuple(int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    if version < PAIR_POOLING and encoder.decode([encoder.pad_id]) == join.sep:
        raise LorafitError(f"{where}: transformers {transformers.__version__} pools the token before the first pad "
                           f"token, and this pair classifier's separator {join.sep} is the pad token: exporting it "
                           f"needs transformers >= {'.'.join(map(str, PAIR_POOLING))}; nothing written")


def pair_note(spec: ClassifierSpec) -> str:
    """A pair classifier's model-card sentence: how the two texts are joined (the tokenizer does it)."""
    if not spec.pair:
        return ""
    needs = " (transformers >= 4.49 pools it right)" if spec.text_pair.join == "sep" else ""
    return (f" It classifies pairs of texts ({', '.join(spec.text_pair.columns)}), joined as "
            f"{spec.text_pair.describe()}: the tokenizer's pair template does it, `tokenizer(first, second)`{needs}.")


def example_input(spec: ClassifierSpec) -> str:
    """What an export's model card passes to a transformers pipeline: a text, or a pair's dict."""
    return '{"text": "first text", "text_pair": "second text"}' if spec.pair else '"your text"'
