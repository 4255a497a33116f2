"""Adapter files: only what was trained (LoRA A/B + head) and the small config to rebuild the rest.

``adapter.safetensors`` holds the tensors, ``adapter.json`` the LoRA settings, the class labels and
the base model's identity (where it came from, its architecture, a fingerprint of its weights), so
an adapter is refused, with the mismatch named, by any base it was not trained on. ``merge`` folds
the update into the base and writes a plain classifier that needs neither LoRA nor the base.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ..backbones.base import Backbone, BackboneSpec
from ..backbones.loader import backbone_skeleton
from ..backbones.pairs import PairJoin
from ..data.windows import LongTexts
from ..errors import LorafitError
from ..files import atomic_dir, from_known_fields, load_safetensors, save_safetensors, write_json
from .classifier import Classifier
from .lora import LoRAConfig, lora_layers, lora_merged

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"
MERGED_WEIGHTS = "model.safetensors"
MERGED_CONFIG = "classifier.json"
FORMAT_VERSION = 1


@dataclass
class ClassifierSpec:
    """Everything needed to rebuild a LoRA classifier around its base model."""

    backbone: BackboneSpec = field(default_factory=BackboneSpec)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    labels: list[str] = field(default_factory=lambda: ["ham", "spam"])
    pooling: str | None = None  # None: the backbone's default ("last" for decoders)
    architecture: dict = field(default_factory=dict)  # filled from the loaded base
    fingerprint: str = ""  # filled from the loaded base's weights
    head_bias: bool = True  # False: a bias-free head, as transformers' decoder classifiers have
    temperature: float = 1.0  # logits are divided by it at inference (fitted on validation after training)
    # class -> probability that decides it (see decide); multi-label: every label's, chosen on validation
    thresholds: dict[str, float] = field(default_factory=dict)
    multi_label: bool = False  # a sigmoid per label, trained with binary cross-entropy
    text_pair: PairJoin | None = None  # None: one text per input; else pairs, joined as the base joins them
    long: LongTexts = field(default_factory=LongTexts)  # texts over the window: truncated, or chunked and pooled

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def problem_type(self) -> str:
        """transformers' name for the task (config.json's ``problem_type``)."""
        return "multi_label_classification" if self.multi_label else "single_label_classification"

    def to_dict(self) -> dict:
        return {
            "format": "lorafit-adapter", "version": FORMAT_VERSION,
            "backbone": self.backbone.to_dict(), "lora": self.lora.to_dict(), "labels": list(self.labels),
            "num_classes": self.num_classes, "pooling": self.pooling, "architecture": self.architecture,
            "fingerprint": self.fingerprint, "head_bias": self.head_bias, "problem_type": self.problem_type,
            "temperature": self.temperature, "thresholds": dict(self.thresholds),
            "text_pair": None if self.text_pair is None else self.text_pair.to_dict(), "long": self.long.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ClassifierSpec":
        return cls(BackboneSpec.from_dict(d["backbone"]), LoRAConfig.from_dict(d["lora"]), list(d["labels"]),
                   d.get("pooling"), d.get("architecture", {}), d.get("fingerprint", ""), d.get("head_bias", True),
                   float(d.get("temperature", 1.0)), {str(k): float(v) for k, v in d.get("thresholds", {}).items()},
                   d.get("problem_type") == "multi_label_classification", PairJoin.from_dict(d.get("text_pair")),
                   from_known_fields(LongTexts, d.get("long") or {}))

    @property
    def pair(self) -> bool:
        """Whether the classifier reads pairs of texts."""
        return self.text_pair is not None


def with_pair_join(spec: ClassifierSpec, backbone: Backbone, where: str) -> ClassifierSpec:
    """``spec`` with the base's pair join (a pair classifier's); a saved join the base's tokenizer would not
    reproduce is refused."""
    if spec.text_pair is None:
        return spec
    theirs = backbone.encoder.pair_join
    ours = spec.text_pair
    if ours.join is not None and (ours.join, ours.sep) != (theirs.join, theirs.sep):
        raise LorafitError(f"{where}: the adapter joins text pairs as {ours.describe()}, this base's tokenizer as "
                           f"{theirs.describe()}")
    return replace(spec, text_pair=PairJoin(theirs.join, theirs.sep, ours.columns))


def adapter_state(model: Classifier) -> dict[str, torch.Tensor]:
    """The trained tensors only: every LoRA A/B (DoRA's magnitude, PiSSA's starting A0/B0) and the head.

    PiSSA's A0/B0 are what turns the unchanged base into the residual ``W - s B0 A0`` on any machine,
    bit for bit, without repeating the SVD (whose singular vectors may differ in sign elsewhere)."""
    state = {}
    for name, m in lora_layers(model).items():
        state[f"{name}.lora_A"] = m.lora_A
        state[f"{name}.lora_B"] = m.lora_B
        if m.use_dora:
            state[f"{name}.lora_magnitude"] = m.lora_magnitude
        if m.use_pissa:
            state[f"{name}.pissa_A0"] = m.pissa_A0
            state[f"{name}.pissa_B0"] = m.pissa_B0
    state.update({f"head.{k}": v for k, v in model.head.state_dict().items()})
    return state


def save_adapter(directory: str | Path, model: Classifier, spec: ClassifierSpec) -> None:
    directory = Path(directory)
    save_safetensors(directory / ADAPTER_WEIGHTS, adapter_state(model), metadata={"format": "lorafit-adapter"})
    save_spec(directory, spec)


def save_spec(directory: str | Path, spec: ClassifierSpec) -> None:
    """adapter.json alone: calibration changes the spec (temperature, thresholds), not the tensors."""
    write_json(Path(directory) / ADAPTER_CONFIG, spec.to_dict())


def read_spec(directory: str | Path, name: str = ADAPTER_CONFIG) -> ClassifierSpec:
    path = Path(directory) / name
    if not path.is_file():
        raise LorafitError(f"{path}: not found (expected a lorafit run or adapter folder)")
    try:
        return ClassifierSpec.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, KeyError, TypeError, LorafitError) as e:
        raise LorafitError(f"{path}: not a lorafit adapter config ({e})") from e


def saved_text_pair(directory: str | Path) -> PairJoin | None:
    """A lorafit run's or merged folder's pair join, read without loading anything (None: single texts, or a
    folder of another kind)."""
    for name in (ADAPTER_CONFIG, MERGED_CONFIG):
        if (Path(directory) / name).is_file():
            return read_spec(directory, name).text_pair
    return None


def check_compatible(saved: ClassifierSpec, built: ClassifierSpec, where: str) -> None:
    """Refuse an adapter whose base architecture, base weights, LoRA rank or class count differ from the
    model it would load into (different targets show up as different tensor names when loading)."""
    if saved.architecture != built.architecture:
        diff = [f"{k} {saved.architecture.get(k)} vs {built.architecture.get(k)}"
                for k in dict.fromkeys([*saved.architecture, *built.architecture])
                if saved.architecture.get(k) != built.architecture.get(k)]
        raise LorafitError(f"{where}: adapter was trained on another base model ({', '.join(diff)})")
    if saved.fingerprint and saved.fingerprint != built.fingerprint:
        raise LorafitError(f"{where}: adapter was trained on other base weights "
                           f"(fingerprint {saved.fingerprint} vs {built.fingerprint} of {built.backbone.model})")
    if saved.lora.rank != built.lora.rank:
        raise LorafitError(f"{where}: adapter has LoRA rank {saved.lora.rank}, the model rank {built.lora.rank}")
    if saved.num_classes != built.num_classes:
        raise LorafitError(f"{where}: adapter has {saved.num_classes} classes, the model {built.num_classes}")


def load_adapter_into(model: Classifier, spec: ClassifierSpec, directory: str | Path) -> None:
    """Copy a saved adapter into a classifier built for ``spec`` (shapes and keys checked by name)."""
    directory = Path(directory)
    check_compatible(read_spec(directory), spec, str(directory))
    tensors = load_safetensors(directory / ADAPTER_WEIGHTS)
    target = adapter_state(model)
    if set(tensors) != set(target):
        missing = sorted(set(target) - set(tensors)) or sorted(set(tensors) - set(target))
        raise LorafitError(f"{directory / ADAPTER_WEIGHTS}: LoRA layers differ from the model's ({missing[0]})")
    with torch.no_grad():
        for k, t in target.items():
            if t.shape != tensors[k].shape:
                raise LorafitError(f"{directory / ADAPTER_WEIGHTS}: {k} has shape {tuple(tensors[k].shape)}, "
                                   f"expected {tuple(t.shape)}")
            t.copy_(tensors[k])


def is_merged(directory: Path) -> bool:
    """A folder written by :func:`save_merged` (plain weights, no adapter left)."""
    return (directory / MERGED_CONFIG).is_file() and not (directory / ADAPTER_CONFIG).is_file()


def save_merged(directory: str | Path, model: Classifier, spec: ClassifierSpec, backbone: Backbone, *,
                overwrite: bool = False) -> None:
    """Fold every LoRA update into its base weight and save a plain classifier (no LoRA layers left) as one
    folder, written whole or not at all; a folder already there is replaced only with ``overwrite``.
    ``model`` itself keeps its LoRA layers (merged while the weights are written)."""
    with atomic_dir(directory, overwrite) as tmp, lora_merged(model):
        save_safetensors(tmp / MERGED_WEIGHTS, plain_state(model), metadata={"format": "lorafit-merged"})
        backbone.save_assets(tmp)
        write_json(tmp / MERGED_CONFIG, {**spec.to_dict(), "format": "lorafit-merged"})


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state as if every LoRALinear were its base layer: ``x.base.weight`` is saved as ``x.weight``,
    LoRA's own tensors are left out (merge first, for the update to be in the base)."""
    layers = lora_layers(model)
    state = {}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        parent, _, last = owner.rpartition(".")
        if last == "base" and parent in layers:
            state[f"{parent}.{leaf}"] = value
        elif owner not in layers:
            state[key] = value
    return state


def load_merged(directory: str | Path) -> tuple[Classifier, Backbone, ClassifierSpec]:
    """A folder written by :func:`save_merged` -> a plain classifier; the base model is not needed."""
    directory = Path(directory)
    spec = read_spec(directory, MERGED_CONFIG)
    backbone = backbone_skeleton(spec.architecture, directory, spec.backbone)
    spec = with_pair_join(spec, backbone, str(directory))
    model = Classifier(backbone.module, backbone.hidden_size, spec.num_classes, spec.pooling, spec.head_bias,
                       spec.multi_label)
    tensors = load_safetensors(directory / MERGED_WEIGHTS)
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if missing or unexpected:
        raise LorafitError(f"{directory / MERGED_WEIGHTS}: weights do not fit the saved architecture "
                           f"({(missing or unexpected)[0]})")
    model.eval()
    return model, backbone, spec
