"""A classifier as a merged transformers model folder: ``pipeline("text-classification", model=OUT)`` loads it
with neither lorafit nor PEFT installed.

The LoRA updates are folded into the base weights, the head becomes ``score`` (a GPT-2 head bias moves
into the final LayerNorm's shift, see :func:`.hf_layout.head_for_transformers`), and config.json carries
the architecture, ``id2label`` / ``label2id`` and ``pad_token_id`` (transformers pools the last token that
is not the pad token; lorafit the last real one: the same token for texts that do not end in it).
Needs the optional extra ``lorafit[hf]`` (transformers).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..backbones.hf import float32, require_transformers
from ..backbones.weights import lorafit_to_hf
from ..errors import LorafitError
from ..files import atomic_dir, write_text
from .hf_layout import (Layout, check_same_predictions, check_tokenizer, example_input, head_for_transformers, label_maps,
                        layout_of, padded, pair_note, sample_texts, save_tokenizer, transformers_tokenizer, within)
from .loading import load_classifier
from .lora import merge_and_unload
from .storage import ClassifierSpec


def _config(transformers, backbone, layout: Layout):
    """The base's transformers config (GPT-2's built from lorafit's shape)."""
    if layout.kind == "llama":
        return transformers.LlamaConfig.from_dict(backbone.module.model.config.to_dict())
    cfg = backbone.module.cfg
    return transformers.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.emb_dim,
                                   n_layer=cfg.n_layers, n_head=cfg.n_heads, layer_norm_epsilon=cfg.layer_norm_eps,
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
                                   bos_token_id=cfg.vocab_size - 1, eos_token_id=cfg.vocab_size - 1)


def _state(model, layout: Layout) -> dict[str, torch.Tensor]:
    """transformers' state dict for the merged classifier."""
    score, base_changes = head_for_transformers(model, layout)
    merge_and_unload(model)
    backbone = model.backbone
    if layout.kind == "llama":
        sd = {f"model.{k}": v for k, v in backbone.model.state_dict().items()}
    else:
        sd = {f"transformer.{k}": v for k, v in lorafit_to_hf(backbone.state_dict()).items()}
    return {**sd, **base_changes, "score.weight": score}


@dataclass
class TransformersClassifier:
    """A run rebuilt as a transformers classifier (LoRA merged, fp32, eval), with lorafit's own logits on
    ``texts`` (computed before merging) to check any export of it against."""

    model: object  # GPT2ForSequenceClassification or LlamaForSequenceClassification
    tokenizer: object  # transformers' tokenizer that splits as lorafit's does
    encoder: object  # lorafit's
    layout: Layout
    labels: list[str]
    texts: list  # texts, or pairs of texts for a pair classifier
    reference: torch.Tensor  # (len(texts), C) lorafit's logits
    spec: ClassifierSpec  # the run's: problem type, thresholds


def to_transformers(run: str | Path, n_texts: int, where: str, transformers=None) -> TransformersClassifier:
    """``run`` (a lorafit run, merged model or PEFT adapter) as a transformers classifier, with lorafit's logits
    on the run's sample texts (:func:`.hf_layout.sample_texts`, ``n_texts`` of its test split; pairs for a
    pair classifier); a base, head or pair join transformers cannot hold exactly is refused in one line."""
    transformers = transformers or require_transformers(where)
    model, backbone, spec = load_classifier(run)
    texts = within(backbone.encoder, sample_texts(run, n_texts, pair=spec.pair), backbone.context_length, where)
    model.divide_logits(spec.temperature)  # the run's calibration, folded into the exported head
    layout = layout_of(spec)
    with torch.no_grad():  # batches of 32: memory stays small however many texts there are
        reference = torch.cat([model(*padded(backbone.encoder, texts[i:i + 32], where)).float()
                               for i in range(0, len(texts), 32)])
    config = _config(transformers, backbone, layout)
    id2label, label2id = label_maps(spec.labels)
    config.update({"architectures": [layout.architecture], "id2label": id2label, "label2id": label2id,
                   "pad_token_id": backbone.encoder.pad_id, "problem_type": spec.problem_type})
    tokenizer = transformers_tokenizer(transformers, backbone, layout, spec, where)
    state = _state(model, layout)
    hf = getattr(transformers, layout.architecture)(config)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise LorafitError(f"{where}: the weights do not fit {layout.architecture} ({(missing or unexpected)[0]})")
    return TransformersClassifier(hf.eval(), tokenizer, backbone.encoder, layout, spec.labels, texts, reference, spec)


def export_hf(run: str | Path, out: str | Path, *, overwrite: bool = False) -> float:
    """Write ``run`` (a lorafit run, merged model or PEFT adapter) as a transformers model folder; it is
    loaded back by transformers and must give lorafit's probabilities within 1e-5 before it is moved into
    place. Returns the largest difference seen."""
    transformers = require_transformers("--format hf")
    out = Path(out)
    clf = to_transformers(run, 13, str(out), transformers)
    texts = clf.texts
    batch, mask = padded(clf.encoder, texts, str(out))
    with atomic_dir(out, overwrite) as tmp:
        clf.model.save_pretrained(tmp)
        save_tokenizer(clf.tokenizer, tmp)
        write_text(tmp / "README.md", _readme(clf.layout, clf.spec, str(out)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp, **float32(transformers)).eval()
            loaded_tok = transformers.AutoTokenizer.from_pretrained(tmp)
        check_tokenizer(clf.encoder, loaded_tok, texts, str(out))
        diff = check_same_predictions(clf.reference, loaded, batch, mask, str(out), multi_label=clf.spec.multi_label)
    return diff


def _readme(layout: Layout, spec, out: str) -> str:
    multi = ""
    if spec.multi_label:
        thresholds = ", ".join(f"{k} {t:.3f}" for k, t in spec.thresholds.items())
        multi = (" It is multi-label (config.json's problem_type): every label has its own sigmoid score; "
                 "`top_k=None` returns them all" + (f", and lorafit's per-label thresholds, chosen on validation, "
                                                    f"are {thresholds}" if thresholds else "") + ".")
    call = f"classify({example_input(spec)}{', top_k=None' if spec.multi_label else ''})"
    return (f"# Text classifier exported by lorafit\n\nA {layout.architecture} (LoRA merged) for the classes "
            f"{', '.join(spec.labels)}.{multi}{spec.long.describe()}{pair_note(spec)} Needs only transformers:\n\n"
            f"```python\nfrom transformers import pipeline\n"
            f"classify = pipeline(\"text-classification\", model={out!r})\nprint({call})\n```\n")
