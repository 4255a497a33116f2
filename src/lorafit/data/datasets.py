"""Labelled texts: the SMS Spam Collection (downloaded, verified, cached), any CSV / TSV / JSONL / Parquet
file, or a Hugging Face dataset (``hf:<hub id or save_to_disk folder>``, one split per role).

Preparation follows the book: under-sample every class to the rarest one's count (``balance``),
shuffle with the seed, split 70 / 10 / 20 — on the SMS data that is 1,045 / 149 / 300 messages. Where
under-sampling would throw away most of a data set of more than two classes, the default keeps every text
and weights the loss instead (:func:`balancing_plan`).
"""

from __future__ import annotations

import codecs
import hashlib
import io
import os
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import FieldError, LorafitError, SettingError
from ..files import atomic_path
from .formats import TableFormat, encoding_of, json_objects, parse_sep, sniff_format

SMS_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
SMS_MD5 = "1949b64a224790d01335c2bf8a0e48b2"
SMS_NAME = "SMSSpamCollection"
SPLIT_FRACTIONS = (0.7, 0.1)  # train, validation; the rest is test
SPLIT_NAMES = ("train", "val", "test")
BALANCING = ("auto", "undersample", "weights", "none")
LABEL_SEP = "|"  # a multi-label text's labels in one cell: "sports|politics"
TEXT, TEXT_PAIR = "text", "text_pair"  # a frame's text columns: one text, or a pair (transformers' names)
TRUE_CELLS, FALSE_CELLS = ("1", "true", "yes", "1.0"), ("0", "false", "no", "0.0", "")


def lorafit_home() -> Path:
    return Path(os.environ.get("LORAFIT_HOME", Path.home() / ".cache" / "lorafit"))


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def sms_spam_path() -> Path:
    """The cached, checksum-verified SMS Spam Collection; downloaded from UCI on first use."""
    target = lorafit_home() / "data" / "sms_spam_collection" / SMS_NAME
    if target.is_file() and md5(target) == SMS_MD5:
        return target
    try:
        with urllib.request.urlopen(SMS_URL, timeout=60) as r:
            payload = r.read()
        content = zipfile.ZipFile(io.BytesIO(payload)).read(SMS_NAME)
    except (OSError, zipfile.BadZipFile, KeyError) as e:
        raise FieldError("cannot download the SMS Spam Collection ({}); fetch {}, unzip it and pass "
                         "{data} path/to/{} (or put it at {})", e, SMS_URL, SMS_NAME, target) from e
    if hashlib.md5(content).hexdigest() != SMS_MD5:
        raise LorafitError(f"{SMS_URL}: {SMS_NAME} has md5 {hashlib.md5(content).hexdigest()}, expected {SMS_MD5}")
    with atomic_path(target) as tmp:
        tmp.write_bytes(content)
    return target


def balancing_mode(balance: str | bool) -> str:
    """``balance`` checked, one of BALANCING (True / False, as older runs saved it: undersample / none)."""
    if balance is True or balance is False:
        balance = "undersample" if balance else "none"
    if balance not in BALANCING:
        raise SettingError("{balance} must be one of {}, got {!r}", ", ".join(BALANCING), balance)
    return balance


@dataclass
class DataConfig:
    """Which labelled texts, and how they are read and split."""

    data: str | None = None  # file; None downloads the SMS Spam Collection
    val: str | None = None
    test: str | None = None
    # a name, or a 0-based column number with header=False; two ("question,answer" or a list): text pairs
    text_col: str | list[str] | None = None
    label_col: str | None = None
    # auto: under-sample every class to the rarest one's count (the book's way) for two classes, or for more
    # when that keeps at least half the texts; else keep them all and weight the loss (weights). Also:
    # undersample, weights, none (True / False: undersample / none, as older runs saved it)
    balance: str | bool = "auto"
    encoding: str = "utf-8"
    header: bool = True  # False: CSV/TSV files have no header row
    sep: str | None = None  # delimited files' separator; None: sniffed (data.formats.sniff_format)
    split: str = "train"  # hf: datasets: the split read as --data
    val_split: str | None = None  # hf: datasets: validation and test splits (together), else 70/10/20
    test_split: str | None = None
    multi_label: bool = False  # any number of labels per text: "a|b" cells, or several 0/1 --label-col columns

    def __post_init__(self) -> None:
        if (self.val is None) != (self.test is None):
            raise SettingError("{val} and {test} go together (or give neither and the data is split 70/10/20)")
        if (self.val_split is None) != (self.test_split is None):
            raise SettingError("{val_split} and {test_split} go together (or give neither and the data is split "
                               "70/10/20)")
        if self.val_split is not None and not str(self.data or "").startswith("hf:"):
            raise SettingError("{val_split} / {test_split} apply to {data} hf:<dataset>; use {val} / {test} for files")

        columns = text_columns(self.text_col)
        if len(columns) > 2:
            raise SettingError("{text_col} names one text column, or two for text pairs; got {}: {}",
                               len(columns), ", ".join(columns))
        self.balance = balancing_mode(self.balance)

    @property
    def pair(self) -> bool:
        """Two text columns: every example is a pair of texts."""
        return len(text_columns(self.text_col)) == 2

    def read(self, source: str | Path, split: str | None = None) -> pd.DataFrame:
        """``source`` (a file, or ``split`` of an ``hf:`` dataset) read with these columns and options."""
        return read_table(source, self.text_col, self.label_col, encoding=self.encoding, header=self.header,
                          sep=self.sep, split=split or self.split, multi_label=self.multi_label)


