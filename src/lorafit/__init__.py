"""lorafit: LoRA fine-tuning of GPT-2 (and other language models) into text classifiers.

The Python API mirrors the CLI, one step per call::

    from lorafit import BackboneSpec, ClassifierSpec, LoRAConfig, build_classifier, count_parameters, format_counts
    spec = ClassifierSpec(backbone=BackboneSpec("gpt2-small"), lora=LoRAConfig(rank=8), labels=["ham", "spam"])
    model, backbone, spec = build_classifier(spec)  # load GPT-2, inject LoRA, add the head, freeze
    print(format_counts(count_parameters(model)))

README.md walks through the rest: data, ``fit``, ``predict_proba``, ``save_adapter``. The subpackages
follow the data's way through the program: backbones and data -> adapters -> inference -> training.
"""

from importlib import metadata

from .adapters.accounting import ParamCounts, count_parameters, format_counts
from .adapters.classifier import Classifier, pool
from .adapters.lora import LoRAConfig, LoRALinear, freeze_for_lora, inject_lora, merged, set_merged, unwrap_merged
from .adapters.loading import load_classifier
from .adapters.storage import ClassifierSpec, build_classifier, load_merged, save_adapter, save_merged
from .backbones.base import Backbone, BackboneModule, BackboneSpec, Encoder
from .backbones.generate import generate
from .backbones.gpt2 import PRESETS, GPTConfig, GPTModel
from .backbones.loader import load_backbone
from .backbones.tokenizer import load_tokenizer
from .backbones.weights import load_gpt2
from .data.batching import encode_frame, encode_texts
from .data.datasets import DataConfig, Splits, load_splits, prepare_splits, read_table
from .errors import FieldError, LorafitError, SettingError
from .inference.evaluate import evaluate_run
from .inference.predict import InferenceModel, load_for_inference, predict_proba, predict_texts
from .reporting.metrics import classification_metrics
from .runtime import Compute, resolve_compute
from .training.checkpoint import CheckpointPolicy, RunSettings
from .training.loop import Hooks, TrainConfig, Trainer, fit
from .training.run import resume_run, train_run

try:
    __version__ = metadata.version("lorafit")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
__all__ = [name for name in dir() if not name.startswith("_") and name != "metadata"]
