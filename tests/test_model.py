"""GPT-2: architecture counts, every weight source against transformers' logits, tokenizer, generation."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lorafit import GPTModel, LorafitError, PRESETS, count_parameters, load_gpt2, load_tokenizer
from lorafit.backbones.generate import generate
from lorafit.backbones.weights import hf_to_lorafit

from conftest import SHARED_GPT2, hf_gpt2_config


def right_padded_batch(vocab: int, lengths=(7, 3, 5), pad: int = 0):
    t = max(lengths)
    ids = torch.full((len(lengths), t), pad)
    mask = torch.zeros((len(lengths), t), dtype=torch.long)
    g = torch.Generator().manual_seed(3)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(0, vocab, (n,), generator=g)
        mask[i, :n] = 1
    return ids, mask


def assert_same_logits_as_hf(model: GPTModel, hf_model) -> None:
    ids, mask = right_padded_batch(model.cfg.vocab_size)
    with torch.no_grad():
        ours = model.eval()(ids)
        theirs = hf_model.eval()(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=0)
    # and a single unpadded sequence, position by position
    with torch.no_grad():
        torch.testing.assert_close(model(ids[:1]), hf_model(input_ids=ids[:1]).logits, atol=1e-5, rtol=0)


# transformers' GPT2Model of OpenAI's four sizes, counted once (its embeddings are tied to the LM head, which the
# book's GPTModel keeps as a separate vocab x width matrix)
HF_GPT2_PARAMETERS = {"gpt2-small": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080,
                      "gpt2-xl": 1_557_611_200}


@pytest.mark.parametrize("name", list(HF_GPT2_PARAMETERS))
def test_presets_are_openai_sizes_counted_without_download(name):
    with torch.device("meta"):
        model = GPTModel(PRESETS[name])
    cfg = PRESETS[name]
    assert count_parameters(model).total == HF_GPT2_PARAMETERS[name] + cfg.vocab_size * cfg.emb_dim
    assert cfg.emb_dim % cfg.n_heads == 0 and cfg.emb_dim // cfg.n_heads == 64  # OpenAI's head width, every size


def test_hf_directory_logits_match_transformers(hf_gpt2_dir):
    from transformers import GPT2LMHeadModel

    loaded = load_gpt2(str(hf_gpt2_dir))
    assert loaded.directory == hf_gpt2_dir
    assert_same_logits_as_hf(loaded.model, GPT2LMHeadModel.from_pretrained(hf_gpt2_dir))
    # weights are assigned, not copied: still every parameter owns its memory (the tied LM head and the
    # q/k/v parts of c_attn included), so training one or saving them all (safetensors) is safe
    params = list(loaded.model.parameters())
    assert len({p.untyped_storage().data_ptr() for p in params}) == len(params)


def test_untied_lm_head_and_prefixless_keys_are_accepted(tiny_cfg):
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel(hf_gpt2_config(tiny_cfg))
    sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    mapped = hf_to_lorafit(sd, tiny_cfg.n_layers)
    assert torch.equal(mapped["out_head.weight"], sd["wte.weight"])
    # Conv1D [in, out] -> Linear [out, in], and c_attn split in q, k, v order
    d = tiny_cfg.emb_dim
    assert torch.equal(mapped["trf_blocks.0.att.W_key.weight"], sd["h.0.attn.c_attn.weight"][:, d:2 * d].t())


def test_book_pth_state_dict_loads_with_weights_only(tmp_path, hf_gpt2_dir):
    from transformers import GPT2LMHeadModel

    model = load_gpt2(str(hf_gpt2_dir)).model
    sd = model.state_dict()
    for i in range(model.cfg.n_layers):  # the book's MultiHeadAttention saves its causal mask too
        sd[f"trf_blocks.{i}.att.mask"] = torch.triu(torch.ones(64, 64), diagonal=1)
    path = tmp_path / "gpt2-book.pth"
    torch.save(sd, path)
    loaded = load_gpt2(str(path), n_heads=model.cfg.n_heads).model
    assert loaded.cfg == model.cfg
    assert_same_logits_as_hf(loaded, GPT2LMHeadModel.from_pretrained(hf_gpt2_dir))


def test_shape_mismatch_names_the_key(tmp_path, hf_gpt2_dir):
    sd = load_gpt2(str(hf_gpt2_dir)).model.state_dict()
    sd["trf_blocks.1.ff.layers.0.weight"] = torch.zeros(3, 3)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(LorafitError, match=r"trf_blocks\.1\.ff\.layers\.0\.weight has shape \(3, 3\)"):
        load_gpt2(str(tmp_path / "bad.pth"), n_heads=4)


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(LorafitError, match="weights-only"):
        load_gpt2(str(tmp_path / "evil.pth"))


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                    reason="tensorflow is not installed (pip install 'lorafit[tf]') to write and read OpenAI's layout")
def test_openai_tensorflow_layout(tmp_path, hf_gpt2_dir, tiny_cfg):
    import json

    import numpy as np
    import tensorflow as tf
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(hf_gpt2_dir)
    d = tmp_path / "openai"
    d.mkdir()
    (d / "hparams.json").write_text(json.dumps({"n_vocab": tiny_cfg.vocab_size, "n_ctx": tiny_cfg.context_length,
                                                "n_embd": tiny_cfg.emb_dim, "n_head": tiny_cfg.n_heads,
                                                "n_layer": tiny_cfg.n_layers}))
    names = {"weight": "w", "bias": "b"}
    variables = {}
    for k, v in hf.transformer.state_dict().items():
        if k.split(".")[-2:] in (["attn", "bias"], ["attn", "masked_bias"]):  # mask buffers, not weights
            continue
        parts = k.split(".")
        if parts[0] == "h":
            parts = [f"h{parts[1]}"] + parts[2:]
        leaf = parts[-1]
        if parts[-2].startswith("ln"):
            leaf = {"weight": "g", "bias": "b"}[leaf]
        elif parts[0] in ("wte", "wpe"):
            leaf = None
        else:
            leaf = names[leaf]
        arr = v.numpy()
        if leaf == "w":
            arr = arr[None]  # OpenAI stores conv1d weights as [1, in, out]
        name = "model/" + "/".join(parts[:-1] + ([leaf] if leaf else []))
        variables[name] = arr.astype(np.float32)
    with tf.compat.v1.Graph().as_default():  # a TF1-style checkpoint, like OpenAI's release
        vs = {n: tf.compat.v1.Variable(v, name=n) for n, v in variables.items()}
        saver = tf.compat.v1.train.Saver(var_list=vs)
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            saver.save(sess, str(d / "model.ckpt"))
    assert_same_logits_as_hf(load_gpt2(str(d)).model, hf)


def test_unknown_source_is_a_one_line_error(tmp_path):
    with pytest.raises(LorafitError, match="no such file or folder"):
        load_gpt2(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LorafitError, match="neither a Hugging Face folder"):
        load_gpt2(str(tmp_path / "empty"))


def test_offline_preset_says_what_to_download():
    with pytest.raises(LorafitError) as e:
        load_gpt2("gpt2-small")
    msg = str(e.value)
    assert "HF_HUB_OFFLINE" in msg and "huggingface.co/openai-community/gpt2" in msg and "model.safetensors" in msg
    assert "\n" not in msg


def test_random_init_needs_a_preset():
    with pytest.raises(LorafitError, match="needs a preset"):
        load_gpt2("some/folder", random_init=True)


@pytest.mark.skipif(not SHARED_GPT2.is_dir(), reason="../shared/models/gpt2 (OpenAI's BPE files) is not present")
def test_gpt2_tokenizer_from_openai_files():
    enc = load_tokenizer(SHARED_GPT2)
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257 and enc.eot_token == 50256


def test_tokenizer_from_both_file_layouts(tmp_path):
    from conftest import write_bpe

    a = load_tokenizer(write_bpe(tmp_path / "a"))
    b = load_tokenizer(write_bpe(tmp_path / "b", names=("vocab.json", "merges.txt")))
    assert a.encode("hello hell") == b.encode("hello hell") == [258, 78, 220, 258]  # "hell" is one merged token
    assert a.decode(a.encode("héllo ✓")) == "héllo ✓"


def test_tokenizer_folder_without_files_is_refused(tmp_path):
    from lorafit.cli import flag

    with pytest.raises(LorafitError, match="^tokenizer .*: expected a folder with encoder.json") as e:
        load_tokenizer(tmp_path)
    assert e.value.render(flag).startswith(f"--tokenizer {tmp_path}: expected")


def test_greedy_generation_matches_transformers(hf_gpt2_dir):
    from transformers import GPT2LMHeadModel

    model = load_gpt2(str(hf_gpt2_dir)).model
    hf = GPT2LMHeadModel.from_pretrained(hf_gpt2_dir).eval()
    prompt = torch.tensor([[5, 17, 42, 99]])
    ours = generate(model, prompt, 12)
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                         pad_token_id=0)
    assert ours.tolist() == theirs.tolist()


def test_sampling_is_seeded_and_top_k_restricts(hf_gpt2_dir):
    model = load_gpt2(str(hf_gpt2_dir)).model
    prompt = torch.tensor([[1, 2, 3]])
    a = generate(model, prompt, 8, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(7))
    b = generate(model, prompt, 8, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    top1 = generate(model, prompt, 8, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(top1, generate(model, prompt, 8))
