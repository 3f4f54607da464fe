"""``pretrain data inspect PREFIX`` and ``pretrain data merge --inputs P1 P2 ... --output PREFIX``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from pretrain.data.indexed import IndexedDataset, ShardError, merge_shards
from pretrain.data.metadata import meta_path, merge_metadata, read_metadata, verify_tokenizer, write_metadata
from pretrain.data.tokenizer import load_tokenizer


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    ins = sub.add_parser("inspect", help="counts, document-length histogram and a decoded sample")
    ins.add_argument("prefix")
    ins.add_argument("--tokenizer", help="for decoding (default: the one recorded in PREFIX.json)")
    ins.add_argument("--sample", type=int, default=0, help="index of the document to decode")
    ins.add_argument("--chars", type=int, default=500, help="characters of the sample to print")
    mer = sub.add_parser("merge", help="concatenate shards (same tokenizer) into one")
    mer.add_argument("--inputs", nargs="+", required=True, metavar="PREFIX")
    mer.add_argument("--output", required=True, metavar="PREFIX")


def length_histogram(lengths: np.ndarray, width: int = 40) -> list[str]:
    """Text histogram of document lengths in power-of-two buckets."""
    if len(lengths) == 0:
        return ["(no documents)"]
    buckets = np.floor(np.log2(np.maximum(lengths, 1))).astype(int)
    counts = np.bincount(buckets)
    rows = []
    for b, c in enumerate(counts):
        if c:
            bar = "#" * max(1, round(width * c / counts.max()))
            rows.append(f"  [{2 ** b:>8,}, {2 ** (b + 1):>8,}) {c:>9,}  {bar}")
    return rows


def inspect(prefix: str, tokenizer: str | None = None, sample: int = 0, chars: int = 500) -> str:
    ds = IndexedDataset(prefix)
    lengths = ds.sequence_lengths
    lines = [f"{prefix}: {len(ds.document_indices) - 1:,} documents, {len(ds):,} sequences, "
             f"{ds.num_tokens:,} tokens, dtype {ds.dtype.name}"]
    if len(lengths):
        lines.append(f"document length (tokens): min {lengths.min():,}, mean {lengths.mean():,.1f}, "
                     f"median {int(np.median(lengths)):,}, max {lengths.max():,}")
    meta = read_metadata(prefix) if meta_path(prefix).exists() else None
    if meta:
        tok_info = meta["tokenizer"]
        lines.append(f"tokenizer: {tok_info['kind']} {tok_info['path']} (vocab {tok_info['vocab_size']:,}, "
                     f"identity {tok_info['identity'][:12]})")
        bad = meta.get("bad_inputs", {})
        lines.append(f"inputs: {len(meta.get('inputs', []))}; bad input records: "
                     + (", ".join(f"{k}={v}" for k, v in bad.items()) or "none"))
    lines.append("length histogram:")
    lines.extend(length_histogram(lengths))
    if len(ds):
        if not 0 <= sample < len(ds):
            raise ShardError(f"{prefix}: sample {sample} out of range (0..{len(ds) - 1})")
        ids = np.asarray(ds[sample])
        tok_path = tokenizer or (meta["tokenizer"]["path"] if meta else None)
        if tok_path and Path(tok_path).exists():
            tok = load_tokenizer(tok_path)
            if meta:
                verify_tokenizer(prefix, tok)
            lines.append(f"document {sample} ({len(ids):,} tokens), decoded:")
            lines.append(tok.decode(ids)[:chars])
        else:
            lines.append(f"document {sample} ({len(ids):,} tokens), ids (no tokenizer found to decode): "
                         f"{ids[:64].tolist()}")
    return "\n".join(lines)


def merge(inputs: list[str], output: str) -> dict:
    """Merge shards and their metadata; refuses shards made with different tokenizers."""
    metas = [read_metadata(p) for p in inputs]
    meta = merge_metadata(inputs, metas)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    merged = merge_shards(inputs, output)
    write_metadata(output, meta)
    print(f"merged {len(inputs)} shards into {output}: {meta['documents']:,} documents, "
          f"{merged.num_tokens:,} tokens", file=sys.stderr)
    return meta


def run(args: argparse.Namespace) -> int:
    try:
        if args.action == "inspect":
            print(inspect(args.prefix, args.tokenizer, args.sample, args.chars))
        else:
            merge(args.inputs, args.output)
    except (ShardError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
