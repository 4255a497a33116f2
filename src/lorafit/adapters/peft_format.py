"""PEFT's LoRA adapter folders, both ways: lorafit run -> PEFT SEQ_CLS adapter, and PEFT adapter -> lorafit.

On disk PEFT keeps ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys name the
transformers module: ``base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`` (A [r, in], B [out, r]
for Linear and Conv1D alike), ``base_model.model.score.weight`` for the head (a ``modules_to_save``).
The update is ``scaling * B A`` with scaling = alpha / r (alpha / sqrt(r) with rsLoRA), where a module's r
and alpha come from ``rank_pattern`` / ``alpha_pattern`` when a pattern matches its name.

GPT-2's fused ``c_attn`` takes lorafit's separate query, key and value pairs as one LoRA of rank k·r
(A stacked, B block-diagonal), with an alpha_pattern that keeps lorafit's scaling; read back, a fused
update splits exactly into the three (they share A, each takes its rows of B). The class names travel
in the safetensors metadata (``id2label``), which PEFT ignores.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import warnings
from pathlib import Path

import torch

from ..backbones.base import BackboneSpec
from ..backbones.hf import float32, require_transformers
from ..backbones.weights import HUB_REPOS
from ..errors import FieldError, LorafitError
from ..files import (atomic_dir, load_safetensors, read_json, safetensors_metadata, save_safetensors, write_json,
                     write_text)
from .classifier import Classifier
from ..backbones.pairs import PairJoin
from .hf_layout import (Layout, check_same_predictions, check_tokenizer, head_for_transformers, label_maps,
                        layout_of, padded, pair_note, sample_texts, save_tokenizer, transformers_tokenizer, within)
from .lora import LoRAConfig, lora_layers
from .build import build_classifier, rebuild_classifier
from .storage import ClassifierSpec, is_merged, read_spec

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"(.+)\.lora_([AB])\.weight")
_GPT2_NORM = ("transformer.ln_f.weight", "transformer.ln_f.bias")


def is_peft_adapter(directory: str | Path) -> bool:
    return (Path(directory) / PEFT_CONFIG).is_file()


def pattern_value(patterns: dict, name: str, default):
    """PEFT's rule (``get_pattern_key``): the first pattern key that matches the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _base(spec: ClassifierSpec, backbone) -> tuple[str, str | None, str]:
    """(base_model_name_or_path for PEFT, its gguf file, a local path or id transformers loads it from here)."""
    model = spec.backbone.model
    if spec.backbone.is_hf:
        ident = model.removeprefix("hf:")
        local = Path(ident).expanduser()
        ident = str(local.resolve()) if local.is_dir() else ident
        return ident, spec.backbone.gguf_file, ident
    if spec.backbone.random_init:
        raise FieldError("{run}: the base is {random_init} {}, which transformers cannot load; use {export_hf} "
                         "(a merged model with every weight)", model)
    if model in HUB_REPOS:
        return HUB_REPOS[model], None, str(backbone.directory)
    path = Path(model).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return str(path.resolve()), None, str(path.resolve())
    raise FieldError("{run}: the base {} is not in Hugging Face layout, so PEFT cannot load it; use {export_hf} "
                     "(a merged model with every weight)", model)


def _compress(values: dict[str, object], layout: Layout, full: bool) -> dict[str, object]:
    """Per-module values keyed by the short name PEFT matches (``attn.c_attn``) where every module with that
    short name agrees (and, for ``full``, every block has it); by full module names otherwise."""
    by_suffix: dict[str, set] = {}
    for name, v in values.items():
        by_suffix.setdefault(layout.suffix(name), set()).add(json.dumps(v))
    short = {layout.block_prefix(i) + s for s in by_suffix for i in range(layout.n_layers)}
    if all(len(v) == 1 for v in by_suffix.values()) and (not full or short == set(values)):
        return {layout.suffix(n): v for n, v in sorted(values.items())}
    return dict(sorted(values.items()))


