"""``pretrain prepare``: tokenize corpora into Megatron ``PREFIX.bin/.idx`` shards plus ``PREFIX.json``.

Why it is faster than Megatron's ``tools/preprocess_data.py`` and cannot flood memory:

* documents travel to workers in chunks of ~1 MB of text and come back as one token array per chunk
  (``Tokenizer.encode_flat``, numpy), not one Python list of ints per document;
* sentencepiece BPE models encode each distinct word once per worker (``data/segment_cache.py``, exact),
  which saves most of the tokenizer's CPU time on natural text; words are cut (numpy) and hashed (Arrow) in
  C, so Python touches each distinct word of a chunk once, not every word;
* at most ``2 * workers`` chunks are in flight: reading waits for the writer, so a slow disk or a fast
  reader never piles the corpus up in RAM (``Pool.imap`` consumes its whole input eagerly, Megatron-LM#444);
* the garbage collector is off in the hot loop (it otherwise rescans millions of live objects).

Results are written in input order, so any ``--workers`` gives byte-identical shards. Output goes to
temporary names renamed at the end: an interrupted run leaves no shard that looks complete.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pretrain.data.corpus import CorpusError, CorpusReader, expand_inputs, input_size
from pretrain.data.indexed import IndexedDatasetWriter, dtype_for_vocab
from pretrain.data.metadata import write_metadata
from pretrain.data.tokenizer import Tokenizer, load_tokenizer

CHUNK_CHARS = 1 << 20  # ~1 MB of text per task: large enough to amortize IPC, small enough to bound memory


def encode_chunk(tokenizer: Tokenizer, texts: list[str], eod: int | None, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of ``texts`` back to back (``eod`` after each when given) and the per-document lengths."""
    flat, lengths = tokenizer.encode_flat(texts)
    if eod is not None:
        flat = np.insert(flat, np.cumsum(lengths), eod)
        lengths += 1
    return flat.astype(dtype, copy=False), lengths.astype(np.int32)


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _worker_tokenizer
    gc.disable()  # workers only encode; reference counting frees everything
    tokenizer.num_threads = 1  # one process per core already
    _worker_tokenizer = tokenizer


def _encode_in_worker(texts: list[str], eod: int | None, dtype) -> tuple[np.ndarray, np.ndarray]:
    return encode_chunk(_worker_tokenizer, texts, eod, dtype)


def _chunks(reader: CorpusReader, per_input: dict[str, int]) -> Iterator[tuple[list[str], int]]:
    """Group documents into ~CHUNK_CHARS of text; yields (texts, input bytes they cover)."""
    texts: list[str] = []
    chars = nbytes = 0
    for doc in reader:
        texts.append(doc.text)
        chars += len(doc.text)
        nbytes += doc.nbytes
        per_input[doc.source] += 1
        if chars >= CHUNK_CHARS:
            yield texts, nbytes
            texts, chars, nbytes = [], 0, 0
    if texts:
        yield texts, nbytes


