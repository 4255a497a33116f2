"""Interoperability: lorafit -> PEFT -> lorafit, lorafit -> transformers folder -> pipeline (without lorafit),
PEFT -> lorafit, on the tiny GPT-2 (Hugging Face layout) and tiny Llama the tests write; refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from conftest import LABELS, trained_run  # noqa: E402
from lorafit import BackboneSpec, ClassifierSpec, LoRAConfig, build_classifier, load_classifier  # noqa: E402
from lorafit.adapters.peft_format import export_peft  # noqa: E402
from lorafit.backbones.hf import float32  # noqa: E402
from lorafit.cli import main  # noqa: E402
from lorafit.errors import LorafitError  # noqa: E402
from lorafit.inference.predict import predict_texts  # noqa: E402

TEXTS = ["win cash prize now call 7", "see you at lunch later ok", "are we still on for dinner tonight thanks 42",
         "free entry"]


def lorafit_probs(run) -> torch.Tensor:
    rows = predict_texts(run, TEXTS, device="cpu", precision="fp32")
    return torch.tensor([list(r["probabilities"].values()) for r in rows])  # classes in the model's order


def peft_model(base: Path, adapter: Path, pad_id: int):
    """What the exported README tells a user to run."""
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=2, id2label=dict(enumerate(LABELS)), label2id={k: i for i, k in enumerate(LABELS)},
        pad_token_id=pad_id, **float32(transformers))
    return peft.PeftModel.from_pretrained(model, adapter).eval()


def hf_probs(model, tokenizer, side: str) -> torch.Tensor:
    """transformers' probabilities on TEXTS as one batch padded on ``side`` (GPT-2 then needs position ids)."""
    tokenizer.padding_side = side
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    position_ids = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], position_ids=position_ids).logits
    return torch.softmax(logits, -1)


