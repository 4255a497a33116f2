"""Pairs of texts (--text-col a,b): read, joined as each base expects, trained, evaluated and predicted on the
tiny GPT-2; the join kept in the adapter; the wrong kind of input refused in one line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd
import pytest
import torch

from lorafit.cli import main
from lorafit.data.datasets import DataConfig, load_splits, read_table
from lorafit.errors import LorafitError, SettingError
from lorafit.inference.predict import predict_texts

TOPICS = {"money": ["WIN cash prize now", "FREE entry txt WIN", "claim your prize call now"],
          "lunch": ["see you at lunch", "ok thanks, later", "dinner tonight?"]}


def write_pairs(path: Path, n: int = 200, seed: int = 0) -> Path:
    """Two texts per row, labelled by whether they are on the same topic: neither text alone tells."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.choice(list(TOPICS)), rng.choice(list(TOPICS))
        rows.append({"first": f"{rng.choice(TOPICS[a])} {rng.randint(0, 9)}",
                     "second": f"{rng.choice(TOPICS[b])} {rng.randint(0, 9)}", "label": "same" if a == b else "diff"})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def cpu(*args) -> list[str]:
    return [*args, "--device", "cpu", "--precision", "fp32"]


def test_two_text_columns_read_as_pairs_and_three_are_refused(tmp_path):
    data = write_pairs(tmp_path / "pairs.csv", n=20)
    df = read_table(data, "first,second")
    assert list(df.columns) == ["text", "text_pair", "label"] and df["text_pair"].iloc[0].split()[-1].isdigit()
    assert read_table(data, ["first", "second"]).equals(df)
    splits = load_splits(DataConfig(str(data), text_col="first,second"))
    assert splits.pair and sum(map(len, (splits.train, splits.val, splits.test))) == 20
    with pytest.raises(SettingError, match="text_col names one text column, or two for text pairs; got 3"):
        DataConfig(str(data), text_col="first,second,label")
    with pytest.raises(LorafitError, match="no column 'answer'"):
        read_table(data, "first,answer")
    (tmp_path / "blank.csv").write_text("a,b,label\nhello,,x\nhi,there,y\nyo,man,x\n")
    assert read_table(tmp_path / "blank.csv", "a,b").attrs["skipped_empty"] == 1


def test_gpt2_joins_a_pair_with_endoftext_and_cuts_the_longer_text_first(hf_gpt2_dir):
    from lorafit.backbones.loader import load_backbone
    from lorafit.backbones.base import BackboneSpec

    enc = load_backbone(BackboneSpec(str(hf_gpt2_dir)), lm_head=False).encoder
    eot = enc.encoding.eot_token
    (ids,), cut = enc.encode_pairs([("ab", "cde")])
    assert ids == enc.encode(["ab"])[0] + [eot] + enc.encode(["cde"])[0] and cut == 0
    (ids,), cut = enc.encode_pairs([("abcdefgh", "xy")], max_length=6)
    assert cut == 1 and ids == enc.encode(["abc"])[0] + [eot] + enc.encode(["xy"])[0]
    assert enc.pair_join.join == "sep" and enc.pair_join.sep == "<|endoftext|>"


