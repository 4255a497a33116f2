"""Data: the seed's split sizes, user files in every format, and padding that never changes a prediction."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lorafit import DataConfig, LorafitError, load_splits, prepare_splits, read_table
from lorafit.errors import UsageError
from lorafit.data.batching import collate, encode_texts, eval_order, train_order
from lorafit.adapters.classifier import Classifier, pool
from lorafit.backbones.gpt2 import GPTConfig, GPTModel

from conftest import SHARED_SMS, TINY


@pytest.mark.skipif(not SHARED_SMS.is_file(), reason="../shared/data/sms_spam_collection is not present")
def test_seed_split_sizes_on_the_real_file():
    a = load_splits(DataConfig(SHARED_SMS), seed=42)
    assert (len(a.train), len(a.val), len(a.test)) == (1045, 149, 300)
    assert a.labels == ["ham", "spam"]
    for part in (a.train, a.val, a.test):
        assert set(part.label) == {"ham", "spam"}
    b = load_splits(DataConfig(SHARED_SMS), seed=42)
    assert a.train.equals(b.train) and a.val.equals(b.val) and a.test.equals(b.test)
    assert not a.train.equals(load_splits(DataConfig(SHARED_SMS), seed=7).train)
    full = load_splits(DataConfig(SHARED_SMS, balance=False), seed=42)
    assert len(full.train) + len(full.val) + len(full.test) == 5574
    # stratified: each split keeps the 6.5 : 1 ratio
    for part in (full.train, full.val, full.test):
        assert abs((part.label == "spam").mean() - 747 / 5574) < 0.01


def test_formats_and_columns(tmp_path):
    rows = [{"msg": f"text {i}", "y": i % 3} for i in range(30)]
    (tmp_path / "d.csv").write_text("msg,y\n" + "".join(f'"{r["msg"]}, quoted",{r["y"]}\n' for r in rows))
    (tmp_path / "d.tsv").write_text("msg\ty\n" + "".join(f'{r["msg"]}\t{r["y"]}\n' for r in rows))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("d.csv", "d.tsv", "d.jsonl"):
        df = read_table(tmp_path / name, text_col="msg", label_col="y")
        assert len(df) == 30 and sorted(set(df.label)) == ["0", "1", "2"]
    assert read_table(tmp_path / "d.csv", "msg", "y").text[0] == "text 0, quoted"
    s = prepare_splits(read_table(tmp_path / "d.jsonl", "msg", "y"), seed=1)
    assert s.labels == ["0", "1", "2"]


def test_integer_labels_sort_numerically(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f"t{i},{i % 11}\n" for i in range(44)))
    assert prepare_splits(read_table(tmp_path / "d.csv")).labels == [str(i) for i in range(11)]


def test_missing_columns_list_what_was_found(tmp_path):
    (tmp_path / "d.csv").write_text("message;category\nhello;ham\n")
    with pytest.raises(LorafitError, match=r"no column 'text', 'label'; columns found \(semicolon-separated text; "
                                           r"another separator: sep\): message, category \(choose with"):
        read_table(tmp_path / "d.csv")


@pytest.mark.parametrize("content,match", [
    (b"", "empty"),
    (b"text,label\nok,a\n\xff\xfe bad,b\n", "not UTF-8 .*line 3; .*pass encoding cp1252"),
    (b"text,label\n  ,a\n ,b\n", "every text is empty"),
])
def test_bad_files(tmp_path, content, match):
    (tmp_path / "d.csv").write_bytes(content)
    with pytest.raises(LorafitError, match=match):
        read_table(tmp_path / "d.csv")


def test_blank_texts_are_skipped_and_counted(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\nhello,a\n   ,b\nworld,b\n")
    df = read_table(tmp_path / "d.csv")
    assert list(df.text) == ["hello", "world"] and df.attrs["skipped_empty"] == 1


def test_single_class_and_unseen_labels(tmp_path):
    (tmp_path / "one.csv").write_text("text,label\n" + "".join(f"t{i},a\n" for i in range(10)))
    with pytest.raises(LorafitError, match="only one class"):
        load_splits(DataConfig(tmp_path / "one.csv"))
    (tmp_path / "two.csv").write_text("text,label\n" + "".join(f"t{i},{'ab'[i % 2]}\n" for i in range(10)))
    (tmp_path / "val.csv").write_text("text,label\nx,a\ny,c\n")
    with pytest.raises(LorafitError, match="'c' were never seen in training"):
        load_splits(DataConfig(tmp_path / "two.csv", val=tmp_path / "val.csv", test=tmp_path / "val.csv"))


def test_truncation_warns_with_a_count(bpe_dir):
    from lorafit.backbones.tokenizer import TiktokenEncoder
    from lorafit.backbones.tokenizer import load_tokenizer

    enc = TiktokenEncoder(load_tokenizer(bpe_dir))
    with pytest.warns(UserWarning, match="2 text\\(s\\) longer than 5 tokens"):
        out = encode_texts(enc, ["abcdefgh", "ab", "abcdefghijk"], None, 5)
    assert [len(x) for x in out.ids] == [5, 2, 5] and out.truncated == 2


def test_the_gpt2_encoder_tokenises_in_the_calling_thread(bpe_dir, monkeypatch):
    """tiktoken's batch call starts a thread pool per call (serve paid it on every request): same ids without."""
    import threading

    from lorafit.backbones.tokenizer import TiktokenEncoder, load_tokenizer

    enc = TiktokenEncoder(load_tokenizer(bpe_dir))
    texts = ["hello world", "special text <|endoftext|> stays plain", "", "abc"]
    expected = enc.encoding.encode_ordinary_batch(texts)
    monkeypatch.setattr(threading.Thread, "start", lambda self: pytest.fail("a thread was started"))
    assert enc.encode(texts) == expected