def tokenizer_for(base: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@pytest.mark.parametrize("lora", [LoRAConfig(rank=4, alpha=8), LoRAConfig(rank=4, alpha=8, use_rslora=True),
                                  LoRAConfig(rank=2, alpha=5, targets=("qv",))], ids=["all", "rslora", "qv"])
def test_gpt2_lorafit_to_peft_to_lorafit(lora, tmp_path, hf_gpt2_dir):
    """q/k/v onto the fused c_attn, the head bias into ln_f: transformers + PEFT give lorafit's probabilities,
    padded right or left, and reading the PEFT folder back gives them again with the labels."""
    run = trained_run(tmp_path / "run", str(hf_gpt2_dir), lora, head_bias=True)
    expected = lorafit_probs(run)
    assert main(["export", "--run", str(run), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] and cfg["use_rslora"] == lora.use_rslora and "ln_f" in cfg["modules_to_save"]
    fused = 2 if lora.targets == ("qv",) else 3
    assert cfg["rank_pattern"] == {"attn.c_attn": fused * lora.rank}
    assert "README.md" in os.listdir(tmp_path / "peft")
    model = peft_model(hf_gpt2_dir, tmp_path / "peft", pad_id=259)
    tok = tokenizer_for(hf_gpt2_dir)
    for side in ("right", "left"):
        torch.testing.assert_close(hf_probs(model, tok, side), expected, atol=1e-5, rtol=0)
    # the export is no no-op: the base alone predicts something else
    with model.disable_adapter():
        assert (hf_probs(model, tok, "right") - expected).abs().max() > 1e-3
    back = predict_texts(tmp_path / "peft", TEXTS, device="cpu", precision="fp32")
    assert [r["label"] for r in back] == [LABELS[int(k)] for k in expected.argmax(1)]
    torch.testing.assert_close(lorafit_probs(tmp_path / "peft"), expected, atol=1e-5, rtol=0)


def test_llama_lorafit_to_peft_to_lorafit(llama_run, tmp_path, tiny_llama):
    expected = lorafit_probs(llama_run)
    export_peft(llama_run, tmp_path / "peft")
    model = peft_model(tiny_llama, tmp_path / "peft", pad_id=1)
    tok = tokenizer_for(tiny_llama)
    for side in ("right", "left"):
        torch.testing.assert_close(hf_probs(model, tok, side), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(lorafit_probs(tmp_path / "peft"), expected, atol=1e-5, rtol=0)
    assert "pad_token_id=1" in (tmp_path / "peft" / "README.md").read_text()


@pytest.mark.parametrize("fixture", ["gpt2_run", "llama_run"])
def test_hf_export_loads_in_a_pipeline_without_lorafit(fixture, request, tmp_path):
    run = request.getfixturevalue(fixture)
    expected = lorafit_probs(run)
    assert main(["export", "--run", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["id2label"] == {"0": "ham", "1": "spam"} and config["pad_token_id"] is not None
    # lorafit made unimportable (the venv may have it installed): the folder must load with transformers alone
    script = ("import json, sys\nsys.modules['lorafit'] = None\n"
              "from transformers import pipeline\n"
              f"clf = pipeline('text-classification', model={str(tmp_path / 'hf')!r}, top_k=None)\n"
              f"print(json.dumps(clf({TEXTS!r})))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    got = torch.tensor([[next(d["score"] for d in row if d["label"] == k) for k in LABELS] for row in rows])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_peft_trained_adapters_read_into_lorafit(tmp_path, hf_gpt2_dir, tiny_llama):
    """Adapters as PEFT itself writes them (random B, rank and alpha patterns, rsLoRA) give PEFT's probabilities."""
    import transformers
    from transformers import AutoModelForSequenceClassification

    for base, targets, rslora in [(hf_gpt2_dir, ["attn.c_attn", "mlp.c_fc"], False),
                                  (tiny_llama, ["q_proj", "v_proj", "down_proj"], True)]:
        torch.manual_seed(5)
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2, **float32(transformers))
        tok = tokenizer_for(base)
        model.config.pad_token_id = tok.pad_token_id
        cfg = peft.LoraConfig(r=4, lora_alpha=8, task_type="SEQ_CLS", target_modules=targets, use_rslora=rslora,
                              rank_pattern={targets[0]: 6}, alpha_pattern={targets[-1]: 3}, init_lora_weights=False)
        pm = peft.get_peft_model(model, cfg).eval()
        out = tmp_path / f"peft-{base.name}"
        pm.save_pretrained(out)
        torch.testing.assert_close(lorafit_probs(out), hf_probs(pm, tok, "right"), atol=1e-5, rtol=0)
        assert {r["label"] for r in predict_texts(out, TEXTS, device="cpu")} <= {"LABEL_0", "LABEL_1"}


def write_peft_folder(directory: Path, base: Path, **config) -> Path:
    directory.mkdir()
    cfg = {"peft_type": "LORA", "task_type": "SEQ_CLS", "base_model_name_or_path": str(base), "r": 4,
           "lora_alpha": 8, "target_modules": ["c_attn"], **config}
    (directory / "adapter_config.json").write_text(json.dumps(cfg))
    return directory


@pytest.mark.parametrize("config,message", [
    ({"use_dora": True}, "DoRA"), ({"peft_type": "IA3"}, "peft_type IA3"),
    ({"task_type": "CAUSAL_LM"}, "task_type CAUSAL_LM"), ({"bias": "all"}, "biases")])
def test_unrepresentable_peft_adapters_are_refused(config, message, tmp_path, hf_gpt2_dir, capsys):
    folder = write_peft_folder(tmp_path / "a", hf_gpt2_dir, **config)
    assert main(["predict", "--run", str(folder), "hello"]) == 1
    err = capsys.readouterr().err
    assert message in err.strip().splitlines()[-1] and "Traceback" not in err


def test_lora_on_an_unsupported_module_is_refused(tmp_path, hf_gpt2_dir):
    folder = write_peft_folder(tmp_path / "a", hf_gpt2_dir)
    from safetensors.torch import save_file

    save_file({"base_model.model.transformer.wpe.lora_A.weight": torch.zeros(4, 64),
               "base_model.model.transformer.wpe.lora_B.weight": torch.zeros(32, 4),
               "base_model.model.score.weight": torch.zeros(2, 32)}, str(folder / "adapter_model.safetensors"))
    with pytest.raises(LorafitError, match="transformer.wpe"):
        load_classifier(folder)


def test_llama_head_bias_is_refused_and_names_the_flag(tmp_path, tiny_llama, capsys):
    run = trained_run(tmp_path / "run", f"hf:{tiny_llama}", LoRAConfig(rank=4), head_bias=True)
    for fmt in ("peft", "hf"):
        assert main(["export", "--run", str(run), "--format", fmt, "--out", str(tmp_path / fmt)]) == 1
        err = capsys.readouterr().err
        assert "--no-head-bias" in err.strip().splitlines()[-1] and "Traceback" not in err
        assert not (tmp_path / fmt).exists()


def test_random_init_base_exports_to_hf_only(tmp_path, bpe_dir, capsys):
    spec = ClassifierSpec(BackboneSpec("gpt2-small", random_init=True, tokenizer=str(bpe_dir)), LoRAConfig(rank=2),
                          LABELS)
    # the preset's shape is too big for a test: the refusal comes before any weight is touched
    assert spec.backbone.random_init
    from lorafit.adapters.peft_format import _base

    from lorafit.cli import flag

    with pytest.raises(LorafitError, match="use export_hf") as e:
        _base(spec, None)
    assert "base is --random-init gpt2-small" in e.value.render(flag) and "use --format hf" in e.value.render(flag)


def test_no_head_bias_removes_only_the_bias(hf_gpt2_dir):
    from lorafit import count_parameters

    counts = [count_parameters(build_classifier(ClassifierSpec(BackboneSpec(str(hf_gpt2_dir)), LoRAConfig(rank=4),
                                                               LABELS, head_bias=b))[0]).trainable for b in (True, False)]
    assert counts[0] - counts[1] == len(LABELS)
