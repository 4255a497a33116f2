"""Unlabelled rows streamed from a file of any length, and rows streamed out: what ``predict --file`` reads
and writes, a chunk at a time, so memory does not grow with the file.

In: delimited text (.csv, .tsv, .tab, or any file with ``sep``; the separator and a byte-order mark's
encoding found by :mod:`.formats`, as for training data), JSON lines (.jsonl, .json) or plain text
(anything else: one text a line, blank lines skipped). Every row keeps all its columns; the text is the
``text`` column (or ``text_col``; without a header row, a 0-based column number, by default the last
column); two columns (``text_col`` "a,b") give each row's pair of texts. A row that cannot be read is
refused in one line naming its file line. Out: CSV or JSON lines
(by the suffix), written through :func:`lorafit.files.atomic_path`: whole at the end, or not at all.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

from ..errors import LorafitError, UsageError
from ..files import atomic_path
from .datasets import text_columns
from .formats import TableFormat, encoding_of, json_objects, parse_sep, sniff_format

TABLE_SUFFIXES = (".csv", ".tsv", ".tab", ".jsonl", ".json")
SNIFF_BYTES = 65536
csv.field_size_limit(2**31 - 1)  # a long message is a text, not an attack: the default 128 KiB cap refuses it


@dataclass
class Chunk:
    """Consecutive rows of a file, each with all its columns, and their texts."""

    rows: list[dict]
    texts: list  # texts, or pairs of texts (two text columns)


@dataclass
class RowReader:
    """A file's rows, ``chunk_size`` at a time (:meth:`chunks`); the columns are known after the first."""

    path: Path
    text_col: str | None = None  # None: "text", or the last column without a header row; "a,b": pairs
    header: bool = True  # delimited text: the first row names the columns
    sep: str | None = None  # delimited text with this separator, whatever the file's name
    encoding: str = "utf-8"
    chunk_size: int = 2048
    columns: list[str] | None = None  # the input's columns, in order, once read

    def __post_init__(self):
        self.path = Path(self.path)
        self.keys = text_columns(self.text_col)  # [] (the default column), one, or two (pairs)
        if len(self.keys) > 2:
            raise UsageError(f"--text-col {self.text_col}: one text column, or two for pairs of texts")
        if not self.path.is_file():
            raise LorafitError(f"--file {self.path}: not found")
        try:
            codecs.lookup(self.encoding)
        except LookupError as e:
            raise UsageError(f"--encoding {self.encoding}: not a text encoding Python knows") from e
        with open(self.path, "rb") as f:
            head = f.read(SNIFF_BYTES)
        self.encoding = encoding_of(head, self.encoding)
        self.table: TableFormat | None = None  # None: plain text, one text a line
        if self.sep is not None or self.path.suffix.lower() in TABLE_SUFFIXES:
            sample = head.decode(self.encoding, errors="replace")
            expected = tuple(self.keys or ["text"]) if self.header else ()
            self.table = sniff_format(self.path, sample, parse_sep(self.sep) if self.sep else None, expected)
            if self.table.kind == "parquet":
                raise LorafitError(f"--file {self.path}: Parquet is not streamed; give CSV, TSV or JSONL")

    def count_lines(self) -> int:
        """Lines in the file (a cheap upper bound on rows, for a progress bar's total)."""
        n, last = 0, b"\n"
        with open(self.path, "rb") as f:
            while block := f.read(1 << 20):
                n, last = n + block.count(b"\n"), block[-1:]
        delimited = self.table is not None and self.table.kind == "delimited"
        return n + (last != b"\n") - (self.header and delimited)

    def chunks(self) -> Iterator[Chunk]:
        rows, texts = [], []
        for row, text in self._rows():
            rows.append(row)
            texts.append(text)
            if len(rows) == self.chunk_size:
                yield Chunk(rows, texts)
                rows, texts = [], []
        if rows:
            yield Chunk(rows, texts)

    def _rows(self) -> Iterator[tuple[dict, str]]:
        lines = _Lines(self.path, self.encoding)
        with lines:
            kind = self.table.kind if self.table is not None else "text"
            yield from {"delimited": self._table, "jsonl": self._jsonl, "text": self._text}[kind](lines)

    def _text(self, lines: "_Lines") -> Iterator[tuple[dict, str]]:
        if self.keys:
            raise UsageError(f"--text-col: --file {self.path} is plain text (one text a line); columns need a "
                             ".csv, .tsv or .jsonl file, or --sep")
        self.columns = ["text"]
        for line in lines:
            text = line.rstrip("\r\n")
            if text.strip():
                yield {"text": text}, text

    def _table(self, lines: "_Lines") -> Iterator[tuple[dict, str]]:
        reader = csv.reader(lines, delimiter=self.table.sep, quoting=self.table.quoting)
        try:
            first = next(reader, None)
            if first is None:
                raise LorafitError(f"--file {self.path}: empty")
            self.columns = first if self.header else [str(i) for i in range(len(first))]
            index = self._text_indexes()
            if not self.header:
                yield self._table_row(first, 1), _pick(first, index)
            start = reader.line_num + 1
            for values in reader:
                if values:  # not a blank line
                    yield self._table_row(values, start), _pick(values, index)
                start = reader.line_num + 1
        except csv.Error as e:
            raise LorafitError(f"--file {self.path}: line {reader.line_num}: {e} (read as "
                               f"{self.table.describe()}; choose with --sep)") from e

    def _text_indexes(self) -> list[int]:
        """The text column's position (or the two of a pair's)."""
        if self.header:
            missing = [k for k in self.keys or ["text"] if k not in self.columns]
            if missing:
                raise LorafitError(f"--file {self.path}: no column {missing[0]!r}; columns found: "
                                   f"{', '.join(self.columns)} (choose with --text-col)")
            return [self.columns.index(k) for k in self.keys or ["text"]]
        keys = self.keys or [str(len(self.columns) - 1)]
        bad = next((k for k in keys if not k.isdigit() or int(k) >= len(self.columns)), None)
        if bad is not None:
            raise UsageError(f"--text-col {bad!r}: without a header row, a column number from 0 to "
                             f"{len(self.columns) - 1}")
        return [int(k) for k in keys]

    def _table_row(self, values: list[str], line: int) -> dict:
        if len(values) != len(self.columns):
            raise LorafitError(f"--file {self.path}: line {line} has {len(values)} fields, the "
                               f"{'header' if self.header else 'first line'} {len(self.columns)} (read as "
                               f"{self.table.describe()}; choose with --sep)")
        return dict(zip(self.columns, values))

    def _jsonl(self, lines: "_Lines") -> Iterator[tuple[dict, str]]:
        keys = self.keys or ["text"]
        for number, row in json_objects(lines, f"--file {self.path}"):
            texts = [row.get(key) for key in keys]
            bad = next((k for k, t in zip(keys, texts) if not isinstance(t, (str, int, float)) or isinstance(t, bool)),
                       None)
            if bad is not None:
                raise LorafitError(f"--file {self.path}: line {number} has no text in {bad!r} (choose the field "
                                   "with --text-col)")
            if self.columns is None:
                self.columns = list(row)
            yield row, str(texts[0]) if len(texts) == 1 else (str(texts[0]), str(texts[1]))