def peft_tensors(model: Classifier, spec: ClassifierSpec, layout: Layout) -> tuple[dict, dict]:
    """PEFT's tensors and adapter_config fields for ``model``; GPT-2's q/k/v pairs fused onto c_attn."""
    groups: dict[str, dict[int, object]] = {}
    for name, m in lora_layers(model).items():
        theirs, slot = layout.hf_name(name)
        groups.setdefault(theirs, {})[slot] = m
    r, tensors, ranks = spec.lora.rank, {}, {}
    for theirs, parts in sorted(groups.items()):
        order = sorted(parts)
        a = torch.cat([parts[k].lora_A.detach() for k in order])  # (k r, in)
        out = parts[order[0]].out_features
        b = torch.zeros(layout.slots(theirs) * out, len(order) * r)  # (slots out, k r): block-diagonal
        for j, k in enumerate(order):
            b[k * out:(k + 1) * out, j * r:(j + 1) * r] = parts[k].lora_B.detach()
        tensors[f"{PREFIX}{theirs}.lora_A.weight"] = a
        tensors[f"{PREFIX}{theirs}.lora_B.weight"] = b
        ranks[theirs] = len(order) * r
    score, base_changes = head_for_transformers(model, layout)
    tensors[f"{PREFIX}score.weight"] = score
    tensors.update({PREFIX + k: v for k, v in base_changes.items()})
    # a module of rank R keeps lorafit's scaling s: alpha_R / R = s (alpha_R / sqrt(R) with rsLoRA)
    root = math.sqrt if spec.lora.use_rslora else float
    wider = {n: R for n, R in ranks.items() if R != r}
    fields = {
        "target_modules": list(_compress({n: 1 for n in ranks}, layout, full=True)),
        "rank_pattern": _compress(wider, layout, full=False),
        "alpha_pattern": _compress({n: spec.lora.alpha * root(R) / root(r) for n, R in wider.items()}, layout,
                                   full=False),
        "modules_to_save": ["score"] + (["ln_f"] if base_changes else []),
    }
    return tensors, fields


def user_lines(base: str, gguf: str | None, labels: list[str], pad_id: int, adapter: str,
               problem_type: str = "single_label_classification") -> str:
    """The three lines a transformers + PEFT user runs to get this adapter's predictions."""
    id2label, label2id = label_maps(labels)
    extra = f", gguf_file={gguf!r}" if gguf else ""
    if problem_type != "single_label_classification":
        extra += f", problem_type={problem_type!r}"
    return (f"from transformers import AutoModelForSequenceClassification; from peft import PeftModel; import torch\n"
            f"model = AutoModelForSequenceClassification.from_pretrained({base!r}{extra}, num_labels={len(labels)}, "
            f"id2label={id2label!r}, label2id={label2id!r}, pad_token_id={pad_id}, torch_dtype=torch.float32)\n"
            f"model = PeftModel.from_pretrained(model, {adapter!r}).eval()")


def export_peft(run: str | Path, out: str | Path, *, overwrite: bool = False) -> float | None:
    """Write a lorafit run's adapter as a PEFT SEQ_CLS LoRA adapter folder.

    With transformers and PEFT installed, the written folder is loaded by them and must give
    lorafit's probabilities within 1e-5 on sample texts before it is moved into place; returns the largest
    difference seen (None when not verified).
    """
    layout = _exportable_layout(run)
    model, backbone, spec = rebuild_classifier(run)
    model.divide_logits(spec.temperature)  # the run's calibration, folded into the exported head
    base, gguf, local = _base(spec, backbone)
    tensors, fields = peft_tensors(model, spec, layout)
    config = {
        "peft_type": "LORA", "task_type": "SEQ_CLS", "base_model_name_or_path": base, "revision": None,
        "r": spec.lora.rank, "lora_alpha": spec.lora.alpha, "lora_dropout": spec.lora.dropout,
        "use_rslora": spec.lora.use_rslora, "use_dora": False, "bias": "none", "fan_in_fan_out": layout.fan_in_fan_out,
        "init_lora_weights": True, "inference_mode": True, "layers_to_transform": None, "layers_pattern": None,
        **fields,
    }
    out = Path(out)
    pad = backbone.encoder.pad_id
    diff = None
    with atomic_dir(out, overwrite) as tmp:
        metadata = {"format": "pt", "id2label": json.dumps(dict(enumerate(spec.labels))),
                    "problem_type": spec.problem_type}
        if spec.thresholds:
            metadata["thresholds"] = json.dumps(spec.thresholds)
        if spec.pair:
            metadata["text_pair"] = json.dumps(spec.text_pair.to_dict())
            _save_pair_tokenizer(tmp, backbone, layout, spec, str(out))
        save_safetensors(tmp / PEFT_WEIGHTS, tensors, metadata=metadata)
        write_json(tmp / PEFT_CONFIG, config)
        write_text(tmp / "README.md", _readme(spec, layout, user_lines(base, gguf, spec.labels, pad, str(out),
                                                                  spec.problem_type), str(out)))
        if _importable("transformers", "peft"):
            texts = within(backbone.encoder, sample_texts(run, pair=spec.pair), backbone.context_length, str(out))
            diff = _verify(tmp, model, backbone, spec, local, gguf, texts, str(out))
    return diff


