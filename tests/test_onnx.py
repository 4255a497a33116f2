"""``lorafit export --format onnx``: the folder loads in a bare onnxruntime.InferenceSession and in optimum's
ORTModelForSequenceClassification and gives lorafit's logits (tiny GPT-2 and tiny Llama); int8; refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from conftest import LABELS, train_args, trained_run  # noqa: E402
from lorafit import LoRAConfig, load_classifier  # noqa: E402
from lorafit.adapters import onnx_format  # noqa: E402
from lorafit.adapters.hf_layout import padded  # noqa: E402
from lorafit.cli import main  # noqa: E402

TEXTS = ["win cash prize now call 7", "see you at lunch later ok", "are we still on for dinner tonight thanks 42",
         "free entry", "a"]


def lorafit_logits(run, texts=TEXTS) -> np.ndarray:
    model, backbone, _ = load_classifier(run)
    with torch.no_grad():
        return model(*padded(backbone.encoder, texts, "test")).float().numpy()


def tokenized(folder, texts=TEXTS) -> dict[str, np.ndarray]:
    """The exported tokenizer files, read by transformers alone, padding on the right."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    enc = tok(list(texts), padding=True, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}


@pytest.mark.parametrize("fixture", ["gpt2_run", "llama_run"])
def test_onnx_export_runs_in_a_bare_inference_session(fixture, request, tmp_path, capsys):
    run = request.getfixturevalue(fixture)
    out = tmp_path / "onnx"
    assert main(["export", "--run", str(run), "--format", "onnx", "--out", str(out)]) == 0
    assert "ONNX Runtime fp32 gives lorafit's class on 100.0 %" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["id2label"] == {"0": "ham", "1": "spam"}
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in session.get_inputs()] == [
        ("input_ids", ["batch_size", "sequence_length"]), ("attention_mask", ["batch_size", "sequence_length"])]
    assert [(o.name, o.shape) for o in session.get_outputs()] == [("logits", ["batch_size", 2])]
    expected = lorafit_logits(run)
    got = session.run(["logits"], tokenized(out))[0]  # another batch size and length than the trace's
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    one = session.run(["logits"], tokenized(out, TEXTS[-1:]))[0]  # one token, no padding
    np.testing.assert_allclose(one, expected[-1:], atol=1e-4, rtol=0)


def optimum_python() -> str:
    """A Python that imports optimum.onnxruntime: this one, or $LORAFIT_OPTIMUM_PYTHON (optimum-onnx's releases
    so far pin transformers < 4.58 and break on 5, so it may live in a venv of its own); else the test skips."""
    python = os.environ.get("LORAFIT_OPTIMUM_PYTHON", sys.executable)
    probe = subprocess.run([python, "-c", "import optimum.onnxruntime"], capture_output=True, timeout=300)
    if probe.returncode != 0:
        pytest.skip("optimum.onnxruntime cannot be imported (pip install optimum-onnx, or point "
                    "LORAFIT_OPTIMUM_PYTHON at a Python that has it)")
    return python


@pytest.mark.parametrize("fixture", ["gpt2_run", "llama_run"])
def test_onnx_export_loads_in_optimum_ort_model(fixture, request, tmp_path):
    python = optimum_python()
    run = request.getfixturevalue(fixture)
    out = tmp_path / "onnx"
    onnx_format.export_onnx(run, out)
    # lorafit made unimportable: the folder must serve with optimum + transformers alone
    script = ("import json, sys\nsys.modules['lorafit'] = None\n"
              "from optimum.onnxruntime import ORTModelForSequenceClassification\n"
              "from transformers import AutoTokenizer, pipeline\n"
              f"model = ORTModelForSequenceClassification.from_pretrained({str(out)!r})\n"
              f"tok = AutoTokenizer.from_pretrained({str(out)!r})\n"
              f"logits = model(**tok({TEXTS!r}, padding=True, return_tensors='pt')).logits.tolist()\n"
              "classify = pipeline('text-classification', model=model, tokenizer=tok)\n"
              f"print(json.dumps([logits, [r['label'] for r in classify({TEXTS!r})]]))\n")
    proc = subprocess.run([python, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    logits, labels = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = lorafit_logits(run)
    np.testing.assert_allclose(np.array(logits), expected, atol=1e-4, rtol=0)
    assert labels == [LABELS[k] for k in expected.argmax(1)]


def test_int8_export_is_quantized_and_agrees(tmp_path, hf_gpt2_dir, sms_file, capsys):
    run = tmp_path / "run"
    assert main(train_args(hf_gpt2_dir, sms_file, run, "--no-head-bias")) == 0
    out = tmp_path / "int8"
    assert main(["export", "--run", str(run), "--format", "onnx", "--quantize", "int8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ONNX Runtime int8 gives lorafit's class on" in printed and "of 35 texts" in printed  # 3 fixed + test split
    ops = {node.op_type for node in onnx.load(str(out / "model.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} & ops, ops
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], tokenized(out))[0]
    assert (got.argmax(1) == lorafit_logits(run).argmax(1)).all()


def test_llama_head_bias_is_refused_in_one_line(tmp_path, tiny_llama, capsys):
    run = trained_run(tmp_path / "run", f"hf:{tiny_llama}", LoRAConfig(rank=4), head_bias=True)
    assert main(["export", "--run", str(run), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 1
    err = capsys.readouterr().err
    assert "--no-head-bias" in err.strip().splitlines()[-1] and "Traceback" not in err
    assert not (tmp_path / "onnx").exists()


@pytest.mark.parametrize("setting,value,args,message", [
    ("FP32_ATOL", 0.0, [], "ONNX Runtime's logits differ from lorafit's"),
    ("INT8_AGREEMENT", 1.01, ["--quantize", "int8"], "the int8 model gives lorafit's class on 100.0 %")])
def test_an_export_that_fails_its_check_writes_nothing(setting, value, args, message, monkeypatch, gpt2_run, tmp_path,
                                                       capsys):
    monkeypatch.setattr(onnx_format, setting, value)
    out = tmp_path / "onnx"
    assert main(["export", "--run", str(gpt2_run), "--format", "onnx", *args, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "nothing written" in err[-1]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".onnx")]


def test_onnx_usage_errors(monkeypatch, gpt2_run, tmp_path, capsys):
    out = str(tmp_path / "x")
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--run", str(gpt2_run), "--format", "hf", "--quantize", "int8", "--out", out])
    assert exit_.value.code == 2
    assert "--quantize applies to --format onnx" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(["export", "--run", str(gpt2_run), "--format", "onnx", "--out", out]) == 1
    assert "pip install 'lorafit[onnx]'" in capsys.readouterr().err.strip().splitlines()[-1]