def _pick(values: list[str], index: list[int]):
    """A row's text, or its pair of texts."""
    return values[index[0]] if len(index) == 1 else (values[index[0]], values[index[1]])


class _Lines:
    """A text file's lines. In an encoding that writes a line break as the byte 10 (UTF-8, Latin-1, cp1252...)
    each line is decoded on its own, so a byte ``encoding`` cannot read is refused with its own line number;
    UTF-16 and UTF-32 files are decoded as a stream (the line named is where decoding stopped)."""

    def __init__(self, path: Path, encoding: str):
        self.path, self.encoding, self.number = path, encoding, 0
        self.bytewise = "\n".encode(encoding) == b"\n"

    def __enter__(self):
        self.file = open(self.path, "rb") if self.bytewise else open(self.path, encoding=self.encoding, newline="")
        return self

    def __exit__(self, *exc):
        self.file.close()

    def __iter__(self) -> Iterator[str]:
        decode = codecs.getincrementaldecoder(self.encoding)().decode if self.bytewise else str
        try:
            for raw in self.file:
                self.number += 1
                yield decode(raw)
        except UnicodeDecodeError as e:
            raise LorafitError(f"--file {self.path}: not {self.encoding} text (a bad byte in line "
                               f"{self.number + (not self.bytewise)}; pass --encoding, e.g. cp1252)") from e


class RowWriter:
    """Rows out to ``path`` as CSV or JSON lines (by its suffix: .jsonl / .json, else CSV), as they come, into a
    temporary file that replaces ``path`` only when the ``with`` block ends without an error."""

    def __init__(self, path: str | Path, columns: list[str]):
        self.path, self.columns, self.written = Path(path), columns, 0
        self.jsonl = self.path.suffix.lower() in (".jsonl", ".json")

    def __enter__(self) -> "RowWriter":
        self._stack = contextlib.ExitStack()
        tmp = self._stack.enter_context(atomic_path(self.path))
        self._file: IO[str] = self._stack.enter_context(open(tmp, "w", encoding="utf-8", newline=""))
        if not self.jsonl:
            self._csv = csv.DictWriter(self._file, fieldnames=self.columns, restval="", extrasaction="raise")
            self._csv.writeheader()
        return self

    def __exit__(self, *exc) -> bool | None:
        return self._stack.__exit__(*exc)

    def write(self, rows: list[dict]) -> None:
        if self.jsonl:
            self._file.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        for i, row in enumerate(rows if not self.jsonl else ()):
            extra = next((k for k in row if k not in self.columns), None)
            if extra is not None:
                raise LorafitError(f"--out {self.path}: row {self.written + i + 1} has a field {extra!r} that the "
                                   "first row lacks, which CSV cannot hold; write JSON lines (--out FILE.jsonl)")
            self._csv.writerow({k: v if isinstance(v, (str, int, float)) else json.dumps(v) for k, v in row.items()})
        self.written += len(rows)