@dataclass
class Splits:
    train: pd.DataFrame  # columns: text (and text_pair for pairs), label (label names as strings)
    val: pd.DataFrame
    test: pd.DataFrame
    labels: list[str]  # class names; a class's index is its position here
    skipped_empty: int = 0  # empty or whitespace-only texts dropped from the data file
    multi_label: bool = False  # labels are "a|b" sets, encoded as (N, C) 0/1 rows
    balancing: dict = field(default_factory=dict)  # what was done: method, texts read, kept, class counts

    @property
    def pair(self) -> bool:
        return TEXT_PAIR in self.train.columns

    def encode_labels(self, df: pd.DataFrame, where: str) -> np.ndarray:
        return encode_labels(df, self.labels, where, self.multi_label)

    def save(self, directory: Path) -> None:
        """Write the exact split as CSV, so a run can be audited and repeated."""
        for name in SPLIT_NAMES:
            with atomic_path(directory / f"{name}.csv") as tmp:
                getattr(self, name).to_csv(tmp, index=False)

    @classmethod
    def load(cls, directory: Path, labels: list[str], hint: str = "", multi_label: bool = False,
             pair: bool = False) -> "Splits":
        """The split a run saved with :meth:`save` (``pair``: of text pairs)."""
        missing = [f"{name}.csv" for name in SPLIT_NAMES if not (directory / f"{name}.csv").is_file()]
        if missing:
            raise FieldError("{}: no {}" + hint, directory, ", ".join(missing))
        cols = [TEXT, TEXT_PAIR] if pair else None
        return cls(*(read_table(directory / f"{name}.csv", cols, multi_label=multi_label) for name in SPLIT_NAMES),
                   labels, multi_label=multi_label)


def label_sets(labels: pd.Series) -> list[list[str]]:
    """"b|a" cells -> [["b", "a"], ...]; an empty cell is a text with no label."""
    return [[x for x in cell.split(LABEL_SEP) if x] for cell in labels]


def encode_labels(df: pd.DataFrame, labels: list[str], where: str, multi_label: bool = False) -> np.ndarray:
    """Class indices (N,) for ``df``'s labels, or with ``multi_label`` (N, C) 0/1 rows; a label outside
    ``labels`` is refused by name."""
    index = {name: i for i, name in enumerate(labels)}
    if multi_label:
        sets = label_sets(df["label"])
        _refuse_unknown({x for s in sets for x in s} - set(index), labels, where)
        out = np.zeros((len(df), len(labels)), dtype=np.float32)
        for row, s in enumerate(sets):
            out[row, [index[x] for x in s]] = 1.0
        return out
    _refuse_unknown(set(df["label"]) - set(index), labels, where)
    return df["label"].map(index).to_numpy(dtype=np.int64)