def _save_pair_tokenizer(folder: Path, backbone, layout: Layout, spec: ClassifierSpec, where: str) -> None:
    """A pair adapter's folder holds the base's tokenizer with the run's pair join as its pair template: the
    base's own tokenizer would run the two texts together (``sep`` joins)."""
    transformers = require_transformers("{export_peft}")
    save_tokenizer(transformers_tokenizer(transformers, backbone, layout, spec, where), folder)


def _exportable_layout(run: str | Path) -> Layout:
    """The run's transformers layout; what PEFT cannot hold is refused from the saved config alone, before
    the base model is loaded."""
    folder = Path(run)
    if is_merged(folder):
        raise FieldError("{run} {}: a merged model has no adapter left to export; use {export_hf}", run)
    spec = read_spec(folder)
    if spec.lora.use_dora:
        raise FieldError("{run} {}: a DoRA adapter; export to PEFT covers plain LoRA only for now ({export_hf} "
                         "writes the merged model)", run)
    if spec.lora.init == "pissa":
        raise FieldError("{run} {}: a PiSSA adapter (its update is B A - B0 A0, not PEFT's form); {export_hf} "
                         "writes the merged model", run)
    return layout_of(spec)


def _readme(spec: ClassifierSpec, layout: Layout, lines: str, out: str = "") -> str:
    if spec.pair:
        lines += (f"\nfrom transformers import AutoTokenizer\ntokenizer = AutoTokenizer.from_pretrained({out!r})\n"
                  f"logits = model(**tokenizer(\"first text\", \"second text\", return_tensors=\"pt\")).logits")
    return (f"# LoRA adapter (PEFT) exported by lorafit\n\nA {layout.architecture} with LoRA rank {spec.lora.rank}, "
            f"alpha {spec.lora.alpha:g}{' (rsLoRA)' if spec.lora.use_rslora else ''}, classes "
            f"{', '.join(spec.labels)}.{spec.long.describe()}{pair_note(spec)} In fp32 it gives lorafit's probabilities within "
            f"1e-5:\n\n"
            f"```python\n{lines}\n```\n")


def _importable(*names: str) -> bool:
    return all(importlib.util.find_spec(n) is not None for n in names)


def _verify(folder: Path, model, backbone, spec, local: str, gguf: str | None, texts, where: str) -> float:
    """Load ``folder`` as the user would (transformers + PEFT) and compare with lorafit on ``texts``."""
    import peft

    transformers = require_transformers("{export_peft}")
    id2label, label2id = label_maps(spec.labels)
    kwargs = {"gguf_file": gguf} if gguf else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(
            local, num_labels=len(spec.labels), id2label=id2label, label2id=label2id,
            pad_token_id=backbone.encoder.pad_id, problem_type=spec.problem_type, **float32(transformers), **kwargs)
        hf = peft.PeftModel.from_pretrained(hf, str(folder)).eval()
    tokenizer = _tokenizer(transformers, str(folder), {}) if spec.pair else _tokenizer(transformers, local, kwargs)
    if tokenizer is not None:
        check_tokenizer(backbone.encoder, tokenizer, texts, where)
    batch, mask = padded(backbone.encoder, texts, where)
    with torch.no_grad():
        ours = model(batch, mask)
    return check_same_predictions(ours, hf, batch, mask, where, multi_label=spec.multi_label)


def _tokenizer(transformers, local: str, kwargs: dict):
    """The base's transformers tokenizer, or None where it has none (lorafit's then is the only one)."""
    try:
        return transformers.AutoTokenizer.from_pretrained(local, **kwargs)
    except (OSError, ValueError, TypeError):
        return None


# ---- PEFT -> lorafit -------------------------------------------------------------------------------------