def prepare(inputs: list[str], tokenizer: str | Path, output: str | Path, workers: int = 1,
            text_key: str = "text", append_eod: bool = False, strict: bool = False, txt_mode: str = "line",
            progress: bool = True) -> dict:
    """Tokenize ``inputs`` (files, globs, datasets dirs, ``hf:`` names) into ``output``; returns the metadata.

    Raises ``ValueError`` (``CorpusError`` for the input) on bad options, unreadable input, or input that holds
    no document; nothing is written then."""
    if workers < 1:
        raise ValueError(f"--workers must be at least 1 (got {workers}); use --workers 1 for one process")
    paths = expand_inputs(inputs)
    tok = load_tokenizer(tokenizer, num_threads=1)
    if append_eod and tok.eod_id is None:
        raise ValueError(f"{tok.path}: tokenizer has no EOS/EOD token; cannot --append-eod")
    dtype = np.dtype(dtype_for_vocab(tok.vocab_size))
    eod = tok.eod_id if append_eod else None
    Path(output).parent.mkdir(parents=True, exist_ok=True)

    reader = CorpusReader(paths, text_key=text_key, txt_mode=txt_mode, strict=strict)
    per_input = dict.fromkeys(paths, 0)
    sizes = [input_size(p) for p in paths]
    total = None if None in sizes else sum(sizes)
    writer = IndexedDatasetWriter(output, dtype)
    pool = bar = None
    docs = 0
    start = time.perf_counter()

    def write(flat: np.ndarray, lengths: np.ndarray, nbytes: int) -> None:
        nonlocal docs
        writer.add_documents(flat, lengths)
        docs += len(lengths)
        bar.update(nbytes)
        dt = max(time.perf_counter() - start, 1e-9)
        bar.set_postfix_str(f"{docs / dt:,.0f} docs/s, {writer.num_tokens / dt / 1e6:.2f} Mtok/s", refresh=False)

    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        if workers > 1:
            # fork: workers start at once and inherit the tokenizer; they run sentencepiece/numpy, never torch.
            # The pool is made before the progress bar, whose monitor thread must not exist at fork time.
            context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            pool = context.Pool(workers, _init_worker, (tok,))
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="prepare", disable=not progress,
                   mininterval=0.5, file=sys.stderr)
        pending: deque = deque()
        for texts, nbytes in _chunks(reader, per_input):
            if pool is None:
                write(*encode_chunk(tok, texts, eod, dtype), nbytes)
                continue
            pending.append((pool.apply_async(_encode_in_worker, (texts, eod, dtype)), nbytes))
            if len(pending) >= 2 * workers:  # the bound on memory: wait for the oldest chunk
                result, n = pending.popleft()
                write(*result.get(), n)
        while pending:
            result, n = pending.popleft()
            write(*result.get(), n)
        if docs == 0:
            bad = f" (bad input records: {reader.bad.summary()})" if reader.bad.total else ""
            hint = f"; is --text-key {text_key!r} right?" if reader.bad.missing_key else ""
            raise CorpusError(f"{', '.join(paths)}: no documents{bad}; nothing written{hint}")
        writer.finalize()
    except BaseException:
        writer.abort()
        raise
    finally:
        if gc_was_enabled:
            gc.enable()
        if pool is not None:
            pool.terminate()
            pool.join()
        if bar is not None:
            bar.close()

    seconds = time.perf_counter() - start
    meta = {
        "format": "MMIDIDX", "dtype": dtype.name, "documents": docs, "tokens": writer.num_tokens,
        "append_eod": append_eod, "text_key": text_key, "txt_mode": txt_mode, "tokenizer": tok.describe(),
        "inputs": [{"path": p, "bytes": s, "documents": per_input[p]} for p, s in zip(paths, sizes)],
        "bad_inputs": vars(reader.bad).copy(), "seconds": round(seconds, 3),
    }
    write_metadata(output, meta)
    mb = sum(s or 0 for s in sizes) / 1e6
    print(f"wrote {output}.bin/.idx/.json: {docs:,} documents, {writer.num_tokens:,} tokens ({dtype.name}) in "
          f"{seconds:.1f}s: {docs / seconds:,.0f} docs/s, {writer.num_tokens / seconds / 1e6:.2f} Mtok/s, "
          f"{mb / seconds:.1f} MB/s", file=sys.stderr)
    if reader.bad.total:
        print(f"warning: {reader.bad.total} bad input records ({reader.bad.summary()}); "
              f"see bad_inputs in {output}.json, or rerun with --strict to stop at the first",
              file=sys.stderr)
    return meta


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_GLOB",
                   help=".jsonl[.gz], .txt[.gz], .parquet, datasets save_to_disk dirs, or hf:NAME[:CONFIG][@SPLIT]")
    p.add_argument("--tokenizer", required=True, help="sentencepiece .model, HF tokenizer.json, or a directory")
    p.add_argument("--output", required=True, metavar="PREFIX", help="writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="tokenizer processes (default: one per CPU)")
    p.add_argument("--text-key", default="text", help="field holding the text (jsonl, parquet, datasets)")
    p.add_argument("--append-eod", action="store_true", help="append the EOD (= EOS) token to every document")
    p.add_argument("--txt-mode", choices=("line", "paragraph"), default="line",
                   help=".txt files: one document per line (default) or per blank-line-separated paragraph")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record, naming file and line")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    try:
        prepare(args.input, args.tokenizer, args.output, workers=args.workers, text_key=args.text_key,
                append_eod=args.append_eod, strict=args.strict, txt_mode=args.txt_mode,
                progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:  # CorpusError, ShardError and bad options: the user's to fix
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
