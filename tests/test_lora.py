"""LoRA: injection leaves outputs unchanged, only A/B and the head learn, merge is exact, counts match the seed,
adapter files round-trip and refuse mismatches, and the math equals PEFT's."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorafit import (Classifier, ClassifierSpec, GPTModel, LoRAConfig, LoRALinear, LorafitError, PRESETS,
                     build_classifier, count_parameters, freeze_for_lora, inject_lora, merge_lora, unmerge_lora)
from lorafit.adapters.loading import load_classifier
from lorafit.adapters.storage import load_adapter_into, save_adapter
from lorafit.backbones.base import BackboneSpec
from lorafit.backbones.gpt2 import GPTConfig
from lorafit.adapters.lora import lora_layers

from conftest import TINY


def tiny_model(lm_head: bool = True) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(GPTConfig(**TINY), lm_head)


def randomize_lora(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def test_injection_changes_nothing_until_training():
    model = tiny_model().eval()
    ids = torch.randint(0, 300, (2, 9))
    before = model(ids)
    names = inject_lora(model, LoRAConfig(rank=4))
    assert len(names) == 6 * TINY["n_layers"]
    assert all(n.startswith("trf_blocks.") for n in names)  # out_head untouched (the seed's Q1)
    assert isinstance(model.out_head, nn.Linear) and not isinstance(model.out_head, LoRALinear)
    assert torch.equal(model(ids), before)


@pytest.mark.parametrize("targets,expected", [
    (("attention",), {"W_query", "W_key", "W_value", "out_proj"}),
    (("qv",), {"W_query", "W_value"}),
    (("W_query", "W_value"), {"W_query", "W_value"}),
    (("feedforward",), {"0", "2"}),
    ((r"trf_blocks\.1\.att\.W_key",), {"W_key"}),
])
def test_targets_by_alias_suffix_and_regex(targets, expected):
    model = tiny_model()
    names = inject_lora(model, LoRAConfig(rank=2, targets=targets))
    assert {n.rsplit(".", 1)[1] for n in names} == expected


@pytest.mark.parametrize("dropout,train_base", [(0.0, False), (0.3, False), (0.0, True)])
def test_lora_function_gradients_equal_autograds(dropout, train_base):
    """The hand-written backward gives what autograd gives for the same formula, dropout and all."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(12, 10), LoRAConfig(rank=3, alpha=6, dropout=dropout))
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.base.requires_grad_(train_base)
    x = torch.randn(2, 5, 12, requires_grad=True)
    g = torch.randn(2, 5, 10)

    def grads(forward):
        torch.manual_seed(1)  # the same dropout mask for both
        forward(x).backward(g)
        out = [t.grad.clone() for t in (x, layer.lora_A, layer.lora_B, layer.base.weight, layer.base.bias)
               if t.grad is not None]
        for t in (x, *layer.parameters()):
            t.grad = None
        return out

    def reference(x):
        return layer.base(x) + layer.scaling * F.linear(F.linear(layer.dropout(x), layer.lora_A), layer.lora_B)

    ours, expected = grads(layer), grads(reference)
    assert len(ours) == len(expected) == (5 if train_base else 3)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_lora_function_under_bf16_autocast():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8), LoRAConfig(rank=4))
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(6, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == torch.float32
    exact = layer.base(x) + layer.scaling * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    torch.testing.assert_close(y.float(), exact, atol=0.1, rtol=0.02)


def test_inject_twice_and_match_nothing_are_errors():
    model = tiny_model()
    inject_lora(model, LoRAConfig())
    with pytest.raises(LorafitError, match="already has LoRA"):
        inject_lora(model, LoRAConfig())
    with pytest.raises(LorafitError, match="match no nn.Linear"):
        inject_lora(tiny_model(), LoRAConfig(targets=("does_not_exist",)))


def test_only_lora_and_head_train_and_frozen_weights_stay_bit_identical():
    model = Classifier(tiny_model(lm_head=False), TINY["emb_dim"], 2)
    inject_lora(model.backbone, LoRAConfig(rank=4))
    freeze_for_lora(model, trainable=(model.head,))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ids = torch.randint(0, 300, (3, 8))
    mask = torch.ones_like(ids)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = nn.functional.cross_entropy(model(ids, mask), torch.tensor([0, 1, 1]))
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, _ in model.named_parameters() if n.endswith(("lora_A", "lora_B")) or n.startswith("head.")}
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(m.lora_B, torch.zeros_like(m.lora_B)) for m in lora_layers(model).values())


