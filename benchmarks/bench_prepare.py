"""Tokenize the same ~50 MB corpus with the same sentencepiece model two ways and print them side by side:

* ``pretrain prepare`` (``pretrain.data.prepare.prepare``, chunked batch encoding, bounded in-flight work);
* the reference: the per-document loop of Megatron-LM's ``tools/preprocess_data.py`` -
  ``multiprocessing.Pool(workers).imap(encoder.encode, fin, 32)`` where ``encode`` parses one JSON line and
  returns one Python list of ids, written document by document as ``IndexedDatasetBuilder.add_document`` does.

The default corpus (``--corpus distinct``) is ~50 MB of real text that never repeats (``distinct_corpus.py``):
a memoizing tokenizer gets no free hits from it. ``--corpus demo-repeated`` (the demo corpus repeated) is kept
for comparison; it flatters ``pretrain prepare``. The BPE model is trained on a sample of the corpus benchmarked.

Each method runs in its own process, alternating, best of ``--repeats``; peak RSS and PSS are sampled over the
whole process tree (main + workers), and CPU seconds (main + workers) are reported because on a shared machine
they are steadier than wall time.
Both outputs are checked to be byte-identical. Usage::

    python benchmarks/bench_prepare.py [--corpus distinct|demo-repeated] [--workers 2] [--mb 50] [--vocab 32000]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


CORPORA = ("distinct", "demo-repeated")
TOKENIZER_SAMPLE_BYTES = 10_000_000


def build_corpus(kind: str, mb: int, cache: Path) -> Path:
    """The benchmark corpus (jsonl, one document per line).

    ``distinct``: ``mb`` MB of text that never repeats (``distinct_corpus.py``), the honest case for a word
    cache. ``demo-repeated``: the ~10 MB demo corpus repeated until it reaches ``mb`` MB, which flatters it.
    """
    if kind == "distinct":
        from distinct_corpus import ensure_distinct_corpus

        return ensure_distinct_corpus(mb, cache)
    from pretrain.data.demo_corpus import ensure_demo_corpus

    out = cache / f"bench_{mb}mb.jsonl"
    if not out.exists():
        demo = ensure_demo_corpus(cache).read_bytes()
        tmp = out.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for _ in range(max(1, round(mb * 1e6 / len(demo)))):
                f.write(demo)
        os.replace(tmp, out)
    return out


def build_tokenizer(corpus: Path, vocab: int, cache: Path) -> Path:
    """A BPE model trained on a ~10 MB sample of ``corpus`` itself: every k-th document."""
    from pretrain.data.corpus import CorpusReader
    from pretrain.data.tokenizer import text_lines, train_sentencepiece

    out = cache / f"bench_bpe_{vocab}_{corpus.stem}"
    if not (out / "tokenizer.model").exists():
        every = max(1, round(corpus.stat().st_size / TOKENIZER_SAMPLE_BYTES))
        docs = CorpusReader([str(corpus)])
        texts = (d.text for i, d in enumerate(docs) if i % every == 0)
        print(f"training sentencepiece BPE {vocab} on every {every}th document of {corpus.name}", flush=True)
        train_sentencepiece(text_lines(texts), out, vocab, verbose=False)
    return out / "tokenizer.model"


# ---- the reference: Megatron-LM tools/preprocess_data.py, reduced to what runs for one json key -------------
class Encoder:
    """As in preprocess_data.py: one JSON line in, one list of ids (+ EOD) out."""

    def __init__(self, model: str):
        self.model = model

    def initializer(self):
        import sentencepiece as spm

        Encoder.tokenizer = spm.SentencePieceProcessor(model_file=self.model)

    def encode(self, json_line: str):
        data = json.loads(json_line)
        text = data["text"]
        doc_ids, sentence_lens = [], []
        for sentence in [text]:  # IdentitySplitter
            sentence_ids = Encoder.tokenizer.encode_as_ids(sentence)
            if len(sentence_ids) > 0:
                doc_ids.extend(sentence_ids)
                sentence_lens.append(len(sentence_ids))
        if len(doc_ids) > 0:
            doc_ids.append(Encoder.tokenizer.eos_id())
            sentence_lens[-1] += 1
        return doc_ids, sentence_lens, len(json_line)


def run_reference(corpus: str, model: str, output: str, workers: int) -> dict:
    from pretrain.data.indexed import dtype_for_vocab, write_index

    encoder = Encoder(model)
    encoder.initializer()
    dtype = np.dtype(dtype_for_vocab(Encoder.tokenizer.vocab_size()))
    fin = open(corpus, encoding="utf-8")
    pool = multiprocessing.get_context("fork").Pool(workers, initializer=encoder.initializer)
    encoded_docs = pool.imap(encoder.encode, fin, 32)
    data_file = open(output + ".bin", "wb")
    sequence_lengths, document_indices = [], [0]
    tokens = 0
    for doc, sentence_lens, _ in encoded_docs:  # IndexedDatasetBuilder.add_document
        np_array = np.array(doc, dtype=dtype)
        data_file.write(np_array.tobytes(order="C"))
        sequence_lengths.extend(sentence_lens)
        document_indices.append(len(sequence_lengths))
        tokens += len(doc)
    data_file.close()
    write_index(output + ".idx", dtype, np.array(sequence_lengths), np.array(document_indices))
    pool.close()
    pool.join()
    return {"tokens": tokens}


def run_ours(corpus: str, model: str, output: str, workers: int) -> dict:
    from pretrain.data.prepare import prepare

    meta = prepare([corpus], model, output, workers=workers, append_eod=True, progress=False)
    return {"tokens": meta["tokens"]}


def _child(method: str, corpus: str, model: str, output: str, workers: int) -> None:
    start = time.perf_counter()
    result = (run_ours if method == "ours" else run_reference)(corpus, model, output, workers)
    result["seconds"] = time.perf_counter() - start
    result["main_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def measure(method: str, corpus: Path, model: Path, output: Path, workers: int) -> dict:
    """Run one method in a fresh process, sampling the RSS and PSS of its whole process tree.

    RSS counts a page that forked workers share with their parent in every process; PSS splits it among them.
    """
    import psutil

    cmd = [sys.executable, __file__, "--child", method, str(corpus), str(model), str(output), str(workers)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    root, peak, peak_pss = psutil.Process(proc.pid), 0, 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # usage includes the workers it waited for
        if pid:
            break
        try:
            mems = [p.memory_full_info() for p in [root, *root.children(recursive=True)]]
            peak, peak_pss = max(peak, sum(m.rss for m in mems)), max(peak_pss, sum(m.pss for m in mems))
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.05)
    out = proc.stdout.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{method} failed (exit status {status})")
    result = json.loads(out.strip().splitlines()[-1])
    result["tree_peak_rss_mb"] = peak / 2**20
    result["tree_peak_pss_mb"] = peak_pss / 2**20
    result["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    return result


def _load() -> str:
    """1/5/15-minute load averages: on a shared machine, a timing means little unless they stayed low."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", choices=CORPORA, default="distinct",
                   help="distinct: text that never repeats (default); demo-repeated: the demo corpus repeated")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--mb", type=int, default=50, help="corpus size in MB")
    p.add_argument("--vocab", type=int, default=32000, help="sentencepiece BPE vocabulary")
    p.add_argument("--repeats", type=int, default=2, help="runs per method; the fastest is reported")
    p.add_argument("--cache", type=Path, default=None, help="default: $PRETRAIN_CACHE or ~/.cache/pretrain")
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        method, corpus, model, output, workers = args.child
        _child(method, corpus, model, output, int(workers))
        return

    from pretrain.data.demo_corpus import cache_dir

    cache = args.cache or cache_dir()
    corpus = build_corpus(args.corpus, args.mb, cache)
    model = build_tokenizer(corpus, args.vocab, cache)
    size_mb = corpus.stat().st_size / 1e6
    out = cache / "bench_out"
    out.mkdir(exist_ok=True)
    print(f"corpus {corpus.name}: {size_mb:.1f} MB; sentencepiece BPE {args.vocab}; {args.workers} workers; "
          f"{os.cpu_count()} CPUs; load average {_load()}", flush=True)
    runs: dict[str, dict] = {}
    for rep in range(args.repeats):  # alternate the methods so a load spike on the shared machine hits both
        for name, method in [("reference (Megatron Pool.imap per doc)", "reference"), ("pretrain prepare", "ours")]:
            r = measure(method, corpus, model, out / method, args.workers)
            print(f"  run {rep + 1}: {name} in {r['seconds']:.1f}s", flush=True)
            if name not in runs or r["seconds"] < runs[name]["seconds"]:
                runs[name] = r
    same = all((out / f"ours{e}").read_bytes() == (out / f"reference{e}").read_bytes() for e in (".bin", ".idx"))

    ref = runs["reference (Megatron Pool.imap per doc)"]
    print("\n| method | wall s | Mtokens/s | MB/s | speed-up | CPU s (all processes) | Mtokens per CPU-s | "
          "peak RSS, all processes (MB) | peak PSS, all processes (MB) | peak RSS, main (MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        print(f"| {name} | {r['seconds']:.1f} | {r['tokens'] / r['seconds'] / 1e6:.2f} | "
              f"{size_mb / r['seconds']:.1f} | {ref['seconds'] / r['seconds']:.2f}x | {r['cpu_seconds']:.1f} | "
              f"{r['tokens'] / r['cpu_seconds'] / 1e6:.2f} | {r['tree_peak_rss_mb']:.0f} | "
              f"{r['tree_peak_pss_mb']:.0f} | {r['main_maxrss_mb']:.0f} |")
    print(f"\ntokens: {ref['tokens']:,}; outputs byte-identical: {same}; load average after: {_load()}")


if __name__ == "__main__":
    main()
