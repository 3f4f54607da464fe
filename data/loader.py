"""From a data config to training batches: datasets, blend, split, sampler, DataLoader, collate.

The config is a mapping (or ``pretrain.config.DataConfig``) with these keys; only ``train`` is required:

========================  ==========================================================================
``train``                 ``["PREFIX", ...]`` (mixed by token count) or ``[w1, "PREFIX1", w2, "PREFIX2", ...]``
``valid``                 separate validation prefixes, same form; empty: split off ``train`` by ``split``
``split``                 ``"98,2,0"``: train,valid(,test) shares of each prefix's documents (consecutive ranges)
``tokenizer``             tokenizer path; checked against every ``PREFIX.json`` (or pass ``tokenizer=``)
``seq_length``            GPT sample length; T5 encoder length
``decoder_seq_length``    T5: decoder length, at least what span corruption yields (114 for 512)
``noise_density``         T5 span corruption (0.15)
``mean_span_length``      T5 span corruption (3.0)
``eod_mask_loss``         GPT: no loss on predictions made from an EOD input
``document_mask``         GPT: per-document position ids and ``document_ids``; masked LM: ``document_ids``
``mask_rate``             masked LM (encoder family): share of tokens predicted (0.15)
``mask_token``            masked LM: the mask token's spelling (default: ``[MASK]`` or ``<mask>``)
``whole_word_mask``       masked LM: mask whole words
``sentence_pairs``        masked LM: ``nsp`` / ``sop`` sentence pairs with token types and a label
``seed``                  document/sample shuffles, T5 masks
``num_workers``           DataLoader workers
``cache_dir``             where sample indices are cached (default: ``index_cache/`` next to the first shard)
``text_key``              raw sources: the JSON key / column holding the text
``strict``                raw sources: stop at the first bad input record instead of counting it
``stream_lanes``          raw sources: independent packing lanes (a multiple of the data-parallel size)
``stream_shuffle``        raw sources: shuffle units and records per epoch (False: file order)
``stream_chunk_mb``       raw sources: size of the JSON Lines byte ranges that are shuffled as units
========================  ==========================================================================

Entries of ``train`` may also be raw text (``.jsonl[.gz]``, ``.parquet``, globs, ``save_to_disk``
directories, fsspec URLs; :mod:`pretrain.data.raw_source`): it is then tokenized while training, in
``num_workers`` processes, and blended with any shards by weight (:mod:`pretrain.data.stream_loader`); every
kind streams (masked LM without ``sentence_pairs=nsp``, whose random second segment needs a shard).

Documents are always separated by EOD: shards written without ``--append-eod`` (``PREFIX.json`` says so) get
a virtual EOD after every document at read time.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from pretrain.data.blend import BlendedDataset, samples_per_dataset, split_document_ranges
from pretrain.data.gpt_dataset import GPTDataset
from pretrain.data.indexed import IndexedDataset
from pretrain.data.metadata import meta_path, read_metadata, verify_tokenizer
from pretrain.data.mlm_dataset import NSP_FROM_STREAM, MLMDataset, MLMMasking, masking_options
from pretrain.data.raw_source import cached_units, expand_source, is_raw_source
from pretrain.data.sampler import DataParallelSampler
from pretrain.data.stream_dataset import Packing, SourceSpec
from pretrain.data.stream_loader import StreamTrainData
from pretrain.data.t5_dataset import SpanCorruption, T5Dataset
from pretrain.data.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "train": [], "valid": [], "split": "98,2,0", "tokenizer": None, "seq_length": 1024, "decoder_seq_length": None,
    "noise_density": 0.15, "mean_span_length": 3.0, "eod_mask_loss": False, "document_mask": False, "seed": 1234,
    "num_workers": 0, "cache_dir": None, "text_key": "text", "strict": False, "stream_lanes": 8,
    "stream_shuffle": True, "stream_chunk_mb": 64.0, "mask_rate": 0.15, "mask_token": None, "whole_word_mask": False,
    "sentence_pairs": "none",
}
KINDS = ("gpt", "t5", "mlm")


def parse_blend(spec: Sequence, key: str = "train") -> tuple[list[str], list[float] | None]:
    """``["A", "B"]`` -> (prefixes, None); ``[0.7, "A", 0.3, "B"]`` -> (prefixes, weights)."""
    spec = [spec] if isinstance(spec, (str, Path)) else list(spec)
    if all(isinstance(s, (str, Path)) for s in spec):
        return [str(s) for s in spec], None
    if len(spec) % 2 or not all(isinstance(w, (int, float)) and isinstance(p, (str, Path))
                                for w, p in zip(spec[::2], spec[1::2])):
        raise ValueError(f"data.{key}: expected [PREFIX, ...] or [WEIGHT, PREFIX, ...], got {spec!r}")
    return [str(p) for p in spec[1::2]], [float(w) for w in spec[::2]]


def _config(config: Mapping | Any) -> dict:
    values = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    unknown = set(values) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"data config: unknown keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    cfg = {**DEFAULTS, **{k: v for k, v in values.items() if v is not None}}
    if not cfg["train"]:
        raise ValueError("data.train: no shard prefixes given")
    return cfg


def _open_shard(prefix: str, tokenizer: Tokenizer) -> tuple[IndexedDataset, bool]:
    """The shard, and whether documents need a virtual EOD (``PREFIX.json`` says none was appended).

    Every token id is checked against ``tokenizer``'s vocabulary here, in full (one read of the ``.bin``)."""
    indexed = IndexedDataset(prefix)
    indexed.check_token_ids(tokenizer.vocab_size, tokenizer.path)
    if not meta_path(prefix).exists():  # e.g. written by Megatron's tools: nothing to verify against
        log.warning("%s: no metadata; cannot check the tokenizer, assuming documents end with EOD", meta_path(prefix))
        return indexed, False
    verify_tokenizer(prefix, tokenizer)
    return indexed, not read_metadata(prefix).get("append_eod", False)