def test_merge_unmerge_restore_and_merged_equals_unmerged():
    model = tiny_model().eval()
    inject_lora(model, LoRAConfig(rank=4, alpha=8))
    randomize_lora(model)
    weights = {n: m.base.weight.detach().clone() for n, m in lora_layers(model).items()}
    ids = torch.randint(0, 300, (2, 10))
    unmerged = model(ids)
    merge_lora(model)
    merge_lora(model)  # idempotent
    torch.testing.assert_close(model(ids), unmerged, atol=1e-5, rtol=0)
    unmerge_lora(model)
    for n, m in lora_layers(model).items():
        torch.testing.assert_close(m.base.weight, weights[n], atol=1e-6, rtol=0)
    assert not any(m.merged for m in lora_layers(model).values())


def test_rslora_scaling():
    base = nn.Linear(6, 5)
    assert LoRALinear(base, LoRAConfig(rank=4, alpha=16)).scaling == 4.0
    assert LoRALinear(nn.Linear(6, 5), LoRAConfig(rank=4, alpha=16, use_rslora=True)).scaling == 8.0


def test_seed_counts_for_gpt2_small():
    """The seed's Q2 and Q3, to the parameter (built on the meta device: no memory, no download)."""
    with torch.device("meta"):
        model = GPTModel(PRESETS["gpt2-small"])
    inject_lora(model, LoRAConfig(rank=8))
    freeze_for_lora(model)
    c = count_parameters(model)
    assert (c.total, c.trainable, round(c.percent_trainable, 2)) == (164_364_288, 1_327_104, 0.81)
    model.out_head = None  # the classification head takes its place
    with torch.device("meta"):
        clf = Classifier(model, 768, 2)
    freeze_for_lora(clf, trainable=(clf.head,))
    c = count_parameters(clf)
    assert (c.total, c.trainable, round(c.percent_trainable, 2)) == (125_768_450, 1_328_642, 1.06)


def _spec(hf_gpt2_dir, **lora) -> ClassifierSpec:
    return ClassifierSpec(backbone=BackboneSpec(model=str(hf_gpt2_dir)), lora=LoRAConfig(**lora), labels=["a", "b", "c"])


def test_adapter_round_trip_gives_identical_logits(tmp_path, hf_gpt2_dir):
    spec = _spec(hf_gpt2_dir, rank=4)
    model, _, spec = build_classifier(spec, seed=3)
    randomize_lora(model)
    save_adapter(tmp_path / "run", model, spec)
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert files == {"adapter.safetensors", "adapter.json"}
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "run" / "adapter.safetensors"))
    assert keys == {f"{n}.lora_{x}" for n in lora_layers(model) for x in "AB"} | {"head.weight", "head.bias"}
    loaded, _, _ = load_classifier(tmp_path / "run")
    ids = torch.randint(0, 259, (3, 7))
    mask = torch.ones_like(ids)
    model.eval()
    assert torch.equal(loaded(ids, mask), model(ids, mask))


def test_mismatched_adapters_are_refused(tmp_path, hf_gpt2_dir):
    spec = _spec(hf_gpt2_dir, rank=4)
    model, _, spec = build_classifier(spec)
    save_adapter(tmp_path / "run", model, spec)
    other_rank = _spec(hf_gpt2_dir, rank=2)
    m2, _, other_rank = build_classifier(other_rank)
    with pytest.raises(LorafitError, match="rank 4, the model rank 2"):
        load_adapter_into(m2, other_rank, tmp_path / "run")
    two_classes = ClassifierSpec(backbone=spec.backbone, lora=LoRAConfig(rank=4), labels=["x", "y"])
    m3, _, two_classes = build_classifier(two_classes)
    with pytest.raises(LorafitError, match="3 classes, the model 2"):
        load_adapter_into(m3, two_classes, tmp_path / "run")
    other_base = ClassifierSpec(backbone=BackboneSpec(model="gpt2-small", random_init=True), lora=LoRAConfig(rank=4),
                                labels=["a", "b", "c"])
    other_base.architecture = {"kind": "gpt2", **PRESETS["gpt2-small"].to_dict()}
    from lorafit.adapters.storage import check_compatible, read_spec

    with pytest.raises(LorafitError, match="another base model .*emb_dim 32 vs 768"):
        check_compatible(read_spec(tmp_path / "run"), other_base, "run")
    # same architecture, other weights: the fingerprint tells
    saved = read_spec(tmp_path / "run")
    saved.fingerprint = "0" * 16
    with pytest.raises(LorafitError, match="other base weights"):
        check_compatible(saved, spec, "run")