def test_hf_tokenizers_use_their_pair_template_or_put_eos_between(tiny_bert, tiny_llama):
    from transformers import AutoTokenizer

    from lorafit.backbones.hf import HFEncoder
    from lorafit.data.windows import frame_of

    bert = HFEncoder(AutoTokenizer.from_pretrained(tiny_bert))
    assert bert.pair_join.join == "template"
    assert frame_of(bert) == (1, 1)  # [CLS] text [SEP]: what pairs and windows keep around the text
    (ids,), _ = bert.encode_pairs([("win cash", "see you at lunch")])
    assert ids == bert.tokenizer("win cash", "see you at lunch")["input_ids"]  # [CLS] a [SEP] b [SEP]
    (ids,), cut = bert.encode_pairs([("win cash prize now", "see you")], max_length=6)
    assert cut == 1 and ids == bert.tokenizer("win cash prize now", "see you", truncation=True, max_length=6)["input_ids"]
    word = HFEncoder(AutoTokenizer.from_pretrained(tiny_llama))  # no pair template: a </s> b
    assert word.pair_join.join == "sep" and word.pair_join.sep == "</s>" and frame_of(word) == (0, 0)
    (ids,), _ = word.encode_pairs([("win cash", "see you")])
    t = word.tokenizer
    assert ids == t("win cash")["input_ids"] + [t.eos_token_id] + t("see you")["input_ids"]


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory):
    """A pair run on the tiny GPT-2: the run directory."""
    from conftest import train_args, write_hf_gpt2

    tmp = tmp_path_factory.mktemp("pairs")
    base = write_hf_gpt2(tmp / "hf-gpt2")
    out = tmp / "run"
    assert main(train_args(base, write_pairs(tmp / "pairs.csv"), out, "--text-col", "first,second",
                           "--epochs", "6", "--lr", "5e-3", "--no-head-bias")) == 0
    return out


def test_a_pair_run_learns_and_keeps_its_join(pair_run, capsys):
    report = json.loads((pair_run / "report.json").read_text())
    assert report["metrics"]["test"]["accuracy"] > 0.8, report["metrics"]
    spec = json.loads((pair_run / "adapter.json").read_text())
    assert spec["text_pair"] == {"join": "sep", "sep": "<|endoftext|>", "columns": ["first", "second"]}
    assert list(pd.read_csv(pair_run / "test.csv").columns) == ["text", "text_pair", "label"]
    assert "Pairs of texts: columns first and second, read as one sequence (first, <|endoftext|>, second)." in \
        (pair_run / "report.md").read_text()
    assert main(["eval", "--run", str(pair_run), "--json", *cpu()]) == 0
    again = json.loads(capsys.readouterr().out)["metrics"]["test"]
    assert again["accuracy"] == report["metrics"]["test"]["accuracy"]


