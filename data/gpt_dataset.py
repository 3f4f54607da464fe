"""Packed GPT samples: documents concatenated (EOD between them) and cut into windows of ``seq_len + 1`` tokens.

Indices follow Megatron's ``GPTDataset`` exactly (same seed -> same windows), so runs can move between stacks:

* document index: the split's document ids repeated once per epoch, shuffled (``RandomState(seed)``);
  when the last epoch is only partly used (< 80 %), it is shuffled separately so it cannot crowd earlier ones;
* sample index ``[n + 1, 2]``: (position in the document index, token offset) where each window starts;
* shuffle index: a permutation of the windows.

They are built once and cached as ``.npy`` files under ``cache_dir`` (a file name keyed by a hash of every
parameter); the first process takes a file lock and builds, the others wait for it and memory-map the result.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from pretrain.data.indexed import IndexedDataset

log = logging.getLogger(__name__)

LAST_EPOCH_SEPARATE_THRESHOLD = 0.80  # Megatron's threshold for shuffling a short final epoch on its own


def cached_arrays(cache_dir: str | Path | None, description: dict, names: tuple[str, ...],
                  build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Return ``build()``'s arrays, cached under ``cache_dir`` by a hash of ``description``.

    One process builds while holding an exclusive ``flock`` (released by the OS if it dies); the others block on
    the lock, then find the files. Each file is written to a temporary name and renamed, and the description
    file goes last, so a present description means a complete cache. Cached arrays are memory-mapped.
    """
    if cache_dir is None:
        return build()
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(description, sort_keys=True)
    base = cache_dir / f"{description['class']}-{hashlib.sha256(text.encode()).hexdigest()[:24]}"
    paths = {name: Path(f"{base}-{name}.npy") for name in names}
    done = Path(f"{base}-description.json")

    def load() -> dict[str, np.ndarray]:
        return {name: np.load(p, mmap_mode="r", allow_pickle=False) for name, p in paths.items()}

    if done.exists():
        return load()
    with open(f"{base}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:  # a filesystem without flock: every process builds, the atomic renames keep it valid
            log.warning("%s: no file locking here; each process builds the indices itself", lock.name)
        if not done.exists():
            t0 = time.time()
            arrays = build()
            for name, p in paths.items():
                tmp = Path(f"{p}.tmp{os.getpid()}")
                with open(tmp, "wb") as f:
                    np.save(f, arrays[name], allow_pickle=False)
                os.replace(tmp, p)
            tmp = Path(f"{done}.tmp{os.getpid()}")
            tmp.write_text(text)
            os.replace(tmp, done)
            log.info("built %s in %.2fs", base.name, time.time() - t0)
    return load()


def build_document_index(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState,
                         separate_last_epoch: bool) -> np.ndarray:
    """``documents`` tiled ``num_epochs`` times and shuffled (the last epoch on its own when asked)."""
    if separate_last_epoch and num_epochs > 1:
        first = build_document_index(documents, num_epochs - 1, rng, False)
        return np.concatenate([first, build_document_index(documents, 1, rng, False)])
    index = np.tile(np.asarray(documents, dtype=np.int32), num_epochs)
    rng.shuffle(index)
    return index


def build_sample_index(sizes: np.ndarray, document_index: np.ndarray, seq_len: int,
                       extra_token: int = 1) -> np.ndarray:
    """Start (position in ``document_index``, offset) of every window, plus the end of the last one.

    Window ``i`` holds flat tokens ``[i*seq_len, (i+1)*seq_len + extra_token)``; entry ``i+1`` locates its last
    token (offset + 1 - extra_token), which is how Megatron's ``build_sample_idx`` encodes it. Partial last
    windows are dropped. Vectorised: one cumulative sum and one binary search.
    """
    lengths = sizes[document_index].astype(np.int64)
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    num_samples = max(total - extra_token, 0) // seq_len
    index = np.zeros((num_samples + 1, 2), dtype=np.int64)
    if num_samples == 0:
        return index
    last = np.arange(1, num_samples + 1, dtype=np.int64) * seq_len + extra_token - 1
    doc = np.searchsorted(ends, last, side="right")  # zero-length documents are skipped
    index[1:, 0] = doc
    index[1:, 1] = last - (ends[doc] - lengths[doc]) + 1 - extra_token
    return index


class GPTDataset:
    """Windows of ``seq_len + 1`` packed tokens from ``documents`` of a shard; ``ds[i]`` is a batch dict.

    Args:
        indexed: the shard.
        documents: ids of the documents this split may use (e.g. ``np.arange(0, 980)`` for a 98 % train split).
        num_samples: windows wanted; the number of epochs grows until they fit (``None``: one epoch).
        seq_len: model sequence length (each window has one extra token for the shifted labels).
        seed: fixes the document and window shuffles.
        eod_id: the end-of-document token id.
        add_eod: append ``eod_id`` after every document while reading (for shards written without
            ``--append-eod``); leave False when the shard already ends documents with EOD, as Megatron does.
        eod_mask_loss: zero the loss where the *input* token is EOD (the first token of the next document is
            not predicted from the previous one), Megatron's semantics.
        document_masking: position ids restart at 0 in every document and ``document_ids`` number the documents
            of a window (0, 1, ...), so attention can stay inside a document; otherwise positions run 0..s-1
            and ``document_ids`` are all 0.
        shuffle: shuffle documents and windows (False keeps shard order, for inspection and tests).
        extra_token: 1 for GPT windows (inputs and labels both ``seq_len`` long); 0 gives plain ``seq_len``
            chunks (used by T5 span corruption).
        cache_dir: where the indices are cached (``None``: built in memory every time).
    """

    def __init__(self, indexed: IndexedDataset, documents: np.ndarray, num_samples: int | None, seq_len: int,
                 seed: int, eod_id: int, *, add_eod: bool = False, eod_mask_loss: bool = False,
                 document_masking: bool = False, shuffle: bool = True, extra_token: int = 1,
                 cache_dir: str | Path | None = None):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.indexed, self.seq_len, self.eod_id = indexed, seq_len, eod_id
        self.add_eod, self.eod_mask_loss, self.document_masking = add_eod, eod_mask_loss, document_masking
        self.extra_token = extra_token
        documents = np.asarray(documents, dtype=np.int32)
        if len(documents) and (documents.min() < 0 or documents.max() >= len(indexed)):
            raise ValueError(f"{indexed.prefix}: document ids outside [0, {len(indexed)})")
        self.sizes = indexed.sequence_lengths + np.int32(1) if add_eod else indexed.sequence_lengths
        tokens_per_epoch = int(self.sizes[documents].astype(np.int64).sum())
        if tokens_per_epoch <= extra_token + seq_len - 1:
            raise ValueError(f"{indexed.prefix}: {tokens_per_epoch} tokens in {len(documents)} documents, too few "
                             f"for one window of {seq_len + extra_token}")
        self.num_epochs = 1
        if num_samples is not None:
            while self.num_epochs * tokens_per_epoch < num_samples * seq_len + extra_token:
                self.num_epochs += 1
        description = {
            "class": type(self).__name__, "prefix": str(Path(indexed.prefix).resolve()),
            "num_sequences": len(indexed), "num_tokens": indexed.num_tokens,
            "documents": hashlib.sha256(documents.tobytes()).hexdigest(), "num_samples": num_samples,
            "seq_len": seq_len, "seed": seed, "add_eod": add_eod, "shuffle": shuffle, "extra_token": extra_token,
        }
        build = lambda: self._build(documents, num_samples, tokens_per_epoch, seed, shuffle)  # noqa: E731
        arrays = cached_arrays(cache_dir, description, ("document_index", "sample_index", "shuffle_index"), build)
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

    def _build(self, documents: np.ndarray, num_samples: int | None, tokens_per_epoch: int, seed: int,
               shuffle: bool) -> dict[str, np.ndarray]:
        rng = np.random.RandomState(seed)
        separate_last, samples_before_last = False, 0
        if self.num_epochs > 1 and num_samples is not None:
            samples_before_last = ((self.num_epochs - 1) * tokens_per_epoch - self.extra_token) // self.seq_len
            per_epoch = (tokens_per_epoch - self.extra_token) // self.seq_len
            separate_last = num_samples - samples_before_last < int(LAST_EPOCH_SEPARATE_THRESHOLD * per_epoch)
        if shuffle:
            document_index = build_document_index(documents, self.num_epochs, rng, separate_last)
        else:
            document_index = np.tile(documents, self.num_epochs)
        sample_index = build_sample_index(self.sizes, document_index, self.seq_len, self.extra_token)
        n = len(sample_index) - 1
        dtype = np.uint32 if n < np.iinfo(np.uint32).max - 1 else np.int64
        shuffle_index = np.arange(n, dtype=dtype)
        if shuffle:
            cut = samples_before_last if separate_last else n
            rng.shuffle(shuffle_index[:cut])
            if cut < n:
                rng.shuffle(shuffle_index[cut:])
        return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}

    def __len__(self) -> int:
        return len(self.sample_index) - 1

    def _piece(self, doc: int, offset: int, length: int) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of document ``doc``, with the virtual EOD when ``add_eod``."""
        if not self.add_eod:
            return self.indexed.get(doc, offset, length)
        real = int(self.indexed.sequence_lengths[doc])
        tokens = self.indexed.get(doc, offset, max(min(length, real - offset), 0))
        return np.append(tokens, self.eod_id) if offset + length > real else tokens

    def window(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw ``seq_len + extra_token`` tokens of sample ``i`` and the length of each document piece."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        j = int(self.shuffle_index[i])
        first, first_offset = (int(v) for v in self.sample_index[j])
        last, last_offset = (int(v) for v in self.sample_index[j + 1])
        pieces = []
        for k in range(first, last + 1):
            doc = int(self.document_index[k])
            offset = first_offset if k == first else 0
            end = last_offset + self.extra_token if k == last else int(self.sizes[doc])
            pieces.append(self._piece(doc, offset, end - offset))
        tokens = np.concatenate(pieces).astype(np.int64)
        return tokens, np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return gpt_sample(*self.window(i), self.eod_id, self.eod_mask_loss, self.document_masking)


def gpt_sample(tokens: np.ndarray, piece_lengths: np.ndarray, eod_id: int, eod_mask_loss: bool,
               document_masking: bool) -> dict[str, np.ndarray]:
    """The sample dict of a window of ``seq_len + 1`` tokens made of document pieces of ``piece_lengths``."""
    input_ids, labels = tokens[:-1], tokens[1:]
    s = len(input_ids)
    loss_mask = np.ones(s, dtype=np.float32)
    if eod_mask_loss:
        loss_mask[input_ids == eod_id] = 0.0
    position_ids = np.arange(s, dtype=np.int64)
    document_ids = np.zeros(s, dtype=np.int64)
    if document_masking:
        start = 0
        for k, n in enumerate(piece_lengths.tolist()):
            position_ids[start:start + n] -= start
            document_ids[start:start + n] = k
            start += n
    return {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask,
            "position_ids": position_ids, "document_ids": document_ids}