def test_batches_pad_to_their_own_longest_and_bucket():
    lengths = np.array([3, 50, 4, 48, 5, 47, 6, 49] * 8)
    order = train_order(lengths, 4, np.random.default_rng(0), bucket=4)
    assert sorted(np.concatenate(order).tolist()) == list(range(len(lengths)))  # every example once
    padded = sum(len(b) * lengths[b].max() for b in order)
    plain = sum(len(b) * lengths[b].max() for b in train_order(lengths, 4, np.random.default_rng(0), bucket=1))
    real = lengths.sum()
    assert padded - real < 0.5 * (plain - real)  # bucketing removes most of the padding
    assert [b.tolist() for b in order] == [b.tolist() for b in train_order(lengths, 4, np.random.default_rng(0), bucket=4)]
    evaluation = eval_order(lengths, 4)
    assert sorted(np.concatenate(evaluation).tolist()) == list(range(len(lengths)))
    fewest = sum(4 * chunk.max() for chunk in np.sort(lengths).reshape(-1, 4))  # the least padding batches of 4 allow
    assert sum(len(b) * lengths[b].max() for b in evaluation) == fewest


def test_prediction_never_depends_on_padding():
    """Last-real-token pooling on right-padded batches equals running each sequence alone."""
    torch.manual_seed(0)
    model = Classifier(GPTModel(GPTConfig(**TINY), lm_head=False), TINY["emb_dim"], 3).eval()
    from lorafit.data.batching import Encoded

    g = torch.Generator().manual_seed(0)
    data = Encoded([torch.randint(0, 300, (n,), generator=g).tolist() for n in (1, 9, 4, 17, 2)], None, 0)
    batch = collate(data, np.arange(5), pad_id=299)
    assert batch.input_ids.shape == (5, 17) and batch.attention_mask.sum(1).tolist() == [1, 9, 4, 17, 2]  # padded rows
    with torch.no_grad():
        batched = model(batch.input_ids, batch.attention_mask)
        for i, ids in enumerate(data.ids):
            alone = model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
            torch.testing.assert_close(batched[i], alone[0], atol=1e-5, rtol=0)


def test_pooling_modes():
    h = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(pool(h, mask, "last"), torch.stack([h[0, 1], h[1, 2]]))
    assert torch.equal(pool(h, mask, "first"), h[:, 0])
    torch.testing.assert_close(pool(h, mask, "mean"), torch.stack([h[0, :2].mean(0), h[1].mean(0)]))


