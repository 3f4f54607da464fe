"""Read documents from corpora on disk: ``.jsonl``, ``.jsonl.gz``, ``.txt``, ``.parquet``, HF ``datasets``.

Every reader streams (nothing reads a whole corpus into memory) and yields :class:`Document`s. Bad input is
never dropped silently and never crashes the run: each problem is counted per kind in :class:`BadInputs`
(reported at the end and stored in the shard metadata), or, with ``strict=True``, raised as
:class:`CorpusError` naming the file and line.

What happens to each kind of bad input:

* ``bad_json`` - a ``.jsonl`` line that is not a JSON object: skipped.
* ``missing_key`` - a record without the text key (or with a null / non-string value): skipped.
* ``empty`` - a document that is empty or only whitespace: skipped.
* ``non_utf8`` - bytes that are not valid UTF-8, or a JSON-escaped lone UTF-16 surrogate (``"\\ud800"``): the
  document is kept, each invalid byte or surrogate becomes U+FFFD.

``.txt`` files hold one document per line (``txt_mode="line"``, the default) or one document per
paragraph separated by blank lines (``txt_mode="paragraph"``).

Inputs may also be a directory written by ``datasets.Dataset.save_to_disk`` (all splits of a
``DatasetDict``, in name order) or ``hf:NAME[:CONFIG][@SPLIT]`` to stream any ``datasets.load_dataset`` source
(split ``train`` unless given; needs network access for Hub datasets).
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

HF_PREFIX = "hf:"
_ROW_BATCH = 1024
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")  # JSON's escape of a UTF-16 surrogate
_SURROGATE = re.compile("[\ud800-\udfff]")


class CorpusError(ValueError):
    """Bad input in strict mode, or an input that cannot be read at all; the message names the file."""


@dataclass
class BadInputs:
    """Counts of skipped or repaired records, per kind (see the module docstring)."""

    bad_json: int = 0
    non_utf8: int = 0
    missing_key: int = 0
    empty: int = 0

    @property
    def total(self) -> int:
        return sum(asdict(self).values())

    def summary(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self).items())


@dataclass
class Document:
    text: str
    source: str  # input path or hf: name
    line: int    # 1-based line (row for parquet / datasets) where the document starts
    nbytes: int  # input bytes consumed since the previous document (for MB/s and ETA)


def expand_inputs(patterns: list[str]) -> list[str]:
    """Expand globs; keep ``hf:`` sources and ``save_to_disk`` directories. Errors name what matched nothing."""
    out: list[str] = []
    for pattern in patterns:
        if pattern.startswith(HF_PREFIX):
            out.append(pattern)
            continue
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.exists(m)]
        if not matches:
            raise CorpusError(f"{pattern}: no such file (or the glob matched nothing)")
        out.extend(matches)
    return out


def input_size(path: str) -> int | None:
    """Bytes the reader will report for ``path`` in total (None when unknown, e.g. ``hf:`` streams)."""
    if path.startswith(HF_PREFIX):
        return None
    if os.path.isdir(path):
        return sum(f.stat().st_size for f in Path(path).rglob("*.arrow"))
    return os.path.getsize(path)


class CorpusReader:
    """Streams the documents of several inputs in order, counting bad input in ``self.bad``."""

    def __init__(self, paths: list[str], text_key: str = "text", txt_mode: str = "line", strict: bool = False):
        if txt_mode not in ("line", "paragraph"):
            raise ValueError(f"txt_mode must be 'line' or 'paragraph', not {txt_mode!r}")
        self.paths = paths
        self.text_key = text_key
        self.txt_mode = txt_mode
        self.strict = strict
        self.bad = BadInputs()

    def __iter__(self) -> Iterator[Document]:
        for path in self.paths:
            yield from self.read(path)

    def read(self, path: str) -> Iterator[Document]:
        if path.startswith(HF_PREFIX):
            return self._read_rows(path, _hf_batches(path, self.text_key))
        if os.path.isdir(path):
            return self._read_rows(path, _disk_batches(path, self.text_key))
        name = path.lower()
        if name.endswith(".parquet"):
            return self._read_rows(path, _parquet_batches(path, self.text_key))
        if name.endswith((".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")):
            return self._read_jsonl(path)
        if name.endswith((".txt", ".txt.gz")):
            return self._read_txt(path)
        raise CorpusError(f"{path}: unsupported input type (expected .jsonl[.gz], .txt[.gz], .parquet, "
                          f"a datasets save_to_disk directory or hf:NAME)")

    # -- bad input -------------------------------------------------------------------------------------
    def _bad(self, kind: str, path: str, line: int, detail: str) -> None:
        if self.strict:
            raise CorpusError(f"{path}:{line}: {kind}: {detail}")
        setattr(self.bad, kind, getattr(self.bad, kind) + 1)

    def _decode(self, raw: bytes, path: str, line: int) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            self._bad("non_utf8", path, line, f"invalid UTF-8 at byte {e.start}")
            return raw.decode("utf-8", errors="replace")

    def _text_of(self, record, path: str, line: int) -> str | None:
        value = record.get(self.text_key) if isinstance(record, dict) else None
        if not isinstance(value, str):
            got = "no such key" if not isinstance(record, dict) or self.text_key not in record \
                else f"value is {type(value).__name__}"
            self._bad("missing_key", path, line, f"text key {self.text_key!r}: {got}")
            return None
        if not value.strip():
            self._bad("empty", path, line, "empty document")
            return None
        return value

    # -- formats ---------------------------------------------------------------------------------------
    def _read_jsonl(self, path: str) -> Iterator[Document]:
        with _open_binary(path) as (f, position):
            last = 0
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue  # blank lines separate nothing in JSON Lines; not a document
                text = self.jsonl_text(raw, path, lineno)
                if text is None:
                    continue
                pos = position()
                yield Document(text, path, lineno, pos - last)
                last = pos

    def jsonl_text(self, raw: bytes, path: str, line: int) -> str | None:
        """The text of one non-blank JSON line, or None (counted) when it is bad input."""
        decoded = self._decode(raw, path, line).rstrip("\r\n")
        try:
            record = json.loads(decoded)
        except json.JSONDecodeError as e:
            self._bad("bad_json", path, line, _json_problem(decoded, e))
            return None
        text = self._text_of(record, path, line)
        if text is not None and _SURROGATE_ESCAPE.search(raw):
            text = self._without_lone_surrogates(text, path, line)
        return text

    def _without_lone_surrogates(self, text: str, path: str, line: int) -> str:
        """JSON can escape a lone UTF-16 surrogate, which is no character (nor valid UTF-8): make it U+FFFD."""
        lone = _SURROGATE.search(text)  # json.loads has already joined the valid pairs
        if lone is None:
            return text
        self._bad("non_utf8", path, line, f"lone surrogate \\u{ord(lone.group()):x} at character {lone.start()}")
        return _SURROGATE.sub("\ufffd", text)

    def _read_txt(self, path: str) -> Iterator[Document]:
        with _open_binary(path) as (f, position):
            last = 0
            if self.txt_mode == "line":
                for lineno, raw in enumerate(f, 1):
                    text = self._decode(raw, path, lineno).rstrip("\r\n")
                    if not text.strip():
                        self._bad("empty", path, lineno, "empty line")
                        continue
                    pos = position()
                    yield Document(text, path, lineno, pos - last)
                    last = pos
                return
            lines: list[str] = []
            start = 0
            for lineno, raw in enumerate(f, 1):
                text = self._decode(raw, path, lineno).rstrip("\r\n")
                if text.strip():
                    start = start or lineno
                    lines.append(text)
                elif lines:
                    pos = position()
                    yield Document("\n".join(lines), path, start, pos - last)
                    last, lines, start = pos, [], 0
            if lines:
                yield Document("\n".join(lines), path, start, position() - last)

    def _read_rows(self, path: str, batches) -> Iterator[Document]:
        """Column readers (parquet, datasets): ``batches`` yields (list of values, bytes it covers)."""
        row = unreported = 0
        for values, nbytes in batches:
            share = nbytes // max(len(values), 1)
            for value in values:
                row += 1
                unreported += share  # bytes of skipped rows go to the next document
                text = self._text_of({self.text_key: value}, path, row)
                if text is not None:
                    yield Document(text, path, row, unreported)
                    unreported = 0


_ESCAPES = {"\t": ("tab", "\\t"), "\n": ("line feed", "\\n"), "\r": ("carriage return", "\\r"),
            "\b": ("backspace", "\\b"), "\f": ("form feed", "\\f")}


def _json_problem(line: str, e: json.JSONDecodeError) -> str:
    """What is wrong with a JSON line, in words: the problem, its column, and the text around it."""
    near = line[max(0, e.pos - 20):e.pos + 20].strip()
    if e.msg.startswith("Invalid control character") and e.pos < len(line):
        char = line[e.pos]
        name, escape = _ESCAPES.get(char, ("", f"\\u{ord(char):04x}"))
        return (f"unescaped control character U+{ord(char):04X}{f' ({name})' if name else ''} inside a string at "
                f"column {e.colno}; escape it as {escape} (near {near!r})")
    problem = e.msg.removesuffix(" at")  # json's messages end in "at" before their own "line/column" suffix
    return f"{problem[0].lower()}{problem[1:]} at column {e.colno} (near {near!r})"


class _open_binary:
    """Open a (possibly gzipped) file for binary line iteration, with a callable giving on-disk position."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        self._raw = open(self.path, "rb")
        if self.path.lower().endswith(".gz"):
            self._f = gzip.GzipFile(fileobj=self._raw)
        else:
            self._f = self._raw
        return self._f, self._raw.tell

    def __exit__(self, *exc):
        self._f.close()
        self._raw.close()


