"""Raw-text sources for streaming training: what a ``data.train`` entry names, its units, and their records.

A raw source is a ``.jsonl`` / ``.jsonl.gz`` / ``.ndjson[.gz]`` / ``.parquet`` file, a glob of them, a directory
written by ``datasets.Dataset.save_to_disk``, or any fsspec URL of those (``s3://``, ``gs://``, ``file://`` ...).
Anything else in ``data.train`` is a shard prefix (:func:`is_raw_source`).

The source is cut into *units*, the granularity of the document order (:class:`~pretrain.data.stream_dataset`):

* uncompressed JSON Lines: byte ranges of about ``chunk_bytes`` each (smaller when a small corpus would give fewer
  than ``min_units``), cut at line ends found by seeking (no full read of the file);
* gzipped JSON Lines: the whole file (gzip cannot seek);
* parquet: one row group each (from the footer only);
* ``save_to_disk`` directories: row ranges of ``rows_per_unit`` rows (from the Arrow metadata).

The unit index and a fingerprint (every file's size and modification time) are cached as JSON under
``cache_dir``, keyed by the fingerprint: a changed file gives a new index, and a resume checks the fingerprint
it saved (:func:`check_fingerprint`). :func:`read_unit` returns a unit's records in file order, the text of
each or None for bad input (counted in ``reader.bad`` exactly as ``pretrain prepare`` counts it, or raised as
:class:`~pretrain.data.corpus.CorpusError` with ``strict``). A file that cannot be read raises CorpusError
naming it.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
from pathlib import Path

from pretrain.data.corpus import CorpusError, CorpusReader

RAW_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz", ".parquet")
ROWS_PER_UNIT = 10_000  # save_to_disk directories: rows per unit


def is_raw_source(entry: str) -> bool:
    """True for a URL, a raw file or glob of raw files, or a directory; shard prefixes are none of these."""
    entry = str(entry)
    return "://" in entry or entry.lower().endswith(RAW_SUFFIXES) or os.path.isdir(entry)


def _fs(entry: str):
    import fsspec.core

    return fsspec.core.url_to_fs(entry)


def expand_source(entry: str) -> list[str]:
    """The files (or save_to_disk directories) of a raw entry, globs expanded, in name order."""
    fs, path = _fs(entry)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    matches = sorted(fs.glob(path)) if any(c in path for c in "*?[") else [path]
    matches = [m for m in matches if fs.exists(m)]
    if not matches:
        raise CorpusError(f"{entry}: no such file (or the glob matched nothing)")
    if protocol in ("file", "local"):
        return matches
    return [f"{protocol}://{m}" for m in matches]


def _file_stamp(fs, path: str) -> list:
    info = fs.info(path)
    mtime = info.get("mtime", info.get("LastModified", info.get("updated", "")))
    return [path, int(info.get("size") or 0), str(mtime)]


def fingerprint(paths: list[str]) -> list:
    """Size and modification time of every file (every file inside a directory)."""
    stamps = []
    for p in paths:
        fs, path = _fs(p)
        try:
            files = sorted(fs.find(path)) if fs.isdir(path) else [path]
            stamps.extend(_file_stamp(fs, f) for f in files)
        except OSError as e:
            raise CorpusError(f"{p}: cannot read ({e})") from e
    return stamps


def check_fingerprint(entry: str, saved: list, now: list) -> None:
    """Refuse to resume over a source that changed since the checkpoint: the order would not be the same."""
    if saved == now:
        return
    before, after = {s[0]: s[1:] for s in saved}, {s[0]: s[1:] for s in now}
    changed = sorted(f for f in before.keys() | after.keys() if before.get(f) != after.get(f))
    raise CorpusError(f"data.train source {entry} changed since the checkpoint was saved ({', '.join(changed[:3])}"
                      f"{' ...' if len(changed) > 3 else ''}: size or modification time differ); a resume over "
                      f"changed text cannot continue the same sample sequence. Restore the files, or start a new "
                      f"run (e.g. checkpoint.init_from) over the new data")


def _jsonl_units(fs, path: str, chunk_bytes: int) -> list[dict]:
    size = int(fs.info(path)["size"])
    if path.lower().endswith(".gz"):
        return [{"path": path, "kind": "jsonl", "start": 0, "end": -1}]
    cuts = [0]
    with fs.open(path, "rb") as f:
        while cuts[-1] + chunk_bytes < size:
            f.seek(cuts[-1] + chunk_bytes)
            f.readline()  # to the end of the line the cut fell into
            if f.tell() >= size:
                break
            cuts.append(f.tell())
    return [{"path": path, "kind": "jsonl", "start": a, "end": b} for a, b in zip(cuts, cuts[1:] + [size])]


def _parquet_units(fs, path: str) -> list[dict]:
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        groups = pq.ParquetFile(f).metadata.num_row_groups
    return [{"path": path, "kind": "parquet", "start": g, "end": g + 1} for g in range(groups)]


@functools.lru_cache(maxsize=8)
def _disk_parts(path: str) -> list:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError as e:
        raise CorpusError(f"{path}: not a datasets save_to_disk directory ({e})") from e
    return [(name, ds[name]) for name in sorted(ds)] if isinstance(ds, datasets.DatasetDict) else [("", ds)]


def _disk_units(path: str) -> list[dict]:
    return [{"path": path, "kind": "disk", "part": name, "start": a, "end": min(a + ROWS_PER_UNIT, len(part))}
            for name, part in _disk_parts(path) for a in range(0, len(part), ROWS_PER_UNIT)]


def units_of(paths: list[str], chunk_bytes: int) -> list[dict]:
    """The units of ``paths`` in file order (see the module docstring)."""
    units: list[dict] = []
    for p in paths:
        fs, path = _fs(p)
        try:
            if fs.isdir(path):
                units.extend(_disk_units(p))
            elif path.lower().endswith(".parquet"):
                units.extend(_parquet_units(fs, p))
            else:
                units.extend(_jsonl_units(fs, p, chunk_bytes))
        except OSError as e:
            raise CorpusError(f"{p}: cannot read ({e})") from e
    return units


def cached_units(paths: list[str], chunk_bytes: int, cache_dir: str | Path | None,
                 min_units: int = 1) -> tuple[list[dict], list]:
    """(units, fingerprint) of ``paths``, the units read from ``cache_dir`` when an equal fingerprint built them.

    JSON Lines byte ranges shrink below ``chunk_bytes`` so that a small corpus still gives ``min_units`` units."""
    stamps = fingerprint(paths)
    chunk_bytes = max(min(chunk_bytes, sum(s[1] for s in stamps) // min_units), 1)
    if cache_dir is None:
        return units_of(paths, chunk_bytes), stamps
    key = hashlib.sha256(json.dumps([stamps, chunk_bytes]).encode()).hexdigest()[:24]
    cached = Path(cache_dir) / f"RawUnits-{key}.json"
    if cached.exists():
        return json.loads(cached.read_text()), stamps
    units = units_of(paths, chunk_bytes)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f"{cached.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(units))
    os.replace(tmp, cached)
    return units, stamps


def _jsonl_records(unit: dict, reader: CorpusReader) -> list[str | None]:
    fs, path = _fs(unit["path"])
    where = unit["path"] if unit["end"] < 0 else f"{unit['path']}[bytes {unit['start']}-{unit['end']}]"
    with fs.open(path, "rb") as f:
        if unit["end"] < 0:
            data = gzip.GzipFile(fileobj=f).read()
        else:
            f.seek(unit["start"])
            data = f.read(unit["end"] - unit["start"])
    return [reader.jsonl_text(raw, where, line) for line, raw in enumerate(data.split(b"\n"), 1) if raw.strip()]


def _rows_records(values: list, where: str, reader: CorpusReader) -> list[str | None]:
    return [reader._text_of({reader.text_key: v}, where, row) for row, v in enumerate(values, 1)]


def read_unit(unit: dict, reader: CorpusReader) -> list[str | None]:
    """Records of ``unit`` in file order: each one's text, or None where it is bad input (counted)."""
    try:
        if unit["kind"] == "jsonl":
            return _jsonl_records(unit, reader)
        where = f"{unit['path']}[{unit['kind']} rows of unit {unit['start']}]"
        if unit["kind"] == "parquet":
            import pyarrow.parquet as pq

            fs, path = _fs(unit["path"])
            with fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                if reader.text_key not in pf.schema_arrow.names:
                    raise CorpusError(f"{unit['path']}: no column {reader.text_key!r}; set data.text_key")
                values = pf.read_row_group(unit["start"], columns=[reader.text_key]).column(0).to_pylist()
            return _rows_records(values, where, reader)
        part = dict(_disk_parts(unit["path"]))[unit["part"]]
        if reader.text_key not in part.column_names:
            raise CorpusError(f"{unit['path']}: no column {reader.text_key!r}; set data.text_key")
        return _rows_records(part[unit["start"]:unit["end"]][reader.text_key], where, reader)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise CorpusError(f"{unit['path']}: cannot read ({type(e).__name__}: {e})") from e
