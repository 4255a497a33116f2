"""Any saved classifier folder -> a lorafit classifier: a lorafit run or adapter, a merged model, a PEFT adapter."""

from __future__ import annotations

from pathlib import Path

from ..backbones.base import Backbone
from .classifier import Classifier
from .peft_format import is_peft_adapter, load_peft
from .storage import ADAPTER_CONFIG, MERGED_CONFIG, ClassifierSpec, load_run


def load_classifier(directory: str | Path) -> tuple[Classifier, Backbone, ClassifierSpec]:
    """What ``eval``, ``predict``, ``merge`` and ``export`` read."""
    d = Path(directory)
    lorafit = (d / ADAPTER_CONFIG).is_file() or (d / MERGED_CONFIG).is_file()
    if not lorafit and is_peft_adapter(d):
        return load_peft(d)
    return load_run(d)