def test_pooled_last_block_equals_the_full_forward():
    """The last block run only at the pooled rows, and blocks run without the padding, give the full forward's values."""
    torch.manual_seed(0)
    gpt = GPTModel(GPTConfig(**TINY)).eval()
    ids = torch.randint(0, 300, (4, 12))
    last = torch.tensor([11, 0, 5, 7])
    with torch.no_grad():
        full = gpt.hidden_states(ids)[torch.arange(4), last]
        torch.testing.assert_close(gpt.hidden_states(ids, at=last), full, atol=1e-5, rtol=0)
        mask = (torch.arange(12)[None, :] <= last[:, None]).long()  # padding after `last`: skipped rows
        torch.testing.assert_close(gpt.hidden_states(ids, mask, at=last), full, atol=1e-5, rtol=0)
        real = mask.bool()
        packed = gpt.hidden_states(ids, mask)
        torch.testing.assert_close(packed[real], gpt.hidden_states(ids)[real], atol=1e-5, rtol=0)
        assert not packed[~real].any()  # padded positions come back as zeros


def _frame(n: int = 40, labels=("ham", "spam")):
    import pandas as pd

    return pd.DataFrame({"msg": [f"text number {i}" for i in range(n)], "y": [labels[i % len(labels)] for i in range(n)]})


def test_parquet_files(tmp_path):
    pytest.importorskip("pyarrow")
    path = tmp_path / "d.parquet"
    _frame().to_parquet(path)
    splits = load_splits(DataConfig(path, text_col="msg", label_col="y"), seed=1)
    assert splits.labels == ["ham", "spam"] and len(splits.train) + len(splits.val) + len(splits.test) == 40
    with pytest.raises(LorafitError, match=r"d.parquet: no column 'text', 'label'; columns found: msg, y"):
        read_table(path)
    _frame(labels=("ham",)).to_parquet(path)
    with pytest.raises(LorafitError, match="only one class"):
        load_splits(DataConfig(path, text_col="msg", label_col="y"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(LorafitError, match="not a readable Parquet file"):
        read_table(tmp_path / "bad.parquet")


def test_hf_datasets_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"msg": datasets.Value("string"), "y": datasets.ClassLabel(names=["ham", "spam"])})
    frame = _frame()
    frame["y"] = frame["y"].map({"ham": 0, "spam": 1})
    ds = datasets.Dataset.from_pandas(frame, features=features, preserve_index=False)
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(10)), "test": ds.select(range(10, 20))}
                         ).save_to_disk(tmp_path / "ds")
    src = f"hf:{tmp_path / 'ds'}"
    splits = load_splits(DataConfig(src, text_col="msg", label_col="y", val_split="validation", test_split="test"))
    assert splits.labels == ["ham", "spam"]  # ClassLabel ids became their names
    assert (len(splits.train), len(splits.val), len(splits.test)) == (40, 10, 10)
    assert set(splits.val["text"]) == set(frame["msg"][:10])
    assert len(load_splits(DataConfig(src, text_col="msg", label_col="y")).train) == 28  # one split: 70/10/20
    with pytest.raises(LorafitError, match=r"no split 'dev' \(splits: train, validation, test\)"):
        load_splits(DataConfig(src, text_col="msg", label_col="y", split="dev"))
    with pytest.raises(LorafitError, match=r"\(train\): no column 'text'"):
        load_splits(DataConfig(src))
    with pytest.raises(UsageError, match="go together"):
        DataConfig(src, text_col="msg", label_col="y", val_split="validation")
    datasets.Dataset.from_pandas(_frame(labels=("ham",)), preserve_index=False).save_to_disk(tmp_path / "one")
    with pytest.raises(LorafitError, match="only one class"):
        load_splits(DataConfig(f"hf:{tmp_path / 'one'}", text_col="msg", label_col="y"))


def test_hf_dataset_through_the_cli(tmp_path, request, capsys):
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("transformers")
    hf_gpt2_dir = request.getfixturevalue("hf_gpt2_dir")
    from lorafit.cli import main

    rows = [("WIN cash prize now call", "spam"), ("see you at lunch later", "ham")] * 20
    datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [y for _, y in rows]}).save_to_disk(tmp_path / "ds")
    assert main(["train", "--model", str(hf_gpt2_dir), "--data", f"hf:{tmp_path / 'ds'}", "--out", str(tmp_path / "r"),
                 "--epochs", "1", "--rank", "2", "--quiet"]) == 0
    assert (tmp_path / "r" / "test.csv").is_file()
    assert main(["eval", "--run", str(tmp_path / "r"), "--data", f"hf:{tmp_path / 'ds'}", "--split", "nope"]) == 1
    assert "no split 'nope'" in capsys.readouterr().err


# ---- files as they come: separators, encodings, quoting, index columns, labels that are not labels ----------

