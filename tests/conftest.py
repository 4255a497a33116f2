"""Fixtures: tiny models, a tiny byte-level BPE and tiny data, all written by the tests (no network)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import huggingface_hub.constants as hub_constants
import pytest
import torch

from lorafit import BackboneSpec, ClassifierSpec, LoRAConfig, build_classifier, save_adapter
from lorafit.adapters.lora import lora_layers
from lorafit.backbones.gpt2 import GPTConfig
from lorafit.backbones.tokenizer import byte_alphabet

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_GPT2 = SHARED / "models" / "gpt2"
SHARED_SMS = SHARED / "data" / "sms_spam_collection" / "SMSSpamCollection"

TINY = dict(vocab_size=300, context_length=64, emb_dim=32, n_heads=4, n_layers=2)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No test may touch the network or the user's caches."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LORAFIT_HOME", str(tmp_path / "lorafit-home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    # huggingface_hub reads these once, at import (before this fixture runs): patch its constants too
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    torch.manual_seed(0)


def write_bpe(directory: Path, merges: list[tuple[str, str]] = (("h", "e"), ("l", "l"), ("he", "ll")),
              names: tuple[str, str] = ("encoder.json", "vocab.bpe")) -> Path:
    """A GPT-2-format BPE: the 256 byte tokens, a few merges, and <|endoftext|> last."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {ch: i for i, (ch, _) in enumerate(byte_alphabet())}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / names[0]).write_text(json.dumps(vocab), encoding="utf-8")
    (directory / names[1]).write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return directory


@pytest.fixture
def bpe_dir(tmp_path) -> Path:
    return write_bpe(tmp_path / "bpe")


@pytest.fixture
def tiny_cfg() -> GPTConfig:
    return GPTConfig(**TINY)


def hf_gpt2_config(cfg: GPTConfig):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.emb_dim,
                      n_layer=cfg.n_layers, n_head=cfg.n_heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      tie_word_embeddings=True, bos_token_id=cfg.vocab_size - 1,
                      eos_token_id=cfg.vocab_size - 1)


def write_hf_gpt2(directory: Path, seed: int = 1) -> Path:
    """A random tiny GPT-2 (``TINY``) written by transformers' save_pretrained into ``directory``, with its
    tokenizer files."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    GPT2LMHeadModel(hf_gpt2_config(GPTConfig(**TINY))).eval().save_pretrained(directory)
    write_bpe(directory, names=("vocab.json", "merges.txt"))
    return directory


@pytest.fixture
def hf_gpt2_dir(tmp_path) -> Path:
    """A random tiny GPT-2 written by transformers' save_pretrained, with its tokenizer files."""
    return write_hf_gpt2(tmp_path / "hf-gpt2")


def write_sms_like(path: Path, n: int = 160, seed: int = 0) -> Path:
    """A trivially separable spam/ham file in the SMS Spam Collection's format (label<TAB>text)."""
    rng = random.Random(seed)
    spam = ["WIN cash prize now!!! call", "FREE entry txt WIN to claim", "URGENT! you won a prize, claim now"]
    ham = ["see you at lunch later", "ok thanks, running late", "are we still on for dinner tonight"]
    lines = []
    for i in range(n):
        label = "spam" if i % 2 else "ham"
        base = rng.choice(spam if label == "spam" else ham)
        lines.append(f"{label}\t{base} {rng.randint(0, 99)}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def sms_file(tmp_path) -> Path:
    return write_sms_like(tmp_path / "SMSSpamCollection")


def train_args(model_dir, data, out, *extra) -> list[str]:
    """``lorafit train`` arguments for a quick, deterministic run on a tiny model (fp32, no progress bar)."""
    return ["train", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--epochs", "4",
            "--batch-size", "8", "--lr", "3e-3", "--eval-every", "5", "--quiet", "--precision", "fp32", *extra]


WORDS = ("win cash prize now call free entry txt to claim urgent you won a see at lunch later ok thanks running "
         "late are we still on for dinner tonight").split()


def word_tokenizer(directory, bert: bool):
    """A word-level tokenizer written to ``directory`` (no download): BERT-style or decoder-style (no pad token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertTokenizer, PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    if bert:
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        (directory / "vocab.txt").write_text("\n".join(specials + WORDS + [str(i) for i in range(100)]) + "\n")
        tok = BertTokenizer(str(directory / "vocab.txt"))
    else:
        vocab = {w: i for i, w in enumerate(["<unk>", "</s>"] + WORDS + [str(i) for i in range(100)])}
        core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        core.pre_tokenizer = pre_tokenizers.Whitespace()
        tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>")
    tok.save_pretrained(directory)
    return tok


def save_tiny(directory, bert: bool):
    """A random 2-layer, 32-wide model of either family, saved with its tokenizer."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

    tok = word_tokenizer(directory, bert=bert)
    shape = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=128)
    torch.manual_seed(0)
    model = BertModel(BertConfig(**shape)) if bert else LlamaModel(LlamaConfig(**shape, num_key_value_heads=2))
    model.save_pretrained(directory)
    return directory


@pytest.fixture
def tiny_llama(tmp_path):
    return save_tiny(tmp_path / "tiny-llama", bert=False)


@pytest.fixture
def tiny_bert(tmp_path):
    return save_tiny(tmp_path / "tiny-bert", bert=True)


LABELS = ["ham", "spam"]


def trained_run(directory: Path, base: str, lora, head_bias: bool) -> Path:
    """A lorafit adapter with random (non-zero) LoRA B and head bias: what training would leave behind."""
    spec = ClassifierSpec(BackboneSpec(base), lora, LABELS, head_bias=head_bias)
    model, _, spec = build_classifier(spec, seed=3)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.normal_(0, 0.3)
        model.head.weight.normal_(0, 1.0)
        if model.head.bias is not None:
            model.head.bias.copy_(torch.tensor([0.7, -0.4]))
    save_adapter(directory, model, spec)
    return directory


@pytest.fixture
def gpt2_run(tmp_path, hf_gpt2_dir):
    """A tiny GPT-2 run with a head bias (LoRA B and head random, as after training)."""
    return trained_run(tmp_path / "run", str(hf_gpt2_dir), LoRAConfig(rank=4, alpha=8), head_bias=True)


@pytest.fixture
def llama_run(tmp_path, tiny_llama):
    """A tiny Llama run without a head bias (the only kind transformers' Llama classifier holds)."""
    return trained_run(tmp_path / "run", f"hf:{tiny_llama}", LoRAConfig(rank=4, alpha=8), head_bias=False)
