"""lorafit: LoRA fine-tuning of GPT-2 (and other language models) into text classifiers.

The Python API mirrors the CLI, one step per call::

    from lorafit import BackboneSpec, ClassifierSpec, LoRAConfig, build_classifier, count_parameters, format_counts
    spec = ClassifierSpec(backbone=BackboneSpec("gpt2-small"), lora=LoRAConfig(rank=8), labels=["ham", "spam"])
    model, backbone, spec = build_classifier(spec)  # load GPT-2, inject LoRA, add the head, freeze
    print(format_counts(count_parameters(model)))

README.md walks through the rest: data, ``fit``, ``predict_proba``, ``save_adapter``. The subpackages
follow the data's way through the program: backbones and data -> adapters -> inference -> training.
"""

import importlib
from importlib import metadata

# The public API by module, imported on first use: ``import lorafit`` loads neither pandas nor matplotlib.
_API = {
    "adapters.accounting": ("ParamCounts", "count_parameters", "format_counts"),
    "adapters.classifier": ("Classifier", "pool"),
    "adapters.lora": ("LoRAConfig", "LoRALinear", "freeze_for_lora", "inject_lora", "lora_merged", "merge_and_unload",
                      "merge_lora", "unmerge_lora"),
    "adapters.loading": ("load_classifier", "merge_run"),
    "adapters.build": ("add_head", "add_lora", "build_classifier", "rebuild_classifier"),
    "adapters.storage": ("ClassifierSpec", "load_merged", "save_adapter", "save_merged"),
    "backbones.base": ("Backbone", "BackboneModule", "BackboneSpec", "Encoder"),
    "backbones.generate": ("generate",),
    "backbones.gpt2": ("PRESETS", "GPTConfig", "GPTModel"),
    "backbones.loader": ("load_backbone",),
    "backbones.pairs": ("PairJoin",),
    "backbones.tokenizer": ("load_tokenizer",),
    "backbones.weights": ("load_gpt2",),
    "data.batching": ("encode_frame", "encode_texts"),
    "data.datasets": ("DataConfig", "Splits", "load_splits", "prepare_splits", "read_table"),
    "errors": ("FieldError", "LorafitError", "SettingError"),
    "inference.evaluate": ("evaluate_run",),
    "inference.predict": ("InferenceModel", "load_for_inference", "predict_proba", "predict_texts"),
    "reporting.metrics": ("classification_metrics",),
    "runtime": ("Compute", "resolve_compute"),
    "training.checkpoint": ("CheckpointPolicy", "RunSettings"),
    "training.loop": ("Hooks", "TrainConfig", "Trainer", "fit"),
    "training.run": ("resume_run", "train_run"),
}
_MODULE_OF = {name: module for module, names in _API.items() for name in names}

try:
    __version__ = metadata.version("lorafit")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'lorafit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