def _dataset(kind: str, cfg: dict, tokenizer: Tokenizer, indexed: IndexedDataset, add_eod: bool,
             documents: np.ndarray, num_samples: int | None, cache_dir: Path):
    common = dict(add_eod=add_eod, cache_dir=cache_dir)
    if kind == "gpt":
        return GPTDataset(indexed, documents, num_samples, cfg["seq_length"], cfg["seed"], tokenizer.eod_id,
                          eod_mask_loss=cfg["eod_mask_loss"], document_masking=cfg["document_mask"], **common)
    if kind == "mlm":
        return MLMDataset(indexed, documents, num_samples, cfg["seq_length"], cfg["seed"], tokenizer=tokenizer,
                          mask_rate=cfg["mask_rate"], mask_token=cfg["mask_token"],
                          whole_word=cfg["whole_word_mask"], pairs=cfg["sentence_pairs"],
                          document_masking=cfg["document_mask"], **common)
    return T5Dataset(indexed, documents, num_samples, cfg["seq_length"], cfg["seed"],
                     sentinel_ids=tokenizer.sentinel_ids, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                     noise_density=cfg["noise_density"], mean_noise_span_length=cfg["mean_span_length"],
                     decoder_len=cfg["decoder_seq_length"], **common)


def _build(kind: str, cfg: dict, tokenizer: Tokenizer, prefixes: list[str], weights: list[float] | None,
           ranges: list[tuple[int, int]] | None, num_samples: int | None, cache_dir: Path):
    """One dataset over ``prefixes`` (each restricted to its document range), blended when there are several."""
    shards = [_open_shard(p, tokenizer) for p in prefixes]
    ranges = ranges or [(0, len(indexed)) for indexed, _ in shards]
    documents = [np.arange(b, e, dtype=np.int32) for (b, e) in ranges]
    if len(shards) == 1:
        return _dataset(kind, cfg, tokenizer, *shards[0], documents[0], num_samples, cache_dir)
    if weights is None:  # no weights: mix like a concatenation, by tokens
        weights = [float(indexed.sequence_lengths[d].astype(np.int64).sum()) for (indexed, _), d in
                   zip(shards, documents)]
    per_dataset = samples_per_dataset(weights, num_samples) if num_samples is not None else [None] * len(shards)
    datasets = [_dataset(kind, cfg, tokenizer, indexed, add_eod, d, n, cache_dir)
                for (indexed, add_eod), d, n in zip(shards, documents, per_dataset)]
    if num_samples is None:  # one epoch of the scarcest dataset, less a margin for the greedy rounding
        total = sum(weights)
        num_samples = int(min(len(ds) * total / w for ds, w in zip(datasets, weights))) - len(datasets)
        if num_samples <= 0:
            raise ValueError(f"{prefixes}: too few samples for a blend with weights {weights}")
    return BlendedDataset(datasets, weights, num_samples)