def test_the_sms_format_is_label_tab_text_without_a_header(sms_file):
    df = read_table(sms_file)
    assert set(df.label) == {"ham", "spam"} and len(df) == len(sms_file.read_text().splitlines())
    assert not df.text.isin(["ham", "spam"]).any()


EXCEL_EU = "text;label\nWIN a prize, call now;spam\nsee you at 5, ok?;ham\n\"a text; with the separator\";ham\n"


@pytest.mark.parametrize("name,content,sep", [
    ("eu.csv", EXCEL_EU, None),  # what Excel writes where the decimal mark is a comma
    ("eu.txt", EXCEL_EU, None),
    ("comma.csv", "text,label\nhello; there,ham\nWIN; now,spam\n\"x, y\",ham\n", None),  # ; inside texts
    ("pipe.dat", "label|text\nham|hello, there\nspam|WIN; now\nham|x\n", None),
    ("forced.csv", "text:label\nhello, there:ham\nWIN; now:spam\nx:ham\n", ":"),
    ("tabbed.csv", "text\tlabel\nhello, there\tham\nWIN; now\tspam\nx\tham\n", "tab"),
])
def test_the_separator_is_sniffed_or_given(tmp_path, name, content, sep):
    (tmp_path / name).write_text(content)
    df = read_table(tmp_path / name, sep=sep)
    assert len(df) == 3 and set(df.label) == {"ham", "spam"}
    assert not any(t.startswith(("text", "label")) for t in df.text)
    if name == "eu.csv":
        assert df.text[2] == "a text; with the separator"


def test_a_bad_sep_is_a_usage_error():
    from lorafit.data.formats import parse_sep

    assert parse_sep("semicolon") == ";" and parse_sep("\\t") == "\t" and parse_sep("TAB") == "\t"
    for bad in ("", ";;", '"', "\n"):
        with pytest.raises(UsageError, match="^sep .*one character"):
            parse_sep(bad)


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])  # Excel's "CSV UTF-8" and "Unicode text"
def test_byte_order_marks_name_the_encoding(tmp_path, encoding):
    sep = "\t" if encoding == "utf-16" else ","
    (tmp_path / "d.csv").write_bytes(f"text{sep}label\ncafé crème{sep}ham\nWIN{sep}spam\n".encode(encoding))
    df = read_table(tmp_path / "d.csv")
    assert list(df.text) == ["café crème", "WIN"] and list(df.label) == ["ham", "spam"]


def test_latin1_is_refused_with_the_flag_and_read_with_it(tmp_path):
    (tmp_path / "d.csv").write_bytes("text,label\ncafé,ham\nWIN,spam\n".encode("latin-1"))
    with pytest.raises(LorafitError, match=r"d.csv: not UTF-8 text \(bad byte at line 2; .*pass encoding cp1252\)$"):
        read_table(tmp_path / "d.csv")
    assert read_table(tmp_path / "d.csv", encoding="latin-1").text[0] == "café"


def test_pandas_index_column_is_dropped(tmp_path):
    import pandas as pd

    pd.DataFrame({"text": ["a", "b", "c"], "label": ["x", "y", "x"]}).to_csv(tmp_path / "d.csv")  # index=True
    assert list(read_table(tmp_path / "d.csv").columns) == ["text", "label"]
    (tmp_path / "e.csv").write_text(",msg\n0,hello\n")
    with pytest.raises(LorafitError, match=r"columns found \(comma-separated text; another separator: sep\): msg "):
        read_table(tmp_path / "e.csv")


@pytest.mark.parametrize("content,match", [
    ('{"text": "a", "label": "x"}\n\n{"text": "b", "label": {"name": "y"}}\n', r"line 3: the label is a JSON dict"),
    ('{"text": "a", "label": "x"}\n{"text": "b", "label": ["y"]}\n', r"line 2: the label is a JSON list"),
    ('{"text": "a", "label": "x"}\n{"text": "b", "label": null}\n', r"line 2: the label is missing"),
    ('{"text": "a", "label": "x"}\n{"text": "b"}\n', r"line 2: the label is missing"),
    ('{"text": "a", "label": "x"}\n{"text": {"t": 1}, "label": "y"}\n', r"line 2: the text is a JSON dict"),
    ('{"text": "a", "label": "x"}\n{"text": "b", "label": "y",\n', r"line 2 is not valid JSON \(.* column \d+\)$"),
    ('{"text": "a", "label": "x"}\n["b", "y"]\n', r"line 2 is a JSON list, expected an object"),
])
def test_jsonl_rows_that_are_not_labelled_texts_are_refused_by_line(tmp_path, content, match):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(LorafitError, match=match):
        read_table(tmp_path / "d.jsonl")


