"""A classifier as an ONNX Runtime model folder: optimum's ``ORTModelForSequenceClassification.from_pretrained(OUT)``
and a bare ``onnxruntime.InferenceSession("OUT/model.onnx")`` both load it, with neither lorafit nor torch.

Built on :mod:`.hf_format`'s merged transformers classifier (the same weights, config.json with id2label and
pad_token_id, the same tokenizer files), traced by torch.onnx with dynamic batch and sequence axes: inputs
``input_ids`` and ``attention_mask`` (int64, right-padded), output ``logits``. ``quantize="int8"``: ONNX
Runtime's dynamic quantisation (weights int8 per output channel, activations quantised as they come).
Before the folder is moved into place, ONNX Runtime runs it on the run's texts: fp32 must give lorafit's
logits within 1e-4, int8 lorafit's predicted class on at least 99.5 % of them. Needs ``lorafit[onnx]``.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..backbones.hf import require_transformers
from ..errors import LorafitError, SettingError
from ..files import atomic_dir, write_text
from .hf_format import TransformersClassifier, to_transformers
from .hf_layout import check_tokenizer, example_input, padded, pair_note, save_tokenizer

ONNX_FILE = "model.onnx"
INPUTS = ("input_ids", "attention_mask")
QUANTIZE = ("int8",)
FP32_ATOL = 1e-4  # on logits, times the largest logit where that is above 1
INT8_AGREEMENT = 0.995  # one message in 300 (the SMS test split) may flip, two may not
CHECK_TEXTS = 500  # of the run's test split, besides the fixed ones
OPSET = 17


@dataclass
class OnnxCheck:
    """What ONNX Runtime gave on the check texts, against lorafit."""

    max_diff: float  # largest logit difference
    agreement: float  # fraction of texts given lorafit's class
    n_texts: int


def require_onnxruntime(where: str):
    """onnxruntime (with onnx, which its quantiser needs): an optional extra, named in one line if absent."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError as e:
        raise LorafitError(f"{where} needs onnx and onnxruntime: pip install 'lorafit[onnx]'") from e
    return onnxruntime


class _Logits(torch.nn.Module):
    """The transformers classifier with the ONNX signature (input_ids, attention_mask) -> logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def _trace(clf: TransformersClassifier, path: Path, where: str) -> None:
    example = padded(clf.encoder, clf.texts[:2], where)
    axes = {name: {0: "batch_size", 1: "sequence_length"} for name in INPUTS}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's notes on Python branches; the check below runs other shapes
        torch.onnx.export(_Logits(clf.model), example, str(path), input_names=list(INPUTS), output_names=["logits"],
                          dynamic_axes={**axes, "logits": {0: "batch_size"}}, opset_version=OPSET, dynamo=False)


def _quantize(path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = path.with_name(f"{path.stem}.int8.onnx")
    logging.disable(logging.WARNING)  # its advice to pre-process goes to the root logger; the check below decides
    try:
        quantize_dynamic(path, tmp, weight_type=QuantType.QInt8, per_channel=True)
    finally:
        logging.disable(logging.NOTSET)
    os.replace(tmp, path)


def _logits(session, encoder, texts: list[str], where: str) -> torch.Tensor:
    """ONNX Runtime's logits (N, C) on the same batches of 32 the reference was computed on."""
    out = []
    for i in range(0, len(texts), 32):
        ids, mask = padded(encoder, texts[i:i + 32], where)
        out.append(session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0])
    return torch.from_numpy(np.concatenate(out)).float()


def check_session(session, clf: TransformersClassifier, quantize: str | None, where: str) -> OnnxCheck:
    """Run the exported model on the check texts, in batches and (the first few) alone, and refuse it in one
    line unless it gives lorafit's answers: a shape the tracer baked in shows up as a difference here."""
    ref = clf.reference
    got = _logits(session, clf.encoder, clf.texts, where)
    alone = torch.cat([_logits(session, clf.encoder, [t], where) for t in clf.texts[:4]])
    diff = max((got - ref).abs().max().item(), (alone - ref[:len(alone)]).abs().max().item())
    agreement = (got.argmax(1) == ref.argmax(1)).float().mean().item()
    if quantize is None and not diff <= FP32_ATOL * max(1.0, ref.abs().max().item()):
        raise LorafitError(f"{where}: ONNX Runtime's logits differ from lorafit's by {diff:.2e} (more than "
                           f"{FP32_ATOL:g}); nothing written")
    if quantize is not None and agreement < INT8_AGREEMENT:
        raise LorafitError(f"{where}: the {quantize} model gives lorafit's class on {100 * agreement:.1f} % of "
                           f"{len(ref)} texts (at least {100 * INT8_AGREEMENT:g} % needed); nothing written")
    return OnnxCheck(diff, agreement, len(ref))


def export_onnx(run: str | Path, out: str | Path, *, quantize: str | None = None,
                overwrite: bool = False) -> OnnxCheck:
    """Write ``run`` (a lorafit run, merged model or PEFT adapter) as an ONNX Runtime model folder, checked
    in ONNX Runtime against lorafit before it is moved into place (see the module's docstring)."""
    where = f"--format onnx{f' --quantize {quantize}' if quantize else ''}"
    if quantize is not None and quantize not in QUANTIZE:
        raise SettingError("{quantize} must be one of {}, got {!r}", ", ".join(QUANTIZE), quantize)
    ort = require_onnxruntime(where)
    transformers = require_transformers(where)
    out = Path(out)
    clf = to_transformers(run, CHECK_TEXTS, where, transformers)
    with atomic_dir(out, overwrite) as tmp:
        clf.model.config.save_pretrained(tmp)
        save_tokenizer(clf.tokenizer, tmp)
        _trace(clf, tmp / ONNX_FILE, where)
        if quantize:
            _quantize(tmp / ONNX_FILE)
        write_text(tmp / "README.md", _readme(clf, quantize, str(out)))
        check_tokenizer(clf.encoder, transformers.AutoTokenizer.from_pretrained(tmp), clf.texts, str(out))
        session = ort.InferenceSession(str(tmp / ONNX_FILE), providers=["CPUExecutionProvider"])
        check = check_session(session, clf, quantize, str(out))
    return check


def _readme(clf: TransformersClassifier, quantize: str | None, out: str) -> str:
    kind = f"{quantize} (dynamic quantisation)" if quantize else "fp32"
    return (f"# Text classifier exported by lorafit\n\nA {clf.layout.architecture} (LoRA merged) in ONNX, {kind}, for "
            f"the classes {', '.join(clf.labels)}.{clf.spec.long.describe()}{pair_note(clf.spec)} Serve it with "
            f"optimum's ONNX Runtime classes "
            f"(`pip install optimum-onnx`):\n\n```python\n"
            f"from optimum.onnxruntime import ORTModelForSequenceClassification\n"
            f"from transformers import AutoTokenizer, pipeline\n"
            f"classify = pipeline(\"text-classification\", model=ORTModelForSequenceClassification.from_pretrained("
            f"{out!r}), tokenizer=AutoTokenizer.from_pretrained({out!r}))\nprint(classify({example_input(clf.spec)}))\n```\n\n"
            f"or with onnxruntime alone: inputs `input_ids` and `attention_mask` (int64, batch x length, padded on "
            f"the right with `pad_token_id` {clf.encoder.pad_id}), output `logits` (batch x classes):\n\n```python\n"
            f"import onnxruntime\nsession = onnxruntime.InferenceSession({str(Path(out) / ONNX_FILE)!r})\n"
            f"logits = session.run([\"logits\"], {{\"input_ids\": ids, \"attention_mask\": mask}})[0]\n```\n")