def _require_column(path: str, columns, key: str) -> None:
    if key not in columns:
        raise CorpusError(f"{path}: no column {key!r} (columns: {', '.join(map(str, columns))}); "
                          f"pass --text-key")


def _parquet_batches(path: str, key: str):
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    _require_column(path, pf.schema_arrow.names, key)
    size, rows = os.path.getsize(path), max(pf.metadata.num_rows, 1)
    for batch in pf.iter_batches(batch_size=_ROW_BATCH, columns=[key]):
        yield batch.column(0).to_pylist(), size * batch.num_rows // rows


def _dataset_batches(path: str, ds, key: str, nbytes: int | None):
    _require_column(path, ds.column_names, key)
    per_row = (nbytes or 0) // max(len(ds), 1)
    for start in range(0, len(ds), _ROW_BATCH):
        values = ds[start:start + _ROW_BATCH][key]
        yield values, per_row * len(values)


def _disk_batches(path: str, key: str):
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError as e:
        raise CorpusError(f"{path}: not a datasets save_to_disk directory ({e})") from e
    parts = [ds[name] for name in sorted(ds)] if isinstance(ds, datasets.DatasetDict) else [ds]
    total = input_size(path)
    rows = sum(len(p) for p in parts) or 1
    for part in parts:
        yield from _dataset_batches(path, part, key, total * len(part) // rows)


def _hf_batches(source: str, key: str):
    import datasets

    spec = source[len(HF_PREFIX):]
    spec, _, split = spec.partition("@")
    name, _, config = spec.partition(":")
    ds = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
    batch: list = []
    for record in ds:
        batch.append(record.get(key))
        if len(batch) == _ROW_BATCH:
            yield batch, 0
            batch = []
    if batch:
        yield batch, 0
