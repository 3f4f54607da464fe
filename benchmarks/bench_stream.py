"""Tokens/s of raw-text streaming (tokenize + pack in loader workers) vs the shard path vs what a GPU consumes.

Reference: a 1.3B GPT (24 layers, hidden 2048, sequence 2048) on one H100 SXM at 45 % MFU. Training costs
``6 N + 12 L h s`` FLOPs per token (weights forward + backward, plus attention scores): 6 x 1.3e9 + 12 x 24 x
2048 x 2048 = 9.0e9 FLOPs/token; 45 % of the H100's 989 dense BF16 TFLOP/s is 445 TFLOP/s, so the GPU eats
445e12 / 9.0e9 = ~49,000 tokens/s (57,000 with the 6 N rule alone). A loader must deliver that per GPU.

Both data paths serve GPT samples of ``--seq-len`` from the demo corpus (``pretrain.data.demo_corpus``, ~11 MB of
English text) with a sentencepiece BPE tokenizer trained here: the stream tokenizes while it serves
(``pretrain.data.stream_loader``); the shard path reads ``pretrain prepare`` output through a torch DataLoader
with the same number of workers (its tokenization cost was paid once, offline). It also measures how well the
stream's order mixes: the Spearman correlation between a document's place in the files and its place in an
epoch of the stream (0: no trace of file order left; 1: file order).

    python benchmarks/bench_stream.py                       # ~1 minute; 1, 2 and 4 workers
    python benchmarks/bench_stream.py --workers 1 --seconds 3
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from pretrain.data.corpus import CorpusReader
from pretrain.data.demo_corpus import ensure_demo_corpus
from pretrain.data.gpt_dataset import GPTDataset
from pretrain.data.indexed import IndexedDataset
from pretrain.data.loader import build_dataloader, build_train_valid_datasets
from pretrain.data.prepare import prepare
from pretrain.data.sampler import DataParallelSampler
from pretrain.data.stream_dataset import LaneStream
from pretrain.data.tokenizer import load_tokenizer, text_lines, train_sentencepiece

GPU_TOKENS_PER_S = 445e12 / (6 * 1.3e9 + 12 * 24 * 2048 * 2048)  # see the module docstring
LANES, MBS = 4, 8


def rate(batches, seconds: float, seq_len: int) -> float:
    """Tokens/s of ``batches`` (an iterator of micro-batches) over about ``seconds``, after one warm-up batch."""
    next(batches)
    start, tokens = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        tokens += next(batches)["input_ids"].numel()
    return tokens / (time.perf_counter() - start)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def mixing(data) -> tuple[float, float, int]:
    """Over epoch 0: Spearman correlation of file position vs stream position (lanes interleaved in turn), the
    share of a lane's consecutive documents that are neighbours in the file, and the number of units."""
    spec = data.datasets[0]
    order, neighbours = [], []
    for lane in range(spec.lanes):
        stream = LaneStream(spec, lane, data.tokenizer, data.packing)
        docs = [(u << 20) + r for u, r in stream.documents(0)]  # unit u's records rank after unit u - 1's
        order.extend((i * spec.lanes + lane, d) for i, d in enumerate(docs))
        neighbours.extend(abs(a - b) == 1 for a, b in zip(docs, docs[1:]))
    order.sort()
    files = np.array([d for _, d in order])
    return spearman(np.arange(len(files)), files), float(np.mean(neighbours)), len(spec.units)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--seconds", type=float, default=6.0, help="measuring time per row")
    p.add_argument("--vocab", type=int, default=8000)
    args = p.parse_args()
    corpus = ensure_demo_corpus()
    with tempfile.TemporaryDirectory(prefix="bench_stream_") as tmp:
        texts = (d.text for d in CorpusReader([str(corpus)]))
        tok = train_sentencepiece(text_lines(texts), Path(tmp) / "tok", args.vocab, model_type="bpe",
                                  num_threads=1, verbose=False)
        tok = load_tokenizer(tok.path, num_threads=1)
        prefix = str(Path(tmp) / "shard")
        prepare([str(corpus)], tok.path, prefix, workers=1, append_eod=True, progress=False)
        indexed = IndexedDataset(prefix)
        cfg = {"train": [str(corpus)], "tokenizer": str(tok.path), "seq_length": args.seq_len,
               "cache_dir": str(Path(tmp) / "cache"), "stream_lanes": LANES, "stream_chunk_mb": 0.25}
        rows = []
        for workers in args.workers:
            data = build_train_valid_datasets(cfg, "gpt", 10**6, tokenizer=tok)[0]
            stream = data.micro_batches(0, 1, MBS, lambda c: LANES * MBS, 0, num_workers=workers)
            streamed = rate(stream, args.seconds, args.seq_len)
            stream.close()
            gpt = GPTDataset(indexed, np.arange(len(indexed)), None, args.seq_len, 1, tok.eod_id)
            loader = iter(build_dataloader(gpt, DataParallelSampler(len(gpt), 0, 1, MBS, MBS), workers))
            rows.append((workers, streamed, rate(loader, args.seconds, args.seq_len)))
            del loader
        mix = mixing(build_train_valid_datasets(cfg, "gpt", 10**6, tokenizer=tok)[0])
    load = os.getloadavg()
    print(f"\nGPT samples of {args.seq_len} tokens, demo corpus ({corpus.stat().st_size / 1e6:.1f} MB), BPE vocab "
          f"{args.vocab}, {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{'workers':>7} | {'stream tok/s':>12} | {'shards tok/s':>12} | {'1.3B H100 45% MFU':>17} | stream/GPU")
    for workers, streamed, sharded in rows:
        print(f"{workers:>7} | {streamed:>12,.0f} | {sharded:>12,.0f} | {GPU_TOKENS_PER_S:>17,.0f} | "
              f"{streamed / GPU_TOKENS_PER_S:>9.2f}x")
    rho, neighbours = mix[:2]
    units = mix[2]
    print(f"order over one epoch ({units} units of <= 0.25 MB, {LANES} lanes): Spearman(file position, stream "
          f"position) = {rho:+.3f} (file order +1; a random order of {units} units: 0 +- {units ** -0.5:.2f}); "
          f"consecutive documents of a lane that are file neighbours: {neighbours:.1%} (file order: 100%)")


if __name__ == "__main__":
    main()
