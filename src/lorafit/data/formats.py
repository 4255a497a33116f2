"""What a table file is, found from its name and first lines: JSON lines, Parquet, or delimited text and its
separator (``,`` ``;`` tab ``|``), and the text encoding its byte-order mark announces. One place, so that
every reader of texts (training data, eval data, ``predict --file``) agrees on the same file.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import LorafitError, SettingError

SEPARATORS = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}  # sniffed in this order of preference
SEP_NAMES = {**{name: sep for sep, name in SEPARATORS.items()}, "\\t": "\t"}
SNIFF_ROWS = 50
BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
        (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))  # UTF-32 LE's mark starts like UTF-16's


@dataclass(frozen=True)
class TableFormat:
    kind: str  # "delimited", "jsonl" or "parquet"
    sep: str | None = None  # delimited text: the separator
    quoting: int = csv.QUOTE_MINIMAL  # tab-separated text is read without quoting (SMS texts hold stray quotes)

    def describe(self) -> str:
        if self.kind != "delimited":
            return "JSON lines" if self.kind == "jsonl" else "Parquet"
        return f"{SEPARATORS.get(self.sep, repr(self.sep))}-separated text"


def parse_sep(value: str) -> str:
    """``--sep``: one character, or comma / semicolon / tab / pipe / \\t by name."""
    sep = SEP_NAMES.get(value.lower() if len(value) > 1 else value, value)
    if len(sep) != 1 or sep in "\"\r\n":
        raise SettingError("{sep} {!r}: give one character (or comma, semicolon, tab, pipe)", value)
    return sep


def encoding_of(head: bytes, encoding: str = "utf-8") -> str:
    """The encoding to decode with: the one a byte-order mark names (Excel writes UTF-8 and UTF-16 with one),
    else ``encoding``. A UTF-8 mark is dropped, not read as part of the first column's name."""
    for bom, name in BOMS:
        if head.startswith(bom):
            return name
    return encoding


def sniff_format(path: str | Path, sample: str, sep: str | None = None, expected: tuple = ()) -> TableFormat:
    """The format of ``path`` whose text starts with ``sample``. ``sep`` forces delimited text; else
    ``.jsonl``/``.json`` and ``.parquet`` go by name, ``.tsv`` is tab-separated and anything else is sniffed:
    the separator whose header row holds the ``expected`` column names, else the one that splits the first
    rows into the same number (two or more) of columns."""
    suffix = Path(path).suffix.lower()
    if sep is not None:
        return _delimited(sep)
    if suffix == ".parquet":
        return TableFormat("parquet")
    if suffix in (".jsonl", ".json"):
        return TableFormat("jsonl")
    if suffix == ".tsv":
        return _delimited("\t")
    return _delimited(sniff_sep(sample, expected))


def sniff_sep(sample: str, expected: tuple = ()) -> str:
    """The likeliest separator of delimited ``sample``; a comma when nothing splits it (one column)."""
    lines = sample.splitlines(keepends=True)
    if len(lines) > 1 and not sample.endswith(("\n", "\r")):
        lines = lines[:-1]  # a sample cut mid-line
    best, best_score = ",", (False, 0.0, 0)
    for i, sep in enumerate(SEPARATORS):
        rows = [r for r in _rows(lines, _delimited(sep)) if r]
        if not rows or len(rows[0]) < 2:
            continue
        width = len(rows[0])
        named = bool(expected) and all(str(name) in rows[0] for name in expected)
        score = (named, sum(len(r) == width for r in rows) / len(rows), -i)
        if score > best_score:
            best, best_score = sep, score
    return best


def _rows(lines: list[str], fmt: TableFormat) -> list[list[str]]:
    try:
        reader = csv.reader(io.StringIO("".join(lines)), delimiter=fmt.sep, quoting=fmt.quoting)
        return [row for row, _ in zip(reader, range(SNIFF_ROWS))]
    except csv.Error:  # an unclosed quote, a NUL: this separator's reading is no better than none
        return []


def _delimited(sep: str) -> TableFormat:
    return TableFormat("delimited", sep, csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL)


def json_objects(lines: Iterable[str], where: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of JSON-lines text; a line that is not one JSON object
    is refused naming ``where`` and the line."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LorafitError(f"{where}: line {n} is not valid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(record, dict):
            raise LorafitError(f"{where}: line {n} is a JSON {type(record).__name__}, expected an object "
                               f"such as {{\"text\": ..., \"label\": ...}}")
        yield n, record
