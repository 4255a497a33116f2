"""Any saved classifier folder -> a lorafit classifier: a lorafit run or adapter, a merged model, a PEFT adapter."""

from __future__ import annotations

from pathlib import Path

from ..backbones.base import Backbone
from .classifier import Classifier
from .peft_format import is_peft_adapter, load_peft
from ..files import refuse_nonempty
from .build import rebuild_classifier
from .storage import ADAPTER_CONFIG, MERGED_CONFIG, ClassifierSpec, save_merged


def load_classifier(directory: str | Path) -> tuple[Classifier, Backbone, ClassifierSpec]:
    """What ``eval``, ``predict``, ``merge`` and ``export`` read."""
    d = Path(directory)
    lorafit = (d / ADAPTER_CONFIG).is_file() or (d / MERGED_CONFIG).is_file()
    if not lorafit and is_peft_adapter(d):
        return load_peft(d)
    return rebuild_classifier(d)


def merge_run(run: str | Path, out: str | Path, *, overwrite: bool = False) -> None:
    """What ``lorafit merge`` does: ``run``'s classifier with its update folded into the base, saved as a plain
    classifier in ``out`` (refused before loading if ``out`` holds something and not ``overwrite``)."""
    refuse_nonempty(Path(out), overwrite)
    model, backbone, spec = load_classifier(run)
    save_merged(out, model, spec, backbone, overwrite=overwrite)