def _refuse_unknown(unknown: set, labels: list[str], where: str) -> None:
    unknown = sorted(unknown)
    if unknown:
        raise LorafitError(f"{where}: labels {', '.join(map(repr, unknown[:5]))} were never seen in training "
                           f"(known: {', '.join(labels)})")


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """A text file's content (a byte-order mark overrides ``encoding``); bytes that are not valid in the
    encoding are refused with their line."""
    raw = path.read_bytes()
    encoding = encoding_of(raw[:4], encoding)
    try:
        return raw.decode(encoding)
    except LookupError as e:
        raise SettingError("{encoding} {}: not a text encoding Python knows", encoding) from e
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        utf8 = codecs.lookup(encoding).name in ("utf-8", "utf-8-sig")
        hint = "; if it is Latin-1 or Windows text, pass {encoding} cp1252" if utf8 else ""
        raise FieldError("{}: not {} text (bad byte at line {}" + hint + ")", path, "UTF-8" if utf8 else encoding,
                         line) from e


def read_table(path: str | Path, text_col: str | list | None = None, label_col: str | None = None, *,
               encoding: str = "utf-8", header: bool = True, split: str = "train", sep: str | None = None,
               multi_label: bool = False) -> pd.DataFrame:
    """Read labelled texts as a (text, label) frame with string labels.

    A file with ``label<TAB>text`` lines and no header (the SMS Spam Collection's format) is read as such;
    otherwise delimited text (the separator sniffed, see :func:`.formats.sniff_format`, or ``sep``), JSONL
    (.jsonl / .json) or Parquet (.parquet) with ``text_col`` / ``label_col`` columns (default ``text`` and
    ``label``); two text columns (``"question,answer"`` or a list) read text pairs, as columns ``text`` and
    ``text_pair``. ``header=False``: delimited text without a header row, whose columns are named by 0-based
    numbers (default: label 0, text 1). ``hf:<id or folder>`` reads ``split`` of a Hugging Face dataset
    (:func:`read_hf_dataset`). ``multi_label``: the label cell holds ``a|b`` (or a list), or ``label_col``
    names several 0/1 columns (``"sports,politics"``), one per label; the frame's label is then the
    ``|``-joined set, sorted.
    """
    if str(path).startswith("hf:"):
        text_cols, label_col = _columns(text_col, label_col, True)
        return _text_label_frame(read_hf_dataset(str(path), split, label_col), f"{path} ({split})", text_cols,
                                 label_col, True, multi_label=multi_label)
    path = Path(path)
    if not path.is_file():
        raise LorafitError(f"{path}: data file not found")
    text_cols, label_col = _columns(text_col, label_col, header)
    if path.suffix.lower() == ".parquet" and sep is None:
        return _text_label_frame(read_parquet(path), str(path), text_cols, label_col, True, multi_label=multi_label)
    content = read_text(path, encoding)
    if not content.strip():
        raise LorafitError(f"{path}: data file is empty")
    columns = (*text_cols, *(label_col if isinstance(label_col, list) else [label_col]))
    fmt = sniff_format(path, content[:65536], parse_sep(sep) if sep else None, columns if header else ())
    if fmt.kind == "jsonl":
        return _text_label_frame(read_jsonl(path, content), str(path), text_cols, label_col, True, fmt, multi_label)
    return _text_label_frame(_read_delimited(path, content, fmt, header, columns), str(path), text_cols,
                             label_col, header, fmt, multi_label)


def _read_delimited(path: Path, content: str, fmt: TableFormat, header: bool, columns: tuple) -> pd.DataFrame:
    """Delimited text as strings; a first column without a name (pandas' index, ``to_csv``'s default) dropped.
    ``columns``: the (text, label) names wanted."""
    read = lambda **kw: pd.read_csv(io.StringIO(content), dtype=str, keep_default_na=False, sep=fmt.sep,  # noqa: E731
                                    quoting=fmt.quoting, **kw)
    try:
        if not header:
            return read(header=None)
        df = read()
        if (fmt.sep == "\t" and len(columns) == 2 and not set(columns) & set(df.columns)
                and _looks_headerless(content)):
            return read(header=None, names=[columns[1], columns[0]])  # the SMS Spam Collection: label<TAB>text
    except (ValueError, pd.errors.ParserError) as e:
        raise FieldError("{}: cannot be read as {} ({}); quote texts that hold the separator, or pass {sep}", path,
                         fmt.describe(), str(e).strip().splitlines()[0]) from e
    unnamed = [c for c in df.columns[:1] if str(c).startswith("Unnamed: 0")]
    return df.drop(columns=unnamed)


def read_jsonl(path: Path, content: str) -> pd.DataFrame:
    """One JSON object a line (blank lines skipped); the line numbers kept for the checks after."""
    numbered = list(json_objects(content.splitlines(), str(path)))
    lines, records = [n for n, _ in numbered], [r for _, r in numbered]
    return pd.DataFrame.from_records(records, index=pd.Index(lines, name="line"))


