"""From a :class:`ClassifierSpec` to a model: load the base, inject LoRA, add the head, freeze; or rebuild
a saved lorafit classifier the same way, its adapter loaded into it."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch
from torch import nn

from ..backbones.base import Backbone
from ..backbones.loader import load_backbone
from ..runtime import seeded
from .classifier import Classifier
from .lora import LoRAConfig, freeze_for_lora, inject_lora
from .storage import ClassifierSpec, is_merged, load_adapter_into, load_merged, read_spec, with_pair_join


def weight_fingerprint(module: nn.Module) -> str:
    """A cheap identity for base weights: a hash of the first values of every tensor, rounded to bf16
    so that storing the frozen base in another precision keeps the same fingerprint."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        if t.is_floating_point():
            h.update(name.encode())
            h.update(t.detach().reshape(-1)[:8].to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def build_classifier(spec: ClassifierSpec, seed: int = 42,
                     initialise: bool = True) -> tuple[Classifier, Backbone, ClassifierSpec]:
    """Load the base, inject LoRA, add the head, freeze: the model ready to train (or, with
    ``initialise=False``, to load an adapter into without PiSSA's SVD).

    Returns the spec completed with what the loaded base told (architecture, weight fingerprint,
    pooling): what :func:`save_adapter` writes. ``spec`` itself is left as it was.
    """
    backbone = load_backbone(spec.backbone, lm_head=False)
    spec = dataclasses.replace(spec, architecture=backbone.architecture, fingerprint=weight_fingerprint(backbone.module),
                               pooling=spec.pooling or backbone.default_pooling)
    spec = with_pair_join(spec, backbone, spec.backbone.model)
    with seeded(seed):  # LoRA A and the head start from the same values for the same seed
        add_lora(backbone, spec.lora, initialise)
        return add_head(backbone, spec.num_classes, spec.pooling, spec.head_bias, spec.multi_label), backbone, spec


def add_lora(backbone: Backbone, cfg: LoRAConfig, initialise: bool = True) -> list[str]:
    """Inject LoRA into the backbone's targeted linears and freeze everything else; the replaced names."""
    replaced = inject_lora(backbone.module, cfg, initialise)
    freeze_for_lora(backbone.module)
    return replaced


def add_head(backbone: Backbone, num_classes: int, pooling: str | None = None, head_bias: bool = True,
             multi_label: bool = False) -> Classifier:
    """The classifier over ``backbone`` (which must have no LM head), its new head the one more trainable part."""
    model = Classifier(backbone.module, backbone.hidden_size, num_classes, pooling or backbone.default_pooling,
                       head_bias, multi_label)
    freeze_for_lora(model, trainable=(model.head,))
    return model


def rebuild_classifier(directory: str | Path) -> tuple[Classifier, Backbone, ClassifierSpec]:
    """A saved lorafit run, adapter or merged folder -> the classifier, rebuilt on its base."""
    directory = Path(directory)
    if is_merged(directory):
        return load_merged(directory)
    saved = read_spec(directory)
    model, backbone, spec = build_classifier(dataclasses.replace(saved, architecture={}, fingerprint=""),
                                             initialise=False)
    load_adapter_into(model, spec, directory)
    model.eval()
    return model, backbone, dataclasses.replace(spec, temperature=saved.temperature, thresholds=saved.thresholds)
