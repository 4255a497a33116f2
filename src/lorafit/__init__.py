"""lorafit: LoRA fine-tuning of GPT-2 (and other language models) into text classifiers.

The Python API mirrors the CLI, one step per call::

    from lorafit import BackboneSpec, ClassifierSpec, LoRAConfig, build_classifier, count_parameters, format_counts
    spec = ClassifierSpec(backbone=BackboneSpec("gpt2-small"), lora=LoRAConfig(rank=8), labels=["ham", "spam"])
    model, backbone = build_classifier(spec)  # load GPT-2, inject LoRA, add the head, freeze
    print(format_counts(count_parameters(model)))

README.md walks through the rest: data, ``fit``, ``predict_proba``, ``save_adapter``.
"""

from .accounting import ParamCounts, count_parameters, format_counts
from .adapter import ClassifierSpec, build_classifier, load_classifier, load_merged, save_adapter, save_merged
from .backbone import Backbone, BackboneSpec, load_backbone
from .batching import encode_texts
from .classifier import Classifier, pool
from .data import Splits, load_splits, prepare_splits, read_table
from .errors import LorafitError
from .evaluate import classification_metrics, predict_proba
from .generate import generate
from .lora import LoRAConfig, LoRALinear, freeze_for_lora, inject_lora, set_merged, unwrap_merged
from .model import PRESETS, GPTConfig, GPTModel
from .run import DataConfig, evaluate_run, predict_texts, train_run
from .tokenizer import load_tokenizer
from .train import TrainConfig, fit
from .weights import load_gpt2

__version__ = "0.1.0"
__all__ = [name for name in dir() if not name.startswith("_")]
