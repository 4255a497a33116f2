"""Long texts (``--long chunk``): overlapping windows cut as documented, their logits pooled by max or mean
(checked against each window run alone), training on pooled logits that learns a word past the truncation
point, and one pooled answer from predict, eval, serve and predict --file."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pandas as pd
import pytest
import torch

from lorafit import BackboneSpec, ClassifierSpec, LoRAConfig, build_classifier
from lorafit.data.batching import encode_texts
from lorafit.data.datasets import DataConfig
from lorafit.errors import LorafitError
from lorafit.inference.evaluate import evaluate_run
from lorafit.inference.explain import explain_texts
from lorafit.data.windows import LongTexts, Windows, frame_of
from lorafit.inference.predict import predict_logits, predict_texts

from conftest import train_args
from test_errors import error_line, run_cli

FILLER = "the quick brown fox jumps over the lazy dog, then"  # the same opening for every text: 50 tokens
WORDS = {"spam": ["win", "cash", "prize"], "ham": ["lunch", "later", "dinner"]}
LONG = ["--long", "chunk", "--max-length", "16", "--stride", "8"]  # mean pooling, the default


def write_tail_task(path: Path, n: int = 120, seed: int = 0) -> Path:
    """Every text opens with the same 50 tokens; its class is told only by a word after them (beyond a
    16-token window), then a number."""
    rng = random.Random(seed)
    rows = [{"text": f"{FILLER} {rng.choice(WORDS[label])} {rng.randint(0, 99)}", "label": label}
            for label in ("spam", "ham") * (n // 2)]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_windows_overlap_cover_the_text_and_keep_special_tokens():
    w = Windows(size=4, stride=2)
    assert w.cut(list(range(10))) == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]]
    assert w.cut(list(range(9))) == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [5, 6, 7, 8]]  # the last ends at the end
    assert w.cut([7, 8]) == [[7, 8]] and [w.count(n) for n in (2, 4, 9, 10)] == [1, 1, 4, 4]
    assert [w.fits(list(range(n))) for n in (2, 4, 5)] == [w.count(n) == 1 for n in (2, 4, 5)] == [True, True, False]
    framed = Windows(size=5, stride=2, frame=(1, 1)).cut([100, *range(7), 200])  # [CLS] 0..6 [SEP]
    assert framed == [[100, 0, 1, 2, 200], [100, 2, 3, 4, 200], [100, 4, 5, 6, 200]]
    rows, owner = w.split([list(range(6)), [9]])
    assert rows == [[0, 1, 2, 3], [2, 3, 4, 5], [9]] and owner.tolist() == [0, 0, 1]


@pytest.mark.parametrize("pool", ["max", "mean"])
def test_pooled_logits_are_the_max_or_mean_of_each_window_run_alone(hf_gpt2_dir, pool):
    spec = ClassifierSpec(backbone=BackboneSpec(str(hf_gpt2_dir)), lora=LoRAConfig(rank=4), labels=["a", "b", "c"])
    model, backbone, _ = build_classifier(spec)
    torch.nn.init.normal_(model.head.weight)
    model.eval()
    texts = [FILLER + " and then some more words to go past", "short one", FILLER]
    enc = encode_texts(backbone.encoder, texts, None, backbone.context_length,
                       long=LongTexts("chunk", stride=5, pool=pool, max_length=12))
    assert enc.chunked == 2 and enc.n_windows > len(texts) + 4
    got = predict_logits(model, enc, backbone.encoder.pad_id, batch_size=2)  # windows of several texts, padded
    for ids, row in zip(enc.ids, got):
        windows = [ids[s:s + 12] for s in range(0, len(ids) - 12, 5)] + [ids[-12:]] if len(ids) > 12 else [ids]
        with torch.no_grad():
            alone = torch.cat([model(torch.tensor([x]), torch.ones(1, len(x), dtype=torch.long)) for x in windows])
        expected = alone.max(dim=0).values if pool == "max" else alone.mean(dim=0)
        torch.testing.assert_close(row, expected, atol=1e-5, rtol=1e-5)


def test_a_word_past_the_truncation_point_is_learned_only_when_chunked(tmp_path, hf_gpt2_dir, capsys):
    data = write_tail_task(tmp_path / "tail.csv")
    runs = {}
    for name, extra in {"chunk": LONG, "truncate": ["--max-length", "16"]}.items():
        code, err = run_cli(capsys, *train_args(hf_gpt2_dir, data, tmp_path / name, "--seed", "1", *extra))
        assert code == 0, err
        runs[name] = json.loads((tmp_path / name / "report.json").read_text())
    chunk, truncate = runs["chunk"], runs["truncate"]
    assert chunk["metrics"]["test"]["accuracy"] >= 0.9, chunk["metrics"]["test"]
    assert truncate["metrics"]["test"]["accuracy"] <= 0.75, truncate["metrics"]["test"]  # one answer for every text
    long = chunk["data"]["long"]
    sizes = chunk["data"]["sizes"]
    assert long["window"] == 16 and long["stride"] == 8 and long["pool"] == "mean"
    assert long["chunked_texts"] == sizes and all(long["windows"][k] >= 5 * sizes[k] for k in sizes)
    assert sum(truncate["data"]["truncated_texts"].values()) == sum(sizes.values())
    md = (tmp_path / "chunk" / "report.md").read_text()
    assert f"{sum(sizes.values())} of {sum(sizes.values())} texts longer than the 16-token window were chunked" in md
    saved = json.loads((tmp_path / "chunk" / "adapter.json").read_text())["long"]
    assert saved == {"long": "chunk", "stride": 8, "pool": "mean", "max_length": 16}


@pytest.fixture(scope="module")
def chunk_run(tmp_path_factory):
    """A --long chunk run on the tail task (max pooling), trained once for the tests below."""
    from conftest import write_hf_gpt2
    from lorafit.cli import main

    tmp = tmp_path_factory.mktemp("long")
    base = write_hf_gpt2(tmp / "hf-gpt2")
    data = write_tail_task(tmp / "tail.csv")
    assert main(train_args(base, data, tmp / "run", "--epochs", "2", *LONG, "--pool", "max")) == 0
    return tmp / "run"


def test_every_way_in_gives_one_pooled_answer(chunk_run, tmp_path, capsys):
    pytest.importorskip("fastapi", reason="lorafit[serve] is not installed")
    from fastapi.testclient import TestClient

    from lorafit.cli import main
    from lorafit.serving.app import create_app
    from lorafit.serving.config import ServeConfig
    from lorafit.serving.model import ServedModel

    text = f"{FILLER} {WORDS['spam'][0]} 7 and a few more words so that it is longer"
    [row] = predict_texts(chunk_run, [text], device="cpu", precision="fp32")
    probs = row["probabilities"]
    # eval (the CLI, then the function it calls): one labelled long text, whose loss is -log p(its class)
    (tmp_path / "one.csv").write_text(f"text,label\n\"{text}\",spam\n")
    code, _ = run_cli(capsys, "eval", "--run", str(chunk_run), "--data", str(tmp_path / "one.csv"), "--precision", "fp32")
    evaluated = evaluate_run(chunk_run, DataConfig(str(tmp_path / "one.csv")), device="cpu", precision="fp32")
    assert code == 0 and math.isclose(evaluated["metrics"]["data"]["loss"], -math.log(probs["spam"]), rel_tol=1e-5)
    # predict --file, to a file and printed
    (tmp_path / "in.txt").write_text(text + "\nshort text\n")
    code, _ = run_cli(capsys, "predict", "--run", str(chunk_run), "--file", str(tmp_path / "in.txt"), "--out",
                      str(tmp_path / "out.csv"), "--precision", "fp32", "--quiet")
    assert code == 0
    scored = pd.read_csv(tmp_path / "out.csv")
    assert math.isclose(scored["prob_spam"][0], probs["spam"], abs_tol=1e-6)
    # serve: /predict (TEI) and /classify (vLLM); no 413 for a text longer than the window
    config = ServeConfig(runs=(str(chunk_run),), device="cpu", precision="fp32", max_input_tokens=16)
    with TestClient(create_app(ServedModel.load(config), config)) as client:
        answer = client.post("/predict", json={"inputs": [text, "short text"]})
        assert answer.status_code == 200, answer.text
        served = {d["label"]: d["score"] for d in answer.json()[0]}
        classified = client.post("/classify", json={"input": text}).json()["data"][0]["probs"]
        info = client.get("/info").json()["adapters"][0]["long"]
        refused = client.post("/explain", json={"inputs": text})
    assert refused.status_code == 422 and "more than the run's 16-token window (long chunk)" in refused.json()["error"]
    with pytest.raises(LorafitError, match="input 0 has [0-9]+ tokens, more than the run's 16-token window"):
        explain_texts(chunk_run, [text], device="cpu", precision="fp32", method="occlusion")
    assert main(["predict", "--run", str(chunk_run), "--explain", "--explain-method", "occlusion", "--device", "cpu",
                 "--precision", "fp32", text]) == 1  # the CLI names the flag
    assert "16-token window (--long chunk)" in capsys.readouterr().err
    assert info["long"] == "chunk" and info["pool"] == "max"
    for label, p in probs.items():
        assert math.isclose(served[label], p, abs_tol=1e-5) and math.isclose(classified[0 if label == "ham" else 1],
                                                                             p, abs_tol=1e-5)


def test_bad_long_settings_are_one_line_errors(tmp_path, hf_gpt2_dir, capsys):
    data = write_tail_task(tmp_path / "tail.csv", n=20)
    for flags, expected in [(["--long", "chunk", "--stride", "0"], "--stride must be > 0, got 0"),
                            (["--long", "chunk", "--stride", "-3"], "--stride must be > 0, got -3"),
                            (["--stride", "4"], "--stride applies to --long chunk"),
                            (["--long", "chunk", "--max-length", "16", "--stride", "16"],
                             "--stride 16 must be smaller than the window (16 tokens"),
                            (["--long", "chunk", "--max-length", "16", "--stride", "20"], "--stride 20 must be smaller"),
                            (["--long", "chunk", "--max-length", "100"], "--max-length 100 is more than the model's "
                                                                         "context (64 tokens)")]:
        code, err = run_cli(capsys, *train_args(hf_gpt2_dir, data, tmp_path / "r", "--overwrite", *flags))
        assert code == 2 and expected in error_line(err), (flags, err)
        assert not (tmp_path / "r" / "adapter.json").exists()


def test_eval_reproduces_the_report_of_a_chunked_run(chunk_run):
    report = json.loads((chunk_run / "report.json").read_text())
    assert report["calibration"]["splits"]["val"]["nll_before"] is not None  # calibration saw the pooled logits
    evaluated = evaluate_run(chunk_run, device="cpu", precision="fp32")["metrics"]
    for split in ("val", "test"):
        for key in ("accuracy", "loss"):
            assert math.isclose(evaluated[split][key], report["metrics"][split][key], rel_tol=1e-6, abs_tol=1e-9)


def test_multi_label_thresholds_are_chosen_on_pooled_logits(tmp_path, hf_gpt2_dir, capsys):
    from test_tasks import write_multi_label

    data = write_multi_label(tmp_path / "m.csv")
    frame = pd.read_csv(data, keep_default_na=False)
    frame["text"] = FILLER + " " + frame["text"]  # every text longer than the 16-token window
    frame.to_csv(data, index=False)
    out = tmp_path / "run"
    code, err = run_cli(capsys, *train_args(hf_gpt2_dir, data, out, "--multi-label", "--epochs", "2", *LONG))
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["long"]["chunked_texts"] == report["data"]["sizes"]
    spec = json.loads((out / "adapter.json").read_text())
    assert set(spec["thresholds"]) == {"late", "money"} and spec["long"]["long"] == "chunk"
    evaluated = evaluate_run(out, device="cpu", precision="fp32")["metrics"]
    for split in ("val", "test"):
        for key in ("micro_f1", "macro_f1", "accuracy"):
            assert math.isclose(evaluated[split][key], report["metrics"][split][key], abs_tol=1e-9), (split, key)
    [row] = predict_texts(out, [frame["text"][0]], device="cpu", precision="fp32")
    assert set(row["probabilities"]) == {"late", "money"} and isinstance(row["labels"], list)


def test_an_export_says_how_to_pool_what_transformers_truncates(chunk_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"  # its test split opens with a text longer than the 64-token context
    shutil.copytree(chunk_run, run)
    test = pd.read_csv(run / "test.csv", keep_default_na=False)
    pd.concat([pd.DataFrame([{"text": FILLER * 3, "label": "ham"}]), test]).to_csv(run / "test.csv", index=False)
    code, err = run_cli(capsys, "export", "--run", str(run), "--format", "hf", "--out", str(tmp_path / "hf"))
    assert code == 0, err  # the agreement check runs the sample texts that fit the context
    readme = (tmp_path / "hf" / "README.md").read_text()
    assert "longer than 16 tokens as overlapping windows of that length starting every 8 tokens" in readme and "the max of the windows' logits" \
        in readme


def test_pairs_are_not_chunked(bpe_dir):
    from lorafit.backbones.tokenizer import TiktokenEncoder, load_tokenizer
    from lorafit.errors import SettingError

    encoder = TiktokenEncoder(load_tokenizer(bpe_dir))
    with pytest.raises(SettingError, match="long chunk reads single texts"):
        encode_texts(encoder, [("first text", "second text")], None, 64, long=LongTexts("chunk"))


def test_every_window_of_a_bert_text_keeps_its_cls_and_sep(tmp_path):
    pytest.importorskip("transformers", reason="lorafit[hf] is not installed")
    from conftest import save_tiny

    from lorafit.backbones.base import BackboneSpec as Spec
    from lorafit.backbones.loader import load_backbone

    backbone = load_backbone(Spec(f"hf:{save_tiny(tmp_path / 'bert', bert=True)}"), lm_head=False)
    tok = backbone.encoder.tokenizer
    assert frame_of(backbone.encoder) == (1, 1)
    assert backbone.encoder.single_template == ([tok.cls_token_id], [tok.sep_token_id])
    text = " ".join(["see you at lunch later ok thanks"] * 4)  # 28 words, 30 tokens with [CLS] and [SEP]
    enc = encode_texts(backbone.encoder, [text], None, backbone.context_length,
                       long=LongTexts("chunk", stride=4, max_length=10))
    rows, _ = enc.windows.split(enc.ids)
    words = tok("see you at lunch later ok thanks", add_special_tokens=False)["input_ids"] * 4
    assert len(rows) == enc.n_windows == 6 and all(len(r) == 10 for r in rows)  # starts 0, 4, ..., 16, then 20
    assert all(r[0] == tok.cls_token_id and r[-1] == tok.sep_token_id for r in rows)
    assert [x for r in rows for x in r[1:-1]][:8] == words[:8] and rows[-1][1:-1] == words[-8:]
