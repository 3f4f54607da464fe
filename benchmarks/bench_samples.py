"""Random-access reads of packed GPT samples: ours (``pretrain.data.gpt_dataset``) vs ``megatron.core`` GPTDataset.

Both read the same shard with the same seed (so they serve the very same windows, which is checked), in one
process, with a warm page cache: the number is the cost of index lookup + gather + masks per sample.

    python benchmarks/bench_samples.py                      # synthesizes ~50M tokens of shards in a temp dir
    python benchmarks/bench_samples.py --prefix PREFIX --seq-len 2048 --reads 5000
"""

from __future__ import annotations

import argparse
import tempfile
import time
import types
from pathlib import Path

import numpy as np

from pretrain.data.gpt_dataset import GPTDataset
from pretrain.data.indexed import IndexedDataset, IndexedDatasetWriter

EOD = 2


def synthesize(prefix: Path, tokens: int, seed: int = 0) -> None:
    """Documents of log-normal length (median ~1.5k tokens), each ending with EOD, ``tokens`` in total."""
    rng = np.random.default_rng(seed)
    writer = IndexedDatasetWriter(prefix, np.uint16)
    written = 0
    while written < tokens:
        lengths = np.clip(rng.lognormal(7.3, 1.0, 1000).astype(np.int64), 2, 100_000)
        flat = rng.integers(3, 32000, int(lengths.sum()), dtype=np.uint16)
        flat[np.cumsum(lengths) - 1] = EOD
        writer.add_documents(flat, lengths)
        written += int(lengths.sum())
    writer.finalize()


def megatron_dataset(prefix: str, seq_len: int, seed: int, cache: str, masking: bool):
    from megatron.core.datasets.gpt_dataset import GPTDataset as MegatronGPTDataset
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexed
    from megatron.core.datasets.utils import Split

    tok = types.SimpleNamespace(vocab_size=32000, eod=EOD, eos=EOD, pad=0, unique_identifiers={"class": "bench"})
    cfg = GPTDatasetConfig(random_seed=seed, sequence_length=seq_len, split="1", path_to_cache=cache, tokenizer=tok,
                           reset_position_ids=masking, reset_attention_mask=False, eod_mask_loss=masking,
                           create_attention_mask=False)
    indexed = MegatronIndexed(prefix)
    docs = np.arange(len(indexed.sequence_lengths), dtype=np.int32)
    return MegatronGPTDataset(indexed, prefix, docs, None, Split.train, cfg)


def time_reads(ds, order: np.ndarray) -> float:
    for i in order[: len(order) // 10]:  # warm the page cache and lazy index maps
        ds[int(i)]
    t0 = time.perf_counter()
    for i in order:
        ds[int(i)]
    return len(order) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prefix", help="an existing shard (with EOD after every document); default: synthesize one")
    p.add_argument("--tokens", type=int, default=50_000_000, help="tokens to synthesize")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--reads", type=int, default=5000, help="random samples read per implementation")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        prefix = args.prefix
        if prefix is None:
            prefix = f"{tmp}/synthetic"
            t0 = time.perf_counter()
            synthesize(Path(prefix), args.tokens)
            print(f"synthesized {prefix}: {IndexedDataset(prefix).num_tokens / 1e6:.1f}M tokens "
                  f"in {time.perf_counter() - t0:.1f}s")
        indexed = IndexedDataset(prefix)
        docs = np.arange(len(indexed), dtype=np.int32)
        import megatron.core.datasets.gpt_dataset  # noqa: F401  (~8 s of imports, kept out of the build time)
        rows = []
        for masking in (False, True):
            t0 = time.perf_counter()
            ours = GPTDataset(indexed, docs, None, args.seq_len, args.seed, EOD, eod_mask_loss=masking,
                              document_masking=masking, cache_dir=f"{tmp}/ours-{masking}")
            ours_build = time.perf_counter() - t0
            t0 = time.perf_counter()
            ref = megatron_dataset(prefix, args.seq_len, args.seed, f"{tmp}/megatron-{masking}", masking)
            ref_build = time.perf_counter() - t0
            assert len(ours) == len(ref), (len(ours), len(ref))
            order = np.random.default_rng(0).integers(0, len(ours), args.reads)
            for i in order[:50]:
                assert np.array_equal(ours[int(i)]["input_ids"], ref[int(i)]["tokens"].numpy()), i
                assert np.array_equal(ours[int(i)]["position_ids"], ref[int(i)]["position_ids"].numpy()), i
            name = "doc masking + EOD loss mask" if masking else "plain"
            for impl, ds, build in (("ours", ours, ours_build), ("megatron.core", ref, ref_build)):
                rate = time_reads(ds, order)
                rows.append((name, impl, build, rate, rate * args.seq_len / 1e6))
        print(f"\n{len(ours):,} samples of {args.seq_len} tokens, {args.reads:,} random reads, one process\n")
        print(f"| {'samples':<28} | {'dataset':<13} | {'index build s':>13} | {'samples/s':>10} | {'Mtok/s':>7} |")
        print(f"|{'-' * 30}|{'-' * 15}|{'-' * 14}:|{'-' * 11}:|{'-' * 8}:|")
        for name, impl, build, rate, mtok in rows:
            print(f"| {name:<28} | {impl:<13} | {build:>13.2f} | {rate:>10,.0f} | {mtok:>7.1f} |")


if __name__ == "__main__":
    main()
