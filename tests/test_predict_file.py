"""``predict --file``: CSV / TSV / JSONL / text streamed a chunk at a time, every input column kept, the output
written whole at the end or not at all, a bad row refused by its line number."""

from __future__ import annotations

import csv
import json
import random

import numpy as np
import pandas as pd
import pytest

from lorafit.cli import main
from lorafit.data.rows import RowReader
from lorafit.inference import score_file as score_module
from lorafit.inference.predict import predict_texts

WORDS = "win cash prize now call free entry claim see you at lunch later ok thanks dinner tonight".split()


def texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(1, 14))) for _ in range(n)]


def write_csv(path, rows: list[list], header=("id", "text", "label")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


def expected_probs(run, items: list[str]) -> np.ndarray:
    return np.array([list(r["probabilities"].values()) for r in predict_texts(run, items, precision="fp32")])


def predict(*args) -> int:
    return main(["predict", "--precision", "fp32", "--quiet", *map(str, args)])


def test_csv_rows_keep_their_columns_and_get_lorafit_s_predictions(gpt2_run, tmp_path, monkeypatch):
    items = texts(3000)
    items[7] = 'quoted, "with a comma"\nand a line break'
    src = write_csv(tmp_path / "in.csv", [[i, t, "ham" if i % 2 else "spam"] for i, t in enumerate(items)])
    sizes = []
    real = score_module.predict_proba
    monkeypatch.setattr(score_module, "predict_proba", lambda model, enc, *a, **k: sizes.append(len(enc.ids))
                        or real(model, enc, *a, **k))
    scorer = score_module.FileScorer(gpt2_run, precision="fp32")
    done = score_module.score_file(scorer, RowReader(src, chunk_size=256), tmp_path / "out.csv", progress=False)
    assert done.rows == 3000 and max(sizes) == 256 and sum(sizes) == 3000  # chunks, not the file, reach the model
    out = pd.read_csv(tmp_path / "out.csv", dtype={"id": int, "text": str, "label": str}, keep_default_na=False)
    assert list(out.columns) == ["id", "text", "label", "predicted", "probability", "prob_ham", "prob_spam"]
    assert out["text"].tolist() == items and out["id"].tolist() == list(range(3000))
    probs = expected_probs(gpt2_run, items)
    np.testing.assert_allclose(out[["prob_ham", "prob_spam"]].to_numpy(), probs, atol=1e-5, rtol=0)
    assert out["predicted"].tolist() == [["ham", "spam"][k] for k in probs.argmax(1)]
    assert np.allclose(out["probability"], probs.max(1), atol=1e-5)


def test_jsonl_tsv_and_plain_text(gpt2_run, tmp_path, capsys):
    items = texts(40, seed=1)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"msg": t, "meta": {"n": i}}) + "\n" for i, t in enumerate(items)) + "\n")
    assert predict("--run", gpt2_run, "--file", src, "--text-col", "msg", "--out", tmp_path / "out.jsonl") == 0
    assert "40 texts scored in" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["msg"] for r in rows] == items and rows[3]["meta"] == {"n": 3}
    probs = expected_probs(gpt2_run, items)
    np.testing.assert_allclose([[r["prob_ham"], r["prob_spam"]] for r in rows], probs, atol=1e-5, rtol=0)

    tsv = tmp_path / "sms.tsv"  # the SMS collection's layout: label<TAB>text, no header
    tsv.write_text("".join(f"ham\t{t}\n" for t in items), encoding="utf-8")
    assert predict("--run", gpt2_run, "--file", tsv, "--no-header", "--out", tmp_path / "tsv.csv") == 0
    out = pd.read_csv(tmp_path / "tsv.csv", dtype=str, keep_default_na=False)
    assert list(out.columns[:2]) == ["0", "1"] and out["1"].tolist() == items

    semi = tmp_path / "excel.csv"  # semicolons, and the byte-order mark Excel writes: sniffed as for training data
    semi.write_bytes(b"\xef\xbb\xbftext;n\n" + "".join(f"{t};{i}\n" for i, t in enumerate(items)).encode())
    assert predict("--run", gpt2_run, "--file", semi, "--out", tmp_path / "semi.csv") == 0
    out = pd.read_csv(tmp_path / "semi.csv", dtype=str, keep_default_na=False)
    assert list(out.columns[:2]) == ["text", "n"] and out["text"].tolist() == items

    txt = tmp_path / "msgs.txt"
    txt.write_text("\n\n".join(items[:5]) + "\n   \n")  # blank lines are skipped
    capsys.readouterr()
    assert predict("--run", gpt2_run, "--file", txt, "--json") == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in printed] == items[:5]
    np.testing.assert_allclose([list(r["probabilities"].values()) for r in printed], probs[:5], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,content,message", [
    ("bad.csv", "id,text\n" + "".join(f"{i},hello {i}\n" for i in range(2000)) + "2000,one,too many\n",
     "line 2002 has 3 fields, the header 2"),
    ("bad.jsonl", "".join(json.dumps({"text": f"hi {i}"}) + "\n" for i in range(1500)) + "{not json\n",
     "line 1501 is not valid JSON"),
    ("nofield.jsonl", '{"text": "a"}\n{"body": "b"}\n', "line 2 has no text in 'text'"),
    ("cols.csv", "id,body\n1,hello\n", "no column 'text'; columns found: id, body (choose with --text-col)"),
    ("taken.csv", "text,predicted\nhello,x\n", "already has a column 'predicted'"),
])
def test_a_bad_row_is_named_by_its_line_and_nothing_is_written(name, content, message, gpt2_run, tmp_path, capsys):
    src = tmp_path / name
    src.write_text(content, encoding="utf-8")
    out = tmp_path / "out.csv"
    out.write_text("what was there before\n")
    assert predict("--run", gpt2_run, "--file", src, "--out", out) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)
    assert out.read_text() == "what was there before\n"  # untouched, and no temporary file left beside it
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_bad_byte_is_named_by_its_line(gpt2_run, tmp_path, capsys):
    src = tmp_path / "msgs.txt"
    src.write_bytes(b"hello\nworld\ncaf\xe9\n")
    assert predict("--run", gpt2_run, "--file", src) == 1
    assert "bad byte in line 3" in capsys.readouterr().err
    assert predict("--run", gpt2_run, "--file", src, "--encoding", "cp1252", "--json") == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["text"] == "café"


def test_predict_usage_errors(gpt2_run, tmp_path):
    for args in (["hello", "--file", str(tmp_path / "x.txt")], ["hello", "--out", str(tmp_path / "o.csv")], []):
        with pytest.raises(SystemExit) as exit_:
            predict("--run", gpt2_run, *args)
        assert exit_.value.code == 2
