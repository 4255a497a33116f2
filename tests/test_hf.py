"""Hugging Face backbones: a tiny random Llama (decoder) and a tiny BERT (encoder) built in the test train
through hf:, and their adapters and merged models reproduce the logits."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from lorafit import BackboneSpec, ClassifierSpec, LoRAConfig, build_classifier, load_classifier, save_adapter  # noqa: E402
from lorafit.adapters.storage import load_merged, save_merged  # noqa: E402
from lorafit.cli import main  # noqa: E402

@pytest.mark.parametrize("kind,n_lora,pooling", [("llama", 7 * 2, "last"), ("bert", 6 * 2, "first")])
def test_hf_backbone_injection_and_adapter_round_trip(kind, n_lora, pooling, tiny_llama, tiny_bert, tmp_path):
    d = tiny_llama if kind == "llama" else tiny_bert
    spec = ClassifierSpec(backbone=BackboneSpec(f"hf:{d}"), lora=LoRAConfig(rank=4), labels=["ham", "spam"])
    model, backbone, spec = build_classifier(spec)
    from lorafit.adapters.lora import lora_layers

    names = list(lora_layers(model))
    assert len(names) == n_lora and all(".layers." in n or ".layer." in n for n in names)
    assert spec.pooling == pooling and backbone.encoder.pad_id is not None
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.normal_(0, 0.1)
    ids = backbone.encoder.encode(["win cash now", "see you at lunch later ok"])
    from lorafit.data.batching import Encoded, collate

    import numpy as np

    batch = collate(Encoded(ids, None, 0), np.arange(2), backbone.encoder.pad_id)
    model.eval()
    with torch.no_grad():
        expected = model(batch.input_ids, batch.attention_mask)
    save_adapter(tmp_path / "run", model, spec)
    loaded, _, _ = load_classifier(tmp_path / "run")
    with torch.no_grad():
        assert torch.equal(loaded(batch.input_ids, batch.attention_mask), expected)
    save_merged(tmp_path / "merged", loaded, spec, backbone)
    merged, _, _ = load_merged(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(batch.input_ids, batch.attention_mask), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fixture,precision", [("tiny_llama", "fp32"), ("tiny_bert", "fp32"), ("tiny_llama", "bf16")])
def test_hf_backbone_trains_through_the_cli(fixture, precision, request, tmp_path, sms_file, capsys):
    """bf16: the default wherever bf16 matmuls are fast (GPUs, AMX or Zen 4 CPUs), forced here."""
    d = request.getfixturevalue(fixture)
    out = tmp_path / "run"
    assert main(["train", "--model", f"hf:{d}", "--data", str(sms_file), "--out", str(out), "--epochs", "3",
                 "--lr", "3e-3", "--quiet", "--precision", precision, "--rank", "4"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["speed"]["precision"] == ("bf16 autocast" if precision == "bf16" else "fp32")
    assert report["metrics"]["test"]["accuracy"] >= 0.9
    capsys.readouterr()
    assert main(["predict", "--run", str(out), "--json", "FREE entry txt WIN to claim 7", "see you at lunch later 3"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in rows] == ["spam", "ham"]


def test_missing_hf_model_is_a_one_line_error(tmp_path, sms_file, capsys):
    code = main(["train", "--model", f"hf:{tmp_path / 'nothing'}", "--data", str(sms_file), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 1 and "cannot load" in err and "Traceback" not in err


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_bert"])
def test_hf_predictions_do_not_depend_on_padding(fixture, request):
    import numpy as np

    from lorafit.data.batching import Encoded, collate

    spec = ClassifierSpec(backbone=BackboneSpec(f"hf:{request.getfixturevalue(fixture)}"), labels=["a", "b"])
    model, backbone, spec = build_classifier(spec)
    model.eval()
    ids = backbone.encoder.encode(["win", "see you at lunch later ok thanks", "claim now"])
    batch = collate(Encoded(ids, None, 0), np.arange(3), backbone.encoder.pad_id)
    with torch.no_grad():
        batched = model(batch.input_ids, batch.attention_mask)
        for i, seq in enumerate(ids):
            alone = model(torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long))
            torch.testing.assert_close(batched[i], alone[0], atol=1e-5, rtol=0)


def test_native_llama_backwards_equal_autograds():
    """RMSNorm's and RoPE's hand-written backwards give autograd's gradients of the plain formulas."""
    from lorafit.backbones.llama import RMSNormFunction, RoPEFunction

    torch.manual_seed(0)
    x, w, g = torch.randn(5, 3, 8, requires_grad=True), torch.randn(8, requires_grad=True), torch.randn(5, 3, 8)
    cos, sin = torch.randn(5, 1, 8), torch.randn(5, 1, 8)  # any values: no symmetry assumed

    def grads(f, *inputs):
        out = f(*inputs)
        out.backward(g)
        result = [out.detach()] + [t.grad.clone() for t in inputs if t.grad is not None]
        for t in inputs:
            t.grad = None
        return result

    for ours, reference in [
        (grads(lambda x, w: RMSNormFunction.apply(x, w, 1e-6), x, w),
         grads(lambda x, w: torch.nn.functional.rms_norm(x, (8,), w, 1e-6), x, w)),
        (grads(lambda x: RoPEFunction.apply(x, cos, sin), x),
         grads(lambda x: x * cos + torch.cat((-x[..., 4:], x[..., :4]), dim=-1) * sin, x)),
    ]:
        assert len(ours) == len(reference) > 1
        for a, b in zip(ours, reference):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_native_llama_equals_transformers():
    """lorafit's Llama decoder computes transformers' LlamaModel, and its pooled last layer the same rows."""
    from transformers import LlamaConfig, LlamaModel

    from lorafit.backbones.hf import native
    from lorafit.backbones.llama import LlamaDecoder

    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    hf = LlamaModel(cfg).eval()
    ours = native(hf)
    assert isinstance(ours, LlamaDecoder) and ours.state_dict().keys() == hf.state_dict().keys()
    ids = torch.randint(0, 100, (3, 17))
    at = torch.tensor([16, 3, 9])
    with torch.no_grad():
        expected = hf(input_ids=ids).last_hidden_state
        torch.testing.assert_close(ours.hidden_states(ids), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.hidden_states(ids, at=at), expected[torch.arange(3), at], atol=1e-5, rtol=0)
        mask = (torch.arange(17)[None, :] <= at[:, None]).long()  # right padding after `at`: packed rows
        real = mask.bool()
        torch.testing.assert_close(ours.hidden_states(ids, mask)[real], expected[real], atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.hidden_states(ids, mask, at), expected[torch.arange(3), at], atol=1e-5, rtol=0)
    cfg.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    assert type(native(LlamaModel(cfg))) is LlamaModel  # a RoPE variant it does not implement: left alone