def _checked_config(directory: Path) -> dict:
    """adapter_config.json, refused with one line for what lorafit cannot represent."""
    path = directory / PEFT_CONFIG
    cfg = read_json(path)
    refusals = [
        (cfg.get("peft_type") != "LORA", f"peft_type {cfg.get('peft_type')}: lorafit reads LoRA adapters only"),
        (cfg.get("task_type") != "SEQ_CLS", f"task_type {cfg.get('task_type')}: lorafit reads sequence "
                                            "classification (SEQ_CLS) adapters only"),
        (bool(cfg.get("use_dora")), "use_dora: DoRA adapters cannot be represented by lorafit's LoRA"),
        (cfg.get("bias", "none") != "none" or bool(cfg.get("lora_bias")),
         f"bias {cfg.get('bias')!r} / lora_bias: LoRA that trains biases cannot be represented by lorafit"),
        (bool(cfg.get("layer_replication")), "layer_replication cannot be represented by lorafit"),
        (bool(cfg.get("trainable_token_indices")), "trainable_token_indices cannot be represented by lorafit"),
        (bool(cfg.get("target_parameters")), "target_parameters cannot be represented by lorafit"),
        (not cfg.get("base_model_name_or_path"), "no base_model_name_or_path: the base model is unknown"),
    ]
    for bad, why in refusals:
        if bad:
            raise LorafitError(f"{path}: {why}")
    return cfg


def _base_spec(base: str) -> BackboneSpec:
    """The lorafit backbone for PEFT's base: GPT-2 folders and hub ids load into lorafit's GPT-2, GGUF-only
    folders with their one .gguf file, anything else through transformers (``hf:``)."""
    presets = {repo: name for name, repo in HUB_REPOS.items()} | {"gpt2": "gpt2-small"}
    if base in presets:
        return BackboneSpec(presets[base])
    path = Path(base).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        if read_json(path / "config.json").get("model_type") == "gpt2":
            return BackboneSpec(str(path))
    elif path.is_dir():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return BackboneSpec(f"hf:{path}", gguf_file=ggufs[0])
    return BackboneSpec(f"hf:{base}")


def _read_weights(directory: Path) -> tuple[dict, dict, list[str] | None, dict]:
    """(LoRA A/B per transformers module, head and norm tensors, labels from the metadata (if any),
    the metadata itself: lorafit's exports add problem_type and thresholds)."""
    path = directory / PEFT_WEIGHTS
    if not path.is_file():
        raise LorafitError(f"{path}: not found (lorafit reads PEFT adapters saved as safetensors)")
    tensors = load_safetensors(path)
    meta = safetensors_metadata(path)
    id2label = meta.get("id2label")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    other: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        k = key.removeprefix(PREFIX)
        m = _LORA_KEY.fullmatch(k)
        if m:
            modules.setdefault(m.group(1), {})[m.group(2)] = t.float()
        elif k == "score.weight" or k in _GPT2_NORM:
            other[k] = t.float()
        else:
            what = "DoRA" if "lora_magnitude_vector" in k else "embedding LoRA" if "lora_embedding" in k else k
            raise LorafitError(f"{path}: {key}: {what} cannot be represented by lorafit")
    if "score.weight" not in other:
        raise LorafitError(f"{path}: no {PREFIX}score.weight (the classification head)")
    if len([k for k in _GPT2_NORM if k in other]) == 1:
        raise LorafitError(f"{path}: transformer.ln_f saved in part (its weight and bias go together)")
    labels = None
    if id2label:
        d = json.loads(id2label)
        labels = [d[str(i)] for i in range(len(d))]
    return modules, other, labels, meta