def _text_label_frame(df: pd.DataFrame, where: str, text_cols: list, label_col, header: bool,
                      fmt: TableFormat | None = None, multi_label: bool = False) -> pd.DataFrame:
    """Any table -> (text, label), or for two ``text_cols`` (text, text_pair, label), with string labels;
    examples with an empty text dropped and counted."""
    label_cols = label_col if isinstance(label_col, list) else [label_col]
    if len(label_cols) > 1 and not multi_label:
        raise SettingError("{label_col} {}: several label columns need {multi_label}", ",".join(map(str, label_cols)))
    missing = [c for c in (*text_cols, *label_cols) if c not in df.columns]
    if missing:
        fields = "{text_col} / {label_col}" + ("" if header else " (column numbers from 0, with {header})")
        delimited = fmt is not None and fmt.kind == "delimited"
        read_as = " ({}; another separator: {sep})" if delimited else ""
        raise FieldError("{}: no column {}; columns found" + read_as + ": {} (choose with " + fields + ")", where,
                         ", ".join(map(repr, missing)), *((fmt.describe(),) if delimited else ()),
                         ", ".join(map(str, df.columns)))
    if df.empty:
        raise LorafitError(f"{where}: data file is empty")
    for col in text_cols:
        _check_scalars(df[col], where, "text")
    if multi_label:
        label = _label_sets_column(df, label_cols, where)
    else:
        _check_scalars(df[label_col], where, "label")
        label = df[label_col].astype(str).str.strip()
    out = pd.DataFrame({**{name: df[col].astype(str) for name, col in zip((TEXT, TEXT_PAIR), text_cols)},
                        "label": label})
    out = out.reset_index(drop=True)
    blank = np.logical_or.reduce([out[name].str.strip() == "" for name in (TEXT, TEXT_PAIR)[:len(text_cols)]])
    if blank.all():
        raise LorafitError(f"{where}: every text is empty")
    out = out[~blank].reset_index(drop=True)
    out.attrs["skipped_empty"] = int(blank.sum())
    return out


def _check_scalars(values: pd.Series, where: str, what: str) -> None:
    """Refuse, naming its line (JSONL) or data row, a label or text that is a JSON object or list, null or
    missing, or an empty label: it would silently become a class (or a text) of its own."""
    for key, value in values.items():
        bad = ("is empty" if what == "label" and isinstance(value, str) and not value.strip() else
               f"is a JSON {type(value).__name__}, not a string or number" if isinstance(value, (dict, list)) else
               "is missing" if value is None or (isinstance(value, float) and np.isnan(value)) else None)
        if bad:
            place = f"line {key}" if values.index.name == "line" else f"data row {key + 1}"
            raise LorafitError(f"{where}: {place}: the {what} {bad}")


def _label_sets_column(df: pd.DataFrame, label_cols: list, where: str) -> pd.Series:
    """Multi-label cells as sorted ``a|b`` strings: from one column of ``a|b`` strings (or lists), or from
    one 0/1 column per label (named by the column)."""
    if len(label_cols) == 1:
        cells = [c.split(LABEL_SEP) if isinstance(c, str) else list(c) if c is not None else []
                 for c in df[label_cols[0]]]
        return pd.Series([LABEL_SEP.join(sorted({str(x).strip() for x in c} - {""})) for c in cells], index=df.index)
    flags = {}
    for col in label_cols:
        cells = df[col].astype(str).str.strip().str.lower()
        bad = sorted(set(cells) - set(TRUE_CELLS) - set(FALSE_CELLS))
        if bad:
            raise FieldError("{}: column {!r} holds {!r}; label columns of {multi_label} hold 0 or 1", where, col, bad[0])
        flags[col] = cells.isin(TRUE_CELLS).to_numpy()
    return pd.Series([LABEL_SEP.join(sorted(str(c) for c in label_cols if flags[c][i])) for i in range(len(df))],
                     index=df.index)


def read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except ImportError as e:
        raise LorafitError(f"{path}: reading Parquet needs pyarrow: pip install 'lorafit[parquet]'") from e
    except (OSError, ValueError) as e:
        raise LorafitError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from e