# the library names the setting (sep); the CLI renders it as --sep (test_sep_through_the_cli)
@pytest.mark.parametrize("content,match", [
    ("text,label\na,x\nb,\n", r"d.csv: data row 2: the label is empty$"),
    ('text,label\na,x\n"b,y\nc,z\n', r"cannot be read as comma-separated text \(.*\); quote texts that hold the "
                                     r"separator, or pass sep$"),
    ("text;label\na;x\nb;y;z\n", r"cannot be read as semicolon-separated text \(.*line 3, saw 3\); quote texts"),
])
def test_table_surprises_are_one_line(tmp_path, content, match):
    (tmp_path / "d.csv").write_text(content)
    with pytest.raises(LorafitError, match=match) as e:
        read_table(tmp_path / "d.csv")
    assert "\n" not in str(e.value)


def test_sep_through_the_cli(tmp_path, capsys):
    from lorafit.cli import main

    (tmp_path / "d.csv").write_text("text:label\n" + "".join(f"t{i}:{'ab'[i % 2]}\n" for i in range(20)))
    with pytest.raises(SystemExit, match="2"):
        main(["train", "--data", str(tmp_path / "d.csv"), "--sep", "?!", "--out", str(tmp_path / "r")])
    assert "--sep '?!': give one character" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "d.csv"), "--out", str(tmp_path / "r")]) == 1
    assert "columns found (comma-separated text; another separator: --sep): text:label" in capsys.readouterr().err


def test_any_table_python_csv_writes_is_read_back_with_its_separator_sniffed(tmp_path):
    """Property: texts with separators, quotes, newlines and non-ASCII, written by Python's csv module with any
    of the four separators (tab-separated text unquoted, as it is read), come back unchanged."""
    import csv
    import io

    from hypothesis import HealthCheck, given, settings, strategies as st

    from lorafit.data.formats import SEPARATORS

    words = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")) | st.sampled_from(',;|"\n '),
                    min_size=1, max_size=30).filter(lambda t: t.strip() and "\r" not in t)
    plain = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Z"), exclude_characters='"'),
                    min_size=1, max_size=30)
    labels = st.sampled_from(["ham", "spam", "0", "1", "café"])

    @settings(max_examples=150, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(sep=st.sampled_from(list(SEPARATORS)), data=st.data())
    def round_trip(sep, data):
        texts = data.draw(st.lists(plain if sep == "\t" else words, min_size=2, max_size=12))
        rows = [(t, data.draw(labels)) for t in texts]
        buf = io.StringIO()
        writer = csv.writer(buf, delimiter=sep, lineterminator="\n",
                            quoting=csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL, escapechar=None)
        writer.writerows([("text", "label"), *rows])
        (tmp_path / "d.csv").write_text(buf.getvalue(), encoding="utf-8")
        df = read_table(tmp_path / "d.csv")
        assert list(zip(df.text, df.label)) == rows

    round_trip()


def test_balancing_modes_and_column_lists_read_alike_everywhere():
    import pandas as pd
    from lorafit.data.datasets import _columns, balancing_plan, text_columns
    from lorafit.errors import SettingError

    counts = pd.Series({"ham": 30, "spam": 10})
    assert DataConfig(balance=True).balance == balancing_plan(counts, True, "here")["method"] == "undersample"
    assert DataConfig(balance=False).balance == balancing_plan(counts, False, "here")["method"] == "none"
    for bad in (lambda: DataConfig(balance="most"), lambda: balancing_plan(counts, "most", "here")):
        with pytest.raises(SettingError, match="balance must be one of auto, undersample, weights, none"):
            bad()
    with pytest.raises(SettingError, match="got 3: a, b, c"):
        DataConfig(text_col="a, b,c")
    assert DataConfig(text_col=" q , a ").pair and text_columns(["q ", "a"]) == ["q", "a"]
    assert _columns("q, a", " x , y,", True) == (["q", "a"], ["x", "y"])  # label columns: empty names dropped
    assert _columns(None, "label", True) == (["text"], "label")