def load_peft(directory: str | Path) -> tuple[Classifier, object, ClassifierSpec]:
    """A PEFT SEQ_CLS LoRA adapter folder -> a lorafit classifier on the same base, same probabilities."""
    directory = Path(directory)
    cfg = _checked_config(directory)
    modules, other, labels, meta = _read_weights(directory)
    score = other["score.weight"]  # (C, D)
    labels = labels or [f"LABEL_{i}" for i in range(score.shape[0])]
    backbone_spec = _base_spec(cfg["base_model_name_or_path"])
    gpt2 = not backbone_spec.is_hf
    # the number of blocks is checked when the LoRA layers are matched to the loaded base
    layout = Layout("gpt2", "GPT2ForSequenceClassification", 10**9, True) if gpt2 else \
        Layout("llama", "LlamaForSequenceClassification", 10**9, False)
    ours = {theirs: layout.lorafit_names(theirs) for theirs in modules}
    ranks = {theirs: ab["A"].shape[0] for theirs, ab in modules.items()}
    if not modules or any(set(ab) != {"A", "B"} for ab in modules.values()):
        raise LorafitError(f"{directory / PEFT_WEIGHTS}: LoRA A/B pairs missing")
    rank = max(ranks.values())
    uniform = all(r == cfg.get("r") for r in ranks.values())
    rslora = bool(cfg.get("use_rslora"))
    alpha = float(cfg.get("lora_alpha", 8)) if uniform else float(cfg.get("lora_alpha", 8)) * (
        math.sqrt(rank / cfg["r"]) if rslora else rank / cfg["r"])
    names = tuple(n for theirs in sorted(ours) for n in ours[theirs])  # relative to the backbone module
    lora = LoRAConfig(rank=rank, alpha=alpha, use_rslora=rslora, targets=names)
    spec = ClassifierSpec(backbone_spec, lora, labels, head_bias=_GPT2_NORM[1] in other,
                          multi_label=meta.get("problem_type") == "multi_label_classification",
                          thresholds=json.loads(meta["thresholds"]) if meta.get("thresholds") else {},
                          text_pair=PairJoin.from_dict(json.loads(meta["text_pair"])) if meta.get("text_pair") else None)
    model, backbone, spec = build_classifier(spec)
    if spec.architecture.get("kind") == "hf" and spec.architecture.get("model_type") != "llama":
        raise LorafitError(f"{directory}: a {spec.architecture.get('model_type')} base; lorafit reads PEFT adapters "
                           "for GPT-2 and Llama-architecture bases")
    _copy_lora(model, cfg, modules, ours, directory)
    _copy_head(model, other, directory)
    model.eval()
    return model, backbone, spec


def _copy_lora(model: Classifier, cfg: dict, modules: dict, ours: dict, directory: Path) -> None:
    layers = lora_layers(model)
    rslora = bool(cfg.get("use_rslora"))
    with torch.no_grad():
        for theirs, ab in modules.items():
            a, b = ab["A"], ab["B"]  # (r, in), (slots out, r)
            r = a.shape[0]
            alpha = float(pattern_value(cfg.get("alpha_pattern") or {}, theirs, cfg.get("lora_alpha", 8)))
            scaling = alpha / (math.sqrt(r) if rslora else r)
            parts = ours[theirs]
            for slot, name in enumerate(parts):
                layer = layers.get(f"backbone.{name}")
                out = b.shape[0] // len(parts)
                if layer is None or a.shape[1] != layer.in_features or out != layer.out_features:
                    raise LorafitError(f"{directory / PEFT_WEIGHTS}: {theirs} does not fit the base model "
                                       f"(A {tuple(a.shape)}, B {tuple(b.shape)})")
                layer.lora_A.zero_()
                layer.lora_B.zero_()
                layer.lora_A[:r] = a
                layer.lora_B[:, :r] = b[slot * out:(slot + 1) * out] * (scaling / layer.scaling)


def _copy_head(model: Classifier, other: dict, directory: Path) -> None:
    """score -> head; a GPT-2 final LayerNorm saved beside it (lorafit's own export of a head bias) becomes
    the head's bias again: W (β' - β) is what the changed shift adds to every logit."""
    head = model.head
    with torch.no_grad():
        if tuple(other["score.weight"].shape) != tuple(head.weight.shape):
            raise LorafitError(f"{directory / PEFT_WEIGHTS}: score.weight has shape {tuple(other['score.weight'].shape)}, "
                               f"the base needs {tuple(head.weight.shape)}")
        head.weight.copy_(other["score.weight"])
        if head.bias is None:
            return
        norm = model.backbone.final_norm
        if not torch.equal(other[_GPT2_NORM[0]], norm.scale.detach().float()):
            raise LorafitError(f"{directory / PEFT_WEIGHTS}: a trained transformer.ln_f weight cannot be represented "
                               "by lorafit (only its bias, as the head's bias)")
        head.bias.copy_(other["score.weight"].double() @ (other[_GPT2_NORM[1]].double() - norm.shift.double()))
