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

from ..data.batching import Encoded, collate, frame_inputs
from ..data.datasets import TEXT, TEXT_PAIR, read_table
from ..errors import FieldError, LorafitError
from .classifier import Classifier
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
        texts = list(zip(texts, texts[1:] + texts[:1]))
    test = Path(directory) / "test.csv"
    if test.is_file():  # texts only: any label set will do
        texts += frame_inputs(read_table(test, [TEXT, TEXT_PAIR] if pair else None, multi_label=True).head(n))
    return texts


def padded(encoder, texts: list[str], where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``texts`` as one right-padded batch (ids, mask); a text whose last token is the pad token is refused
    (transformers' pooling would skip it, lorafit's reads it)."""
    ids, pad = encoder.encode(texts), encoder.pad_id
    for text, row in zip(texts, ids):
        if row and row[-1] == pad:
            raise LorafitError(f"{where}: {text[:40]!r} ends with the pad token {pad}, which transformers' pooling "
                               "skips; lorafit pools it")
    batch = collate(Encoded(ids, None, 0), np.arange(len(ids)), pad)
    return batch.input_ids, batch.attention_mask


def check_tokenizer(encoder, hf_tokenizer, texts: list[str], where: str) -> None:
    """transformers' tokenizer must split every text as lorafit's does."""
    for text, a, b in zip(texts, encoder.encode(texts), hf_tokenizer(list(texts))["input_ids"]):
        if list(a) != list(b):
            raise LorafitError(f"{where}: the transformers tokenizer splits {text[:40]!r} differently from lorafit's")


def check_same_predictions(ours: torch.Tensor, hf_model, batch: torch.Tensor, mask: torch.Tensor, where: str,
                           atol: float = 1e-5, multi_label: bool = False) -> float:
    """lorafit's logits ``ours`` (B, C) against the transformers model's on the same right-padded batch
    (pooled by its pad id); refuse a probability (softmax, or multi-label each sigmoid) further apart than
    ``atol``. Returns the largest difference."""
    with torch.no_grad():
        theirs = hf_model(input_ids=batch, attention_mask=mask).logits.float()
    prob = torch.sigmoid if multi_label else (lambda x: torch.softmax(x, -1))
    diff = (prob(ours.float()) - prob(theirs)).abs().max().item()
    if not diff <= atol:
        raise LorafitError(f"{where}: transformers' probabilities differ from lorafit's by {diff:.2e} "
                           f"(more than {atol:g}); nothing written")
    return diff