def _build_stream(kind: str, cfg: dict, tokenizer: Tokenizer, entries: list[str], weights: list[float] | None,
                  num_samples: int, cache_dir: Path) -> StreamTrainData:
    """Training data with raw sources, tokenized while training; shard entries take all their documents."""
    if kind == "mlm" and cfg["sentence_pairs"] == "nsp":
        raise ValueError(NSP_FROM_STREAM)
    if len(entries) > 1 and weights is None:
        raise ValueError(f"data.train: {len(entries)} entries with raw sources need weights, e.g. "
                         f"[0.7, {entries[0]!r}, 0.3, {entries[1]!r}] (raw text has no token count before reading)")
    per_dataset = samples_per_dataset(weights, num_samples) if weights else [num_samples]
    datasets, fingerprints = [], {}
    for d, (entry, n) in enumerate(zip(entries, per_dataset)):
        if not is_raw_source(entry):
            indexed, add_eod = _open_shard(entry, tokenizer)
            datasets.append(_dataset(kind, cfg, tokenizer, indexed, add_eod, np.arange(len(indexed), dtype=np.int32),
                                     n, cache_dir))
            continue
        unit_cache = None if "://" in entry and not cfg["cache_dir"] else cache_dir  # no local dir for a URL
        units, fingerprints[d] = cached_units(expand_source(entry), int(cfg["stream_chunk_mb"] * 2**20), unit_cache,
                                              min_units=4 * cfg["stream_lanes"])
        datasets.append(SourceSpec(entry, units, cfg["stream_lanes"], cfg["seed"], cfg["stream_shuffle"],
                                   cfg["text_key"], cfg["strict"]))
    corruption = None if kind != "t5" else SpanCorruption(
        cfg["seq_length"], cfg["seed"], sentinel_ids=tokenizer.sentinel_ids, eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id, noise_density=cfg["noise_density"], mean_noise_span_length=cfg["mean_span_length"],
        decoder_len=cfg["decoder_seq_length"])
    masking = None if kind != "mlm" else MLMMasking(cfg["seq_length"], cfg["seed"], mask_rate=cfg["mask_rate"],
                                                    **masking_options(tokenizer, cfg["mask_token"],
                                                                      cfg["whole_word_mask"], cfg["sentence_pairs"],
                                                                      cfg["document_mask"]))
    packing = Packing(cfg["seq_length"], tokenizer.eod_id, cfg["eod_mask_loss"], cfg["document_mask"],
                      corruption, masking)
    return StreamTrainData(datasets, weights, num_samples, tokenizer, packing, fingerprints, collate)


def build_train_valid_datasets(config: Mapping | Any, kind: str, train_samples: int,
                               valid_samples: int | None = None, tokenizer: Tokenizer | None = None):
    """(train, valid) datasets; ``valid`` is None when there is no validation data.

    ``train_samples``: samples the run will consume (sets the number of epochs); ``valid_samples``: likewise for
    validation, None for one pass. ``tokenizer`` defaults to loading ``config["tokenizer"]``.
    """
    if kind not in KINDS:
        raise ValueError(f"data kind {kind!r}: expected one of {KINDS}")
    cfg = _config(config)
    if tokenizer is None:
        if cfg["tokenizer"] is None:
            raise ValueError("data.tokenizer: needed for the EOD/pad/sentinel ids and the shard check")
        tokenizer = load_tokenizer(cfg["tokenizer"], num_threads=1)
    prefixes, weights = parse_blend(cfg["train"])
    cache_dir = Path(cfg["cache_dir"] or Path(prefixes[0]).parent / "index_cache")
    if any(is_raw_source(p) for p in prefixes):
        valid = (_build(kind, cfg, tokenizer, *parse_blend(cfg["valid"], "valid"), None, valid_samples, cache_dir)
                 if cfg["valid"] else None)
        return _build_stream(kind, cfg, tokenizer, prefixes, weights, train_samples, cache_dir), valid
    if cfg["valid"]:
        train = _build(kind, cfg, tokenizer, prefixes, weights, None, train_samples, cache_dir)
        valid = _build(kind, cfg, tokenizer, *parse_blend(cfg["valid"], "valid"), None, valid_samples, cache_dir)
        return train, valid
    splits = [split_document_ranges(len(IndexedDataset(p)), cfg["split"]) for p in prefixes]
    train = _build(kind, cfg, tokenizer, prefixes, weights, [s[0] for s in splits], train_samples, cache_dir)
    has_valid = len(splits[0]) > 1 and all(s[1][1] > s[1][0] for s in splits)
    valid = (_build(kind, cfg, tokenizer, prefixes, weights, [s[1] for s in splits], valid_samples, cache_dir)
             if has_valid else None)
    return train, valid


def collate(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack the samples' numpy arrays into batch tensors (key by key)."""
    return {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in samples[0]}


def build_dataloader(dataset, sampler: DataParallelSampler, num_workers: int = 0) -> DataLoader:
    """A DataLoader yielding this rank's micro-batches in sampler order (the trainer counts consumed samples)."""
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
                      pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0)