def read_hf_dataset(source: str, split: str, label_col: str) -> pd.DataFrame:
    """One split of a Hugging Face dataset as a frame: ``hf:<folder>`` written by ``save_to_disk``, or
    ``hf:<hub id>`` through ``load_dataset`` (cached in the datasets cache; HF_HUB_OFFLINE=1 reads only
    the cache). Integer ``ClassLabel`` labels become their names."""
    try:
        import datasets
    except ImportError as e:
        raise FieldError("{data} {}: Hugging Face datasets need the datasets library: "
                         "pip install 'lorafit[datasets]'", source) from e
    ident = source.removeprefix("hf:")
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        if Path(ident).is_dir():
            ds = datasets.load_from_disk(ident)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise FieldError("{data} {}: no split {!r} (splits: {})", source, split, ", ".join(ds))
                ds = ds[split]
            elif str(ds.split or "train") != split:
                raise FieldError("{data} {}: no split {!r} (one split: {})", source, split, ds.split or "train")
        else:
            ds = datasets.load_dataset(ident, split=split)
    except (OSError, ValueError, FileNotFoundError, ConnectionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FieldError("{data} {}: cannot load split {!r} ({})", source, split, first) from e
    df = ds.to_pandas()
    feature = ds.features.get(label_col)
    if isinstance(feature, datasets.ClassLabel) and label_col in df.columns:
        df[label_col] = df[label_col].map(feature.int2str)
    return df


def text_columns(text_col: str | list | tuple | None) -> list[str]:
    """``text_col`` as a list of column names: none, one, or two (a pair; "a,b" or a list)."""
    if text_col is None:
        return []
    if isinstance(text_col, (list, tuple)):
        return [str(c).strip() for c in text_col]
    return [c.strip() for c in str(text_col).split(",")] if "," in str(text_col) else [str(text_col)]


def _columns(text_col: str | list | None, label_col: str | None, header: bool) -> tuple:
    """Column keys as pandas will name them: names, or integers for a file without a header row; the text
    columns as a list (two for pairs)."""
    label_col, text_cols = _comma_list(label_col), text_columns(text_col)
    if header:
        return text_cols or [TEXT], label_col or "label"
    text_cols, label_col = text_cols or ["1"], label_col if label_col is not None else "0"
    labels = label_col if isinstance(label_col, list) else [label_col]
    if not all(str(c).isdigit() for c in (*text_cols, *labels)):
        raise SettingError("{header}: {text_col} and {label_col} take column numbers (from 0), got {!r} and {!r}",
                           ",".join(text_cols), label_col)
    return [int(c) for c in text_cols], [int(c) for c in labels] if isinstance(label_col, list) else int(label_col)


def _comma_list(col: str | None):
    """"a,b" -> ["a", "b"] (read as :func:`text_columns` reads them, empty names dropped); a single name (or
    None) stays as it is."""
    if col is None or "," not in str(col):
        return col
    return [c for c in text_columns(col) if c]


def _looks_headerless(content: str) -> bool:
    """``label<TAB>text`` on every one of the first lines, with a short label: the SMS format."""
    lines = [ln for ln in content.splitlines()[:20] if ln.strip()]
    return all(ln.count("\t") == 1 and len(ln.split("\t", 1)[0]) <= 20 for ln in lines)


def label_names(labels: pd.Series) -> list[str]:
    """Class names in a stable order: numeric order for integer labels, else alphabetical."""
    uniq = sorted(set(labels))
    try:
        return sorted(uniq, key=int)
    except ValueError:
        return uniq


def _split_frame(df: pd.DataFrame, rng: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    df = df.iloc[rng.permutation(len(df))].reset_index(drop=True)
    n_train = int(len(df) * SPLIT_FRACTIONS[0])
    n_val = int(len(df) * SPLIT_FRACTIONS[1])
    return df.iloc[:n_train], df.iloc[n_train:n_train + n_val], df.iloc[n_train + n_val:]


def class_names(df: pd.DataFrame, where: str, multi_label: bool = False) -> list[str]:
    """The class (or, multi-label, label) names of a training frame, which needs two at least."""
    if multi_label:
        labels = label_names(pd.Series([x for s in label_sets(df["label"]) for x in s], dtype=str))
        if len(labels) < 2:
            raise FieldError("{}: {} distinct label(s) ({}); {multi_label} needs at least two", where, len(labels),
                             ", ".join(labels) or "none")
        return labels
    labels = label_names(df["label"])
    if len(labels) < 2:
        raise LorafitError(f"{where}: only one class ({labels[0]!r}); a classifier needs at least two")
    return labels


def balancing_plan(counts: pd.Series, balance: str | bool, where: str) -> dict:
    """What balancing does to classes of these ``counts``: ``undersample`` (to the rarest class), ``weights``
    (every text kept, the loss weighted by inverse class frequency) or ``none``; ``auto`` under-samples two
    classes (the book's SMS recipe) and more when that keeps at least half the texts, else weights.
    Under-sampling that drops more than half the texts is said in a warning with the numbers."""
    balance = balancing_mode(balance)
    total, rarest = int(counts.sum()), int(counts.min())
    kept = rarest * len(counts)
    method = balance
    if balance == "auto":
        method = "undersample" if len(counts) == 2 or 2 * kept >= total else "weights"
    plan = {"method": method, "texts": total, "kept": kept if method == "undersample" else total,
            "class_counts": {str(k): int(v) for k, v in counts.items()}}
    if method == "undersample" and 2 * kept < total:
        warnings.warn(f"{where}: under-sampling every class to the rarest one ({counts.idxmin()!r}, {rarest:,} texts) "
                      f"keeps {kept:,} of {total:,} texts ({100 * (total - kept) / total:.0f} % dropped); "
                      "--balance weights keeps them all and weights the loss instead", stacklevel=3)
    return plan


def prepare_splits(df: pd.DataFrame, *, seed: int = 42, balance: str | bool = "auto", where: str = "data",
                   multi_label: bool = False) -> Splits:
    """Balance (see :func:`balancing_plan`), shuffle and split 70/10/20; unless under-sampled, the split is
    stratified. Multi-label data is neither balanced nor stratified (a text has several classes): a plain
    shuffled split."""
    labels = class_names(df, where, multi_label)
    rng = np.random.default_rng(seed)
    if multi_label:
        return Splits(*(d.reset_index(drop=True) for d in _split_frame(df, rng)), labels, multi_label=True,
                      balancing={"method": "none", "texts": len(df), "kept": len(df)})
    plan = balancing_plan(df["label"].value_counts().sort_index(), balance, where)
    balance = plan["method"] == "undersample"
    if balance:
        n = df["label"].value_counts().min()
        df = pd.concat([g.iloc[rng.permutation(len(g))[:n]] for _, g in df.groupby("label", sort=True)])
        parts = [_split_frame(df, rng)]
    else:  # stratified: every class split 70/10/20 on its own
        parts = [_split_frame(g, rng) for _, g in df.groupby("label", sort=True)]
    train, val, test = (pd.concat([p[i] for p in parts]) for i in range(3))
    if not balance:  # interleave the classes again
        train, val, test = (d.iloc[rng.permutation(len(d))] for d in (train, val, test))
    return Splits(*(d.reset_index(drop=True) for d in (train, val, test)), labels, balancing=plan)


def load_splits(cfg: DataConfig | None = None, *, seed: int = 42) -> Splits:
    """The whole data step: read (or download) ``cfg.data``, then split it 70/10/20 with ``seed``, or use
    the given val/test files (or, for ``hf:`` datasets, the val/test splits)."""
    cfg = cfg or DataConfig()
    source = str(cfg.data) if cfg.data else str(sms_spam_path())
    df = cfg.read(source)
    where = f"{source} ({cfg.split})" if source.startswith("hf:") else source
    if cfg.val is None and cfg.val_split is None:
        splits = prepare_splits(df, seed=seed, balance=cfg.balance, where=where, multi_label=cfg.multi_label)
    else:
        labels = class_names(df, where, cfg.multi_label)
        train = df.iloc[np.random.default_rng(seed).permutation(len(df))].reset_index(drop=True)
        if cfg.val_split is not None:
            roles = {"val": (source, cfg.val_split), "test": (source, cfg.test_split)}
        else:
            roles = {"val": (cfg.val, None), "test": (cfg.test, None)}
        frames = {role: cfg.read(path, split) for role, (path, split) in roles.items()}
        for role, (path, split) in roles.items():
            encode_labels(frames[role], labels, f"{path} ({split})" if split else str(path), cfg.multi_label)
        splits = Splits(train, frames["val"], frames["test"], labels, multi_label=cfg.multi_label,
                        balancing={"method": "none", "texts": len(df), "kept": len(df),
                                   "note": "validation and test given: the data is kept as is"})
    splits.skipped_empty = df.attrs.get("skipped_empty", 0)
    return splits
