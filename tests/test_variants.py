"""LoRA's descendants: DoRA's layer equals PEFT's (outputs and gradients), PiSSA starts where PEFT's does and at
the base's outputs, LoRA+'s optimiser groups equal PEFT's, and every variant trains, resumes, merges and predicts
through the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lorafit import GPTModel, LorafitError, LoRAConfig, LoRALinear, PRESETS, count_parameters, freeze_for_lora, inject_lora
from lorafit.adapters.accounting import format_counts
from lorafit.adapters.lora import lora_layers
from lorafit.training.checkpoint import CHECKPOINT
from lorafit.backbones.gpt2 import GPTConfig
from lorafit.cli import main
from lorafit.errors import UsageError
from lorafit.training.loop import TrainConfig, param_groups

from conftest import TINY, train_args, write_sms_like

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llamas(peft, **peft_cfg):
    """Two copies of one tiny transformers Llama: ours (nn.Linear layers for lorafit) and PEFT's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    ours = LlamaForCausalLM(cfg)
    theirs = LlamaForCausalLM(cfg)
    theirs.load_state_dict(ours.state_dict())
    return ours, peft.get_peft_model(theirs, peft.LoraConfig(target_modules=TARGETS, **peft_cfg))


@pytest.mark.parametrize("use_rslora,dropout", [(False, 0.0), (True, 0.0), (False, 0.2)])
def test_dora_equals_peft_outputs_and_gradients(use_rslora, dropout):
    """Same W, A, B and magnitude (B and m moved off their start) -> PEFT's outputs and gradients, in eval
    and in training (where dropout draws the same masks in the same order)."""
    peft = pytest.importorskip("peft")
    ours, theirs = tiny_llamas(peft, r=4, lora_alpha=12, use_dora=True, use_rslora=use_rslora, lora_dropout=dropout)
    inject_lora(ours, LoRAConfig(rank=4, alpha=12, use_rslora=use_rslora, use_dora=True, dropout=dropout))
    freeze_for_lora(ours)
    g = torch.Generator().manual_seed(5)
    pairs = []
    with torch.no_grad():
        for name, m in lora_layers(ours).items():
            p = theirs.base_model.model.get_submodule(name)
            torch.testing.assert_close(m.lora_magnitude, p.lora_magnitude_vector["default"].weight)  # same start
            b = torch.randn(m.lora_B.shape, generator=g) * 0.1
            mag = m.lora_magnitude * (1 + 0.1 * torch.randn(m.lora_magnitude.shape, generator=g))
            mine = (m.lora_A, m.lora_B, m.lora_magnitude)
            peft_params = (p.lora_A["default"].weight, p.lora_B["default"].weight,
                           p.lora_magnitude_vector["default"].weight)
            for t in peft_params:
                t.requires_grad_(True)  # PEFT's own layer decides trainability by name: not checked here
            for x, y, v in zip(mine, peft_params, (m.lora_A, b, mag)):
                x.copy_(v)
                y.copy_(v)
            pairs.append((name, mine, peft_params))
    ids = torch.randint(0, 64, (2, 11))
    for mode in ("eval", "train"):
        getattr(ours, mode)()
        getattr(theirs, mode)()
        torch.manual_seed(7)
        a = ours(ids).logits
        torch.manual_seed(7)
        b = theirs(ids).logits
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    (a.square().mean()).backward()
    (b.square().mean()).backward()
    for name, mine, peft_params in pairs:
        for x, y in zip(mine, peft_params):
            torch.testing.assert_close(x.grad, y.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_dora_weight_norm_needs_no_dense_sum_and_merge_is_exact():
    torch.manual_seed(0)
    base = nn.Linear(24, 40)
    m = LoRALinear(base, LoRAConfig(rank=4, alpha=8, use_dora=True))
    torch.testing.assert_close(m.lora_magnitude, base.weight.norm(dim=1))  # starts as the base
    x = torch.randn(6, 24)
    torch.testing.assert_close(m(x), base(x), atol=1e-6, rtol=0)
    with torch.no_grad():
        m.lora_B.normal_(0, 0.1)
        m.lora_magnitude.mul_(1.2)
    torch.testing.assert_close(m.weight_norm(), (base.weight + m.delta_weight()).norm(dim=1), atol=1e-6, rtol=1e-6)
    w0, y = base.weight.detach().clone(), m(x)
    m.merge()
    m.merge()  # idempotent
    merged = (w0 + m.delta_weight()) * (m.lora_magnitude / (w0 + m.delta_weight()).norm(dim=1))[:, None]
    torch.testing.assert_close(base.weight, merged, atol=1e-6, rtol=1e-6)  # W' = m / ||W + sBA|| (W + sBA)
    torch.testing.assert_close(m(x), y, atol=1e-5, rtol=0)
    m.unmerge()
    torch.testing.assert_close(base.weight, w0, atol=1e-6, rtol=0)


@pytest.mark.parametrize("use_dora", [False, True])
def test_pissa_starts_as_peft_and_as_the_base(use_dora):
    """A and B from the top-r singular vectors as PEFT computes them; the model's output at step 0 is the
    base's; after the same update, ours (base untouched) equals PEFT's (residual in the base)."""
    peft = pytest.importorskip("peft")
    ours, theirs = tiny_llamas(peft, r=4, lora_alpha=8, init_lora_weights="pissa", use_dora=use_dora)
    ours.eval()
    theirs.eval()
    ids = torch.randint(0, 64, (2, 11))
    with torch.no_grad():
        before = ours(ids).logits
    weights = {n: m.weight.detach().clone() for n, m in ours.named_modules() if isinstance(m, nn.Linear)}
    inject_lora(ours, LoRAConfig(rank=4, alpha=8, init="pissa", use_dora=use_dora))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, before, atol=1e-5, rtol=0)  # step 0 = the base
        for name, m in lora_layers(ours).items():
            assert torch.equal(m.base.weight, weights[name])  # the base weight itself is never rewritten
            p = theirs.base_model.model.get_submodule(name)
            torch.testing.assert_close(m.lora_A, p.lora_A["default"].weight, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(m.lora_B, p.lora_B["default"].weight, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(m.base.weight - m.scaling * m.pissa_B0 @ m.pissa_A0, p.base_layer.weight,
                                       atol=1e-5, rtol=0)
            if use_dora:
                torch.testing.assert_close(m.lora_magnitude, p.lora_magnitude_vector["default"].weight)
            step = torch.randn(m.lora_B.shape, generator=g) * 0.05
            m.lora_B.add_(step)
            p.lora_B["default"].weight.copy_(m.lora_B)
            p.lora_A["default"].weight.copy_(m.lora_A)
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_plus_groups_equal_peft(use_dora):
    """Every trainable parameter gets the learning rate and weight decay PEFT's create_loraplus_optimizer
    gives it (LoRA B, the head's bias and DoRA's magnitude at 16 x lr), mapped by identity."""
    pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    from lorafit import Classifier

    torch.manual_seed(0)
    backbone = GPTModel(GPTConfig(**TINY), lm_head=False)
    inject_lora(backbone, LoRAConfig(rank=4, use_dora=use_dora))
    model = Classifier(backbone, 32, 2)
    freeze_for_lora(model, trainable=(model.head,))
    theirs = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0,
                                       loraplus_weight_decay=0.1)
    ours = param_groups(model, TrainConfig(lr=1e-3, weight_decay=0.1, lora_plus_ratio=16.0))

    def settings(groups):
        return {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}

    mine, peft_settings = settings(ours), settings(theirs.param_groups)
    assert mine == peft_settings
    assert len(mine) == sum(1 for p in model.parameters() if p.requires_grad)
    assert mine[id(model.head.bias)] == (1.6e-2, 0.0) and mine[id(model.head.weight)] == (1e-3, 0.1)


def test_inspect_shows_the_dora_magnitude_row(bpe_dir, capsys):
    with torch.device("meta"):
        model = GPTModel(PRESETS["gpt2-small"])
    inject_lora(model, LoRAConfig(rank=8, use_dora=True))
    freeze_for_lora(model)
    c = count_parameters(model)
    assert c.magnitude == 12 * (3 * 768 + 768 + 3072 + 768)  # one per output row of every adapted layer
    assert (c.lora_A + c.lora_B, c.trainable) == (1_327_104, 1_327_104 + c.magnitude)
    assert "DoRA magnitude" in format_counts(c) and "DoRA magnitude" not in format_counts(
        count_parameters(_plain_gpt2_small()))


def _plain_gpt2_small():
    with torch.device("meta"):
        model = GPTModel(PRESETS["gpt2-small"])
    inject_lora(model, LoRAConfig(rank=8))
    freeze_for_lora(model)
    return model


def test_cli_inspect_dora(hf_gpt2_dir, capsys):
    assert main(["inspect", "--model", str(hf_gpt2_dir), "--dora"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "DoRA magnitude" in line)
    assert f"{2 * (3 * 32 + 32 + 128 + 32):,}" in row and "yes" in row and "dora=True" in out


VARIANTS = {
    "dora": ("--dora", "--lora-dropout", "0.1"),  # dropout: DoRA's training path with the extra base product
    "pissa": ("--init", "pissa"),
    "loraplus": ("--lora-plus-ratio", "16", "--lr", "5e-4"),
    "pissa-dora-rslora": ("--init", "pissa", "--dora", "--rslora"),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_trains_resumes_merges_and_predicts(variant, tmp_path, hf_gpt2_dir, capsys):
    from safetensors.torch import load_file

    from lorafit import train_run
    from lorafit.cli import build_parser, train_configs
    from lorafit.training.loop import TrainingStopped

    sms_file = write_sms_like(tmp_path / "sms.txt", n=80)  # 7 batches an epoch: enough to stop after 5 steps

    args = ("--epochs", "1", "--eval-every", "0", *VARIANTS[variant])
    reference = tmp_path / "reference"
    assert main(train_args(hf_gpt2_dir, sms_file, reference, *args)) == 0

    out = tmp_path / "interrupted"
    spec, data_cfg, train_cfg, settings = train_configs(build_parser().parse_args(train_args(hf_gpt2_dir, sms_file,
                                                                                               out, *args)))
    calls = iter(range(10 ** 6))
    with pytest.raises(TrainingStopped, match="interrupted at step") as stopped:
        train_run(spec, data_cfg, train_cfg, out, settings, progress=False, stop=lambda: next(calls) >= 5)
    assert stopped.value.exit_code == 130
    assert (out / CHECKPOINT).exists()
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    a, b = load_file(reference / "adapter.safetensors"), load_file(out / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # resumed bit-identically
    if "dora" in variant:
        assert any(k.endswith(".lora_magnitude") for k in a)
    if "pissa" in variant:
        assert any(k.endswith(".pissa_A0") for k in a)

    capsys.readouterr()
    texts = ["WIN cash prize now!!! call 12", "see you at lunch later 3"]
    assert main(["predict", "--run", str(reference), "--json", "--precision", "fp32", *texts]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    merged = tmp_path / "merged"
    assert main(["merge", "--run", str(reference), "--out", str(merged)]) == 0
    assert not any("lora" in k or "pissa" in k for k in load_file(merged / "model.safetensors"))
    capsys.readouterr()
    assert main(["predict", "--run", str(merged), "--json", "--precision", "fp32", *texts]) == 0
    for r, s in zip(rows, (json.loads(line) for line in capsys.readouterr().out.splitlines())):
        assert r["label"] == s["label"] and r["probability"] == pytest.approx(s["probability"], abs=1e-5)


def test_old_adapter_configs_load_and_bad_settings_are_named():
    old = {"rank": 4, "alpha": 8, "dropout": 0.0, "use_rslora": True, "targets": ["all"]}  # before DoRA and PiSSA
    cfg = LoRAConfig.from_dict(old)
    assert (cfg.use_dora, cfg.init) == (False, "default")
    assert LoRAConfig.from_dict(LoRAConfig(use_dora=True, init="pissa").to_dict()) == LoRAConfig(use_dora=True,
                                                                                                   init="pissa")
    from lorafit.cli import flag

    # the library names fields, as a Python user writes them; the CLI names the flags that set them
    with pytest.raises(UsageError, match="^init must be one of default, pissa, got 'olora'$") as e:
        LoRAConfig(init="olora")
    assert e.value.render(flag) == "--init must be one of default, pissa, got 'olora'"
    with pytest.raises(UsageError, match="^lora_plus_ratio must be > 0, got 0$") as e:
        TrainConfig(lora_plus_ratio=0)
    assert e.value.render(flag) == "--lora-plus-ratio must be > 0, got 0"
    with pytest.raises(UsageError, match=r"^rank must be >= 1, got 0; dropout must be in \[0, 1\), got 1.0$") as e:
        LoRAConfig(rank=0, dropout=1.0)  # every problem at once
    assert e.value.render(flag) == "--rank must be >= 1, got 0; --lora-dropout must be in [0, 1), got 1.0"
    with pytest.raises(LorafitError, match="^init pissa: rank 8 exceeds the layer's size") as e:
        LoRALinear(nn.Linear(4, 6), LoRAConfig(rank=8, init="pissa"))
    assert e.value.render(flag).startswith("--init pissa: --rank 8 exceeds the layer's size")


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_dora_under_bf16_autocast_stays_close_and_keeps_fp32_parameters(dropout):
    torch.manual_seed(0)
    m = LoRALinear(nn.Linear(32, 48), LoRAConfig(rank=4, alpha=8, use_dora=True, dropout=dropout)).train()
    with torch.no_grad():
        m.lora_B.normal_(0, 0.1)
    x = torch.randn(16, 32)
    torch.manual_seed(1)
    ref = m(x)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, atol=5e-2, rtol=5e-2)
    y.float().sum().backward()
    assert m.lora_magnitude.grad.dtype == torch.float32 and m.lora_magnitude.grad.abs().sum() > 0
    m.base.to(torch.bfloat16)  # as bf16 training stores the frozen base
    torch.testing.assert_close(m.weight_norm(), (m.base.weight.float() + m.delta_weight()).norm(dim=1),
                               atol=1e-3, rtol=1e-3)
    w = m.base.weight.clone()
    m.merge()
    m.unmerge()
    assert torch.equal(m.base.weight, w)  # a bf16 base comes back exactly