def test_eval_on_a_file_reads_the_runs_own_two_columns(pair_run, tmp_path, capsys):
    data = write_pairs(tmp_path / "more.csv", n=40, seed=5)
    assert main(["eval", "--run", str(pair_run), "--data", str(data), "--json", *cpu()]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["data"]["n"] == 40
    assert main(["eval", "--run", str(pair_run), "--data", str(data), "--text-col", "first", *cpu()]) == 1
    assert "--text-col: the run classifies pairs of texts: name two columns (it was trained on first,second)" in \
        capsys.readouterr().err


def test_predict_pairs_as_arguments_and_from_a_file(pair_run, tmp_path, capsys):
    pairs = [("WIN cash prize now 3", "claim your prize call now 1"), ("WIN cash prize now 3", "see you at lunch 2")]
    rows = predict_texts(pair_run, pairs, device="cpu", precision="fp32")
    assert [(r["text"], r["text_pair"]) for r in rows] == pairs and [r["label"] for r in rows] == ["same", "diff"]
    assert main(["predict", "--run", str(pair_run), "--pair", *pairs[0], "--pair", *pairs[1], "--json", *cpu()]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["probability"] for p in printed] == pytest.approx([r["probability"] for r in rows], abs=1e-6)
    file = tmp_path / "in.csv"
    pd.DataFrame({"id": [1, 2], "first": [a for a, _ in pairs], "second": [b for _, b in pairs]}).to_csv(file, index=False)
    out = tmp_path / "out.csv"
    assert main(["predict", "--run", str(pair_run), "--file", str(file), "--out", str(out), "--quiet", *cpu()]) == 0
    capsys.readouterr()
    scored = pd.read_csv(out)
    assert scored["predicted"].tolist() == ["same", "diff"] and list(scored.columns[:3]) == ["id", "first", "second"]
    assert scored["probability"].tolist() == pytest.approx([r["probability"] for r in rows], abs=1e-5)
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("".join(json.dumps({"q": a, "r": b}) + "\n" for a, b in pairs))
    assert main(["predict", "--run", str(pair_run), "--file", str(jsonl), "--text-col", "q,r", *cpu()]) == 0
    assert [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()] == ["same", "diff"]


def test_the_wrong_kind_of_input_is_refused_in_one_line(pair_run, tmp_path, capsys):
    with pytest.raises(SystemExit, match="2"):
        main(["predict", "--run", str(pair_run), "just one text", *cpu()])
    assert "classifies pairs of texts: give each as --pair FIRST SECOND" in capsys.readouterr().err
    with pytest.raises(LorafitError, match="the model classifies pairs of texts; got single texts"):
        predict_texts(pair_run, ["one", "two"], device="cpu", precision="fp32")
    with pytest.raises(LorafitError, match="input 1 is one text, input 0 a pair"):
        predict_texts(pair_run, [("a", "b"), "c"], device="cpu", precision="fp32")
    with pytest.raises(LorafitError, match="input 0 is not a pair of two texts"):
        predict_texts(pair_run, [("a", "b", "c")], device="cpu", precision="fp32")
    file = tmp_path / "one.csv"
    file.write_text("first,other\nhello,there\n")
    assert main(["predict", "--run", str(pair_run), "--file", str(file), *cpu()]) == 1
    assert "no column 'second'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):
        main(["predict", "--run", str(pair_run), "--file", str(file), "--text-col", "a,b,c", *cpu()])
    assert "one text column, or two for pairs of texts" in capsys.readouterr().err


def test_a_single_text_run_refuses_pairs(gpt2_run, capsys):
    assert main(["predict", "--run", str(gpt2_run), "--pair", "a", "b", *cpu()]) == 1
    assert "the model classifies single texts; got pairs" in capsys.readouterr().err


@pytest.fixture(scope="module")
def pair_client(pair_run, tmp_path_factory):
    """The pair run served next to a single-text adapter of the same base (``/models/single``)."""
    pytest.importorskip("fastapi", reason="lorafit[serve] is not installed")
    from conftest import trained_run
    from fastapi.testclient import TestClient

    from lorafit.adapters.lora import LoRAConfig
    from lorafit.serving.app import create_app
    from lorafit.serving.config import ServeConfig
    from lorafit.serving.model import ServedModel

    single = trained_run(tmp_path_factory.mktemp("single") / "run", str(pair_run.parent / "hf-gpt2"),
                         LoRAConfig(rank=4, alpha=8), head_bias=False)
    config = ServeConfig(runs=(f"pairs={pair_run}", f"single={single}"), device="cpu", precision="fp32")
    with TestClient(create_app(ServedModel.load(config), config)) as client:
        yield client, single


PAIRS = [("WIN cash prize now 3", "claim your prize call now 1"), ("WIN cash prize now 3", "see you at lunch 2")]


def test_serve_takes_tei_s_pair_shapes(pair_run, pair_client):
    client, _ = pair_client
    expected = predict_texts(pair_run, PAIRS, device="cpu", precision="fp32")
    one = client.post("/predict", json={"inputs": list(PAIRS[0])})  # one pair: one list of labels
    assert one.status_code == 200, one.text
    assert {p["label"]: p["score"] for p in one.json()} == pytest.approx(expected[0]["probabilities"], abs=1e-5)
    batch = client.post("/predict", json={"inputs": [list(p) for p in PAIRS]}).json()  # a batch: a list per pair
    assert [b[0]["label"] for b in batch] == [r["label"] for r in expected]
    vllm = client.post("/classify", json={"model": "pairs", "input": [list(p) for p in PAIRS]}).json()
    assert [d["label"] for d in vllm["data"]] == [r["label"] for r in expected]
    info = client.get("/info").json()
    assert info["text_pair"] == {"join": "sep", "sep": "<|endoftext|>", "columns": ["first", "second"]}
    why = client.post("/explain", json={"inputs": list(PAIRS[1])}).json()
    assert why["text"] == "WIN cash prize now 3 \u2016 see you at lunch 2" and "<|endoftext|>" in \
        [t["token"] for t in why["tokens"]]


@pytest.mark.parametrize("body, model, words", [
    ({"inputs": "one text"}, "pairs", "inputs: the model classifies pairs of texts: send [first, second]"),
    ({"inputs": ["a", "b", "c"]}, "pairs", "inputs: a pair is two strings [first, second], got 3"),
    ({"inputs": [["a", "b"], ["c"]]}, "pairs", "inputs[1]: the model classifies pairs of texts"),
    ({"inputs": [["a", "b", "c"]]}, "pairs", "inputs[0] must be [text] or [first, second]"),
    ({"inputs": [["a", " "]]}, "pairs", "inputs[0][1] is an empty string"),
    ({"inputs": [["a", "b"]]}, "single", "inputs[0] is a pair; the model classifies single texts"),
])
def test_the_wrong_kind_of_input_is_a_422(pair_client, body, model, words):
    client, _ = pair_client
    r = client.post("/predict", json={**body, "model": model})
    assert r.status_code == 422 and words in r.json()["error"], r.text


def test_a_single_text_adapter_is_served_beside_the_pair_one(pair_client):
    client, single = pair_client
    expected = predict_texts(single, ["see you at lunch 2", "WIN 3"], device="cpu", precision="fp32")
    got = client.post("/predict", json={"inputs": ["see you at lunch 2", "WIN 3"], "model": "single"}).json()
    for row, exp in zip(got, expected):
        assert {p["label"]: p["score"] for p in row} == pytest.approx(exp["probabilities"], abs=1e-5)
    tei_batch = client.post("/models/single", json={"inputs": [["see you at lunch 2"], ["WIN 3"]]}).json()
    assert [r[0]["label"] for r in tei_batch] == [r[0]["label"] for r in got]
    cards = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert cards["single"]["text_pair"] is None and cards["pairs"]["text_pair"]["columns"] == ["first", "second"]


def test_serve_cuts_pairs_at_the_run_s_max_length_in_one_pass(pair_run, tmp_path):
    """A pair run trained with a max_length below the server's limit: served pairs are cut longest first to it
    from their whole texts, as predict cuts them, tokenised once; only a pair over the server's own limit
    without truncate costs a second pass, to be refused with 413."""
    pytest.importorskip("fastapi", reason="lorafit[serve] is not installed")
    import shutil

    from lorafit.serving.config import ServeConfig
    from lorafit.serving.model import RequestError, ServedModel

    run = shutil.copytree(pair_run, tmp_path / "run")
    spec = json.loads((run / "adapter.json").read_text())
    spec["long"]["max_length"] = 6
    (run / "adapter.json").write_text(json.dumps(spec))
    served = ServedModel.load(ServeConfig(runs=(str(run),), device="cpu", precision="fp32"))
    encoder, calls = served.encoder, []
    real = encoder.encode_pairs
    encoder.encode_pairs = lambda pairs, max_length=None: calls.append(max_length) or real(pairs, max_length)
    expected = real(PAIRS, 6)[0]
    assert all(len(x) > 6 for x in real(PAIRS)[0])  # every pair is cut
    for truncate in (True, False):
        calls.clear()
        ids = served.encode(PAIRS, truncate, adapter=served.default)
        assert ids == expected and calls == ([6] if truncate else [6, None])
    calls.clear()
    with pytest.raises(RequestError, match="more than the limit of 10"):
        served.encode(PAIRS, False, limit=10, adapter=served.default)
    got = torch.softmax(torch.stack(served.logits(expected, [served.default] * 2, 4)), -1)
    with pytest.warns(UserWarning, match="2 pair"):  # predict cuts them too
        reference = predict_texts(run, PAIRS, device="cpu", precision="fp32")
    labels = served.default.labels
    assert got.flatten().tolist() == pytest.approx([r["probabilities"][k] for r in reference for k in labels], abs=1e-5)


@pytest.mark.parametrize("fmt", ["hf", "peft", "onnx"])
def test_exports_join_pairs_as_lorafit_does(pair_run, tmp_path, fmt, capsys):
    transformers = pytest.importorskip("transformers")
    if fmt != "hf":
        pytest.importorskip("peft" if fmt == "peft" else "onnxruntime")
    from lorafit.backbones.loader import load_backbone
    from lorafit.adapters.hf_layout import pair_note
    from lorafit.adapters.storage import read_spec

    out = tmp_path / fmt
    if tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (4, 49):  # pools before the first pad
        assert main(["export", "--run", str(pair_run), "--format", fmt, "--out", str(out)]) == 1
        assert "exporting it needs transformers >= 4.49; nothing written" in capsys.readouterr().err
        return
    assert main(["export", "--run", str(pair_run), "--format", fmt, "--out", str(out)]) == 0  # logits checked inside
    encoder = load_backbone(read_spec(pair_run).backbone, lm_head=False).encoder
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    firsts, seconds = [a for a, _ in PAIRS], [b for _, b in PAIRS]
    assert tokenizer(firsts, seconds)["input_ids"] == encoder.encode_pairs(PAIRS)[0]
    assert "token_type_ids" not in tokenizer(firsts[0], seconds[0])  # GPT-2 would add them to its embeddings
    readme = (out / "README.md").read_text()
    assert pair_note(read_spec(pair_run)) in readme  # one sentence for every format: how the texts are joined
    assert '"text_pair": "second text"' in readme or fmt == "peft"
    expected = predict_texts(pair_run, PAIRS, device="cpu", precision="fp32")
    if fmt == "hf":
        classify = transformers.pipeline("text-classification", model=str(out), device="cpu")
        got = [classify({"text": a, "text_pair": b}) for a, b in PAIRS]
        got = [g[0] if isinstance(g, list) else g for g in got]
        assert [g["label"] for g in got] == [r["label"] for r in expected]
        assert [g["score"] for g in got] == pytest.approx([r["probability"] for r in expected], abs=1e-5)
    if fmt == "peft":  # read back into lorafit, the folder is still a pair classifier
        back = predict_texts(out, PAIRS, device="cpu", precision="fp32")
        assert [r["probability"] for r in back] == pytest.approx([r["probability"] for r in expected], abs=1e-5)


def test_a_llama_pair_classifier_exports_its_eos_join(tiny_llama, tmp_path):
    """A Llama-architecture base whose tokenizer has no pair template: ``a </s> b``, written into tokenizer.json."""
    transformers = pytest.importorskip("transformers")
    from lorafit.adapters.build import build_classifier
    from lorafit.adapters.lora import LoRAConfig, lora_layers
    from lorafit.adapters.storage import ClassifierSpec, save_adapter
    from lorafit.backbones.base import BackboneSpec
    from lorafit.backbones.pairs import PairJoin

    spec = ClassifierSpec(BackboneSpec(f"hf:{tiny_llama}"), LoRAConfig(rank=4, alpha=8), ["diff", "same"],
                          head_bias=False, text_pair=PairJoin(columns=("a", "b")))
    model, _, spec = build_classifier(spec, seed=3)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.normal_(0, 0.3)
        model.head.weight.normal_(0, 1.0)
    save_adapter(tmp_path / "run", model, spec)
    assert spec.text_pair == PairJoin("sep", "</s>", ("a", "b"))
    out = tmp_path / "hf"
    assert main(["export", "--run", str(tmp_path / "run"), "--format", "hf", "--out", str(out)]) == 0
    pairs = [("win cash now", "see you at lunch"), ("ok thanks", "are we still on for dinner tonight")]
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer(*map(list, zip(*pairs)))["input_ids"] == \
        [tokenizer(a)["input_ids"] + [tokenizer.eos_token_id] + tokenizer(b)["input_ids"] for a, b in pairs]
    classify = transformers.pipeline("text-classification", model=str(out), device="cpu")
    expected = predict_texts(tmp_path / "run", pairs, device="cpu", precision="fp32")
    got = [classify({"text": a, "text_pair": b}) for a, b in pairs]
    got = [g[0] if isinstance(g, list) else g for g in got]
    assert [g["score"] for g in got] == pytest.approx([r["probability"] for r in expected], abs=1e-5)