def test_corrupted_adapter_file_is_refused(tmp_path, hf_gpt2_dir):
    spec = _spec(hf_gpt2_dir, rank=4)
    model, _, spec = build_classifier(spec)
    save_adapter(tmp_path / "run", model, spec)
    data = (tmp_path / "run" / "adapter.safetensors").read_bytes()
    (tmp_path / "run" / "adapter.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LorafitError, match="not a readable safetensors file"):
        load_classifier(tmp_path / "run")


def test_adapter_json_is_small_and_readable(tmp_path, hf_gpt2_dir):
    spec = _spec(hf_gpt2_dir, rank=4, alpha=8, use_rslora=True)
    model, _, spec = build_classifier(spec)
    save_adapter(tmp_path / "run", model, spec)
    d = json.loads((tmp_path / "run" / "adapter.json").read_text())
    assert d["lora"] == {"rank": 4, "alpha": 8, "dropout": 0.0, "use_rslora": True, "targets": ["all"],
                         "use_dora": False, "init": "default"}
    assert d["labels"] == ["a", "b", "c"] and d["num_classes"] == 3 and d["architecture"]["emb_dim"] == 32


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_math_equals_peft(use_rslora):
    """Same base, same A and B -> same outputs as PEFT, on a tiny transformers Llama (nn.Linear layers)."""
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    ours = LlamaForCausalLM(cfg).eval()
    theirs = LlamaForCausalLM(cfg).eval()
    theirs.load_state_dict(ours.state_dict())
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=12, target_modules=targets,
                                                        use_rslora=use_rslora, lora_dropout=0.0))
    names = inject_lora(ours, LoRAConfig(rank=4, alpha=12, targets=("all",), use_rslora=use_rslora))
    assert len(names) == 7 * 2
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, m in lora_layers(ours).items():
            peft_layer = theirs.base_model.model.get_submodule(name)
            a = torch.randn(m.lora_A.shape, generator=g)
            b = torch.randn(m.lora_B.shape, generator=g) * 0.1
            m.lora_A.copy_(a)
            m.lora_B.copy_(b)
            peft_layer.lora_A["default"].weight.copy_(a)
            peft_layer.lora_B["default"].weight.copy_(b)
            assert m.scaling == peft_layer.scaling["default"]
    ids = torch.randint(0, 64, (2, 11))
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-5, rtol=1e-5)


def test_frozen_base_in_bf16_merges_and_unmerges_exactly():
    """bf16 training keeps the frozen linears in bf16 (cast once): unmerge must give back their exact values,
    and LoRA A/B, which train, stay fp32."""
    from lorafit.adapters.lora import store_frozen_linears

    model = tiny_model().eval()
    inject_lora(model, LoRAConfig(rank=4, alpha=8))
    freeze_for_lora(model)
    randomize_lora(model)
    store_frozen_linears(model, torch.bfloat16)
    layers = lora_layers(model)
    assert all(m.base.weight.dtype == torch.bfloat16 and m.lora_A.dtype == torch.float32 for m in layers.values())
    weights = {n: m.base.weight.detach().clone() for n, m in layers.items()}
    ids = torch.randint(0, 300, (2, 10))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        unmerged = model(ids).float()
        merge_lora(model)
        merged = model(ids).float()
    unmerge_lora(model)
    assert all(torch.equal(m.base.weight, weights[n]) for n, m in layers.items())
    torch.testing.assert_close(merged, unmerged, atol=0.1, rtol=0.05)  # bf16 rounding of W + BA only
