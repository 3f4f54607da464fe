"""Megatron's ``MMIDIDX`` indexed dataset: ``PREFIX.bin`` (token ids, back to back) + ``PREFIX.idx`` (index).

The layout is byte-compatible with ``megatron.core.datasets.indexed_dataset`` so shards move freely between
the two stacks. Index layout (little endian):

    b"MMIDIDX\\x00\\x00"        magic, 9 bytes
    <Q  version (1)
    <B  dtype code (see DTYPE_CODES)
    <Q  sequence count S
    <Q  document count D (= number of documents + 1)
    int32[S]  sequence lengths (in tokens)
    int64[S]  sequence pointers (byte offsets into .bin)
    int64[D]  document indices (sequence index where each document starts; first 0, last S)

We write one sequence per document, as Megatron's preprocessing does without sentence splitting.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES: dict[int, type] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
_HEADER = struct.Struct("<QBQQ")  # version, dtype code, sequence count, document count
_CHECK_CHUNK = 1 << 24  # entries per vectorised check (bounds the temporary arrays to ~128 MB)


class ShardError(ValueError):
    """A shard on disk is missing, truncated or inconsistent; the message names the file."""


def dtype_for_vocab(vocab_size: int) -> type:
    """uint16 while every id fits (Megatron's threshold is 65,500), else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def _code_of(dtype) -> int:
    for code, dt in DTYPE_CODES.items():
        if np.dtype(dt) == np.dtype(dtype):
            return code
    raise ValueError(f"dtype {dtype} has no MMIDIDX code")


def bin_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


def write_index(path: str | Path, dtype, sequence_lengths: np.ndarray, document_indices: np.ndarray) -> None:
    """Write an ``.idx`` file for sequences stored back to back in the matching ``.bin``."""
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(dtype).itemsize, out=pointers[1:])
    docs = np.asarray(document_indices, dtype=np.int64)
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(_HEADER.pack(VERSION, _code_of(dtype), len(lengths), len(docs)))
        f.write(lengths.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(docs.tobytes(order="C"))


class IndexedDatasetWriter:
    """Streams documents into ``PREFIX.bin`` and writes ``PREFIX.idx`` on :meth:`finalize`.

    Files are written under temporary names and renamed at the end, so an interrupted run never leaves a
    shard that looks complete.
    """

    def __init__(self, prefix: str | Path, dtype=np.uint16):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        self._tmp_bin = Path(f"{prefix}.bin.tmp")
        self._bin = open(self._tmp_bin, "wb")
        self._lengths: list[np.ndarray] = []
        self.num_tokens = 0

    def add_document(self, tokens) -> None:
        arr = np.asarray(tokens)
        if arr.dtype != self.dtype:
            arr = arr.astype(self.dtype)
        self._bin.write(arr.tobytes(order="C"))
        self._lengths.append(np.array([arr.size], dtype=np.int32))
        self.num_tokens += arr.size

    def add_documents(self, flat_tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append many documents at once: ``flat_tokens`` is their concatenation, ``lengths`` their sizes."""
        flat = np.asarray(flat_tokens)
        if flat.dtype != self.dtype:
            flat = flat.astype(self.dtype)
        self._bin.write(flat.tobytes(order="C"))
        self._lengths.append(np.asarray(lengths, dtype=np.int32))
        self.num_tokens += flat.size

    def finalize(self) -> None:
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int32)
        tmp_idx = Path(f"{self.prefix}.idx.tmp")
        write_index(tmp_idx, self.dtype, lengths, np.arange(len(lengths) + 1, dtype=np.int64))
        os.replace(self._tmp_bin, bin_path(self.prefix))
        os.replace(tmp_idx, idx_path(self.prefix))

    def abort(self) -> None:
        self._bin.close()
        self._tmp_bin.unlink(missing_ok=True)


class IndexedDataset:
    """Read-only, memory-mapped view of ``PREFIX.bin/.idx``; ``ds[i]`` is document ``i``'s tokens.

    Every inconsistency (missing file, bad magic, truncated index or data, a negative length, a pointer that
    is not where the lengths before it end, decreasing document indices) raises :class:`ShardError` naming the
    file, at open time rather than deep inside a training step: the whole index is checked, vectorised (about
    30 ms per million documents). Token ids need the tokenizer: :meth:`check_token_ids`, which the data loader
    runs when training first uses the shard.
    """

    def __init__(self, prefix: str | Path):
        self.prefix = Path(prefix)
        ipath, bpath = idx_path(prefix), bin_path(prefix)
        for p in (ipath, bpath):
            if not p.exists():
                raise ShardError(f"{p}: file not found")
        raw = np.memmap(ipath, mode="r", dtype=np.uint8)
        head = len(MAGIC) + _HEADER.size
        if raw.size < head or bytes(raw[: len(MAGIC)]) != MAGIC:
            raise ShardError(f"{ipath}: not an MMIDIDX index (bad magic or truncated header)")
        version, code, n_seq, n_doc = _HEADER.unpack(bytes(raw[len(MAGIC):head]))
        if version != VERSION:
            raise ShardError(f"{ipath}: unsupported index version {version}")
        if code not in DTYPE_CODES:
            raise ShardError(f"{ipath}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        need = head + n_seq * 4 + n_seq * 8 + n_doc * 8
        if raw.size < need:
            raise ShardError(f"{ipath}: truncated: {raw.size} bytes, header promises {need}")
        off = head
        self.sequence_lengths = np.frombuffer(raw, dtype=np.int32, count=n_seq, offset=off)
        off += n_seq * 4
        self.sequence_pointers = np.frombuffer(raw, dtype=np.int64, count=n_seq, offset=off)
        off += n_seq * 8
        self.document_indices = np.frombuffer(raw, dtype=np.int64, count=n_doc, offset=off)
        expected_bytes = _check_index(ipath, self.sequence_lengths, self.sequence_pointers, self.document_indices,
                                      self.dtype.itemsize)
        actual_bytes = bpath.stat().st_size
        if actual_bytes != expected_bytes:
            raise ShardError(f"{bpath}: size {actual_bytes} bytes, index {ipath} expects {expected_bytes} "
                             f"(truncated or mismatched shard)")
        self._bin = np.memmap(bpath, mode="r", dtype=self.dtype) if actual_bytes else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def check_token_ids(self, vocab_size: int, tokenizer_name: str = "the tokenizer") -> None:
        """Raise :class:`ShardError` naming the ``.bin`` and the document if any token id is not in
        ``[0, vocab_size)``. Full, not sampled: reads every token once, in chunks (~20 ms per 50M tokens from the
        page cache; a cold start reads the ``.bin`` at disk speed)."""
        signed = self.dtype.kind == "i"
        for start in range(0, len(self._bin), _CHECK_CHUNK):
            chunk = self._bin[start:start + _CHECK_CHUNK]
            if chunk.max() < vocab_size and not (signed and chunk.min() < 0):
                continue
            first = int(np.flatnonzero((chunk >= vocab_size) | (chunk < 0))[0])
            byte = (start + first) * self.dtype.itemsize
            doc = int(np.searchsorted(self.sequence_pointers, byte, side="right")) - 1
            raise ShardError(f"{bin_path(self.prefix)}: token id {int(chunk[first])} (document {doc}) is outside "
                             f"the tokenizer's vocabulary of {vocab_size:,} ids ({tokenizer_name}): the shard was "
                             f"made with another tokenizer or is corrupt; rerun `pretrain prepare`")

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.astype(np.int64).sum())

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``i`` (a view into the memory map)."""
        n = int(self.sequence_lengths[i])
        length = n - offset if length is None else length
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize + offset
        return self._bin[start:start + length]


def _check_index(path: Path, lengths: np.ndarray, pointers: np.ndarray, documents: np.ndarray, itemsize: int) -> int:
    """Check an index in one vectorised pass (chunked to bound memory); returns the ``.bin`` size it implies.

    Sequences lie back to back from byte 0 (as Megatron writes them): every length is non-negative and every
    pointer is the sum of the lengths before it, which also keeps every sequence inside the ``.bin``. Document
    indices start at 0, never decrease and end at the sequence count.
    """
    fix = "corrupt index; rerun `pretrain prepare` (or `pretrain data merge`) to rewrite the shard"
    end = 0  # bytes covered by the sequences checked so far
    for start in range(0, len(lengths), _CHECK_CHUNK):
        chunk = lengths[start:start + _CHECK_CHUNK].astype(np.int64)
        negative = np.flatnonzero(chunk < 0)
        if len(negative):
            i = start + int(negative[0])
            raise ShardError(f"{path}: sequence {i} has negative length {int(lengths[i])} ({fix})")
        ends = end + np.cumsum(chunk * itemsize)
        expected = np.concatenate(([end], ends[:-1]))
        wrong = np.flatnonzero(pointers[start:start + _CHECK_CHUNK] != expected)
        if len(wrong):
            i = start + int(wrong[0])
            raise ShardError(f"{path}: sequence {i} starts at byte {int(pointers[i])} but the lengths before it "
                             f"end at byte {int(expected[wrong[0]])} ({fix})")
        end = int(ends[-1])
    if len(documents) == 0 or documents[0] != 0 or documents[-1] != len(lengths):
        raise ShardError(f"{path}: document indices do not span the {len(lengths)} sequences ({fix})")
    for start in range(0, len(documents) - 1, _CHECK_CHUNK):
        window = documents[start:start + _CHECK_CHUNK + 1]
        decreasing = np.flatnonzero(window[1:] < window[:-1])
        if len(decreasing):
            raise ShardError(f"{path}: document indices decrease at document {start + int(decreasing[0]) + 1} "
                             f"({fix})")
    return end


def merge_shards(prefixes: list[str | Path], output: str | Path) -> IndexedDataset:
    """Concatenate shards (same dtype) into ``output``, streaming the ``.bin`` files; atomic like the writer."""
    shards = [IndexedDataset(p) for p in prefixes]
    for shard in shards[1:]:
        if shard.dtype != shards[0].dtype:
            raise ShardError(f"{idx_path(shard.prefix)}: dtype {shard.dtype} differs from "
                             f"{idx_path(shards[0].prefix)}'s {shards[0].dtype}; cannot merge")
    tmp_bin, tmp_idx = Path(f"{output}.bin.tmp"), Path(f"{output}.idx.tmp")
    try:
        with open(tmp_bin, "wb") as out:
            for shard in shards:
                with open(bin_path(shard.prefix), "rb") as f:
                    shutil.copyfileobj(f, out, 16 << 20)
        lengths = np.concatenate([s.sequence_lengths for s in shards])
        offsets = np.cumsum([0] + [len(s) for s in shards[:-1]])
        docs = np.concatenate([[0]] + [s.document_indices[1:] + o for s, o in zip(shards, offsets)])
        write_index(tmp_idx, shards[0].dtype, lengths, docs)
        os.replace(tmp_bin, bin_path(output))
        os.replace(tmp_idx, idx_path(output))
    finally:
        tmp_bin.unlink(missing_ok=True)
        tmp_idx.unlink(missing_ok=True)
    return IndexedDataset(output)
