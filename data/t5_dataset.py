"""T5 span corruption (Raffel et al. 2020, section 3.1.4), ported from the t5 codebase's preprocessors.

A packed chunk of ``raw_len`` tokens gets ~15 % of its tokens masked in spans of mean length 3. The encoder sees
the kept tokens with one sentinel per masked span, the decoder predicts each sentinel followed by the tokens it
hides. ``raw_len`` is chosen (``compute_input_and_target_lengths``) so the encoder input fits ``encoder_len``
exactly; every sample has the same target length. The noise mask is drawn from a generator seeded by
(seed, sample index), so any sample can be rebuilt on its own, which makes the dataset resumable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from pretrain.data.gpt_dataset import GPTDataset
from pretrain.data.indexed import IndexedDataset


def _noise_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) for a chunk of ``length`` tokens, never degenerate."""
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
    return num_noise, num_spans


def compute_input_and_target_lengths(inputs_length: int, noise_density: float = 0.15,
                                     mean_noise_span_length: float = 3.0) -> tuple[int, int]:
    """(raw tokens per chunk, target length) so that corrupted inputs plus EOS are at most ``inputs_length``
    (t5.data.preprocessors / HF run_t5_mlm_flax); e.g. 512 -> (568, 114). Raises ValueError for a density
    outside (0, 1) or spans shorter than one token, for which no chunk length fits."""
    if not 0 < noise_density < 1:
        raise ValueError(f"noise density {noise_density} (data.noise_density) must be in (0, 1); T5 uses 0.15")
    if mean_noise_span_length < 1:
        raise ValueError(f"mean noise span length {mean_noise_span_length} (data.mean_span_length) must be >= 1 "
                         f"token; T5 uses 3")

    def lengths(tokens_length: int) -> tuple[int, int]:
        num_noise = int(round(tokens_length * noise_density))
        num_spans = int(round(num_noise / mean_noise_span_length))
        return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1

    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    _, targets_length = lengths(tokens_length)
    if noise_density == 0.5 and targets_length > inputs_length:  # T5's hack: keep targets at the round number
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Split ``num_items`` into ``num_segments`` non-empty segments uniformly at random; their lengths."""
    first_in_segment = np.zeros(num_items, dtype=bool)
    first_in_segment[1:][rng.permutation(num_items - 1) < num_segments - 1] = True
    return np.bincount(np.cumsum(first_in_segment), minlength=num_segments)


def random_spans_noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
    """Boolean noise mask: alternating kept/noise spans, starting with a kept span, ending with a noise span."""
    n = max(length, 2)
    num_noise, num_spans = _noise_counts(n, noise_density, mean_noise_span_length)
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    kept_lengths = _random_segmentation(n - num_noise, num_spans, rng)
    interleaved = np.stack([kept_lengths, noise_lengths], axis=1).reshape(-1)
    span_id = np.repeat(np.arange(2 * num_spans), interleaved)
    return (span_id % 2 == 1)[:length]


def span_to_sentinel(tokens: np.ndarray, mask: np.ndarray, sentinel_ids: Sequence[int]) -> np.ndarray:
    """Replace each run of masked tokens by the next sentinel (``sentinel_ids[0]`` first) and drop the rest."""
    prev = np.concatenate([[False], mask[:-1]])
    first = mask & ~prev
    span = np.cumsum(first) - 1
    if first.sum() > len(sentinel_ids):
        raise ValueError(f"{int(first.sum())} noise spans but only {len(sentinel_ids)} sentinel ids")
    out = np.where(first, np.asarray(sentinel_ids, dtype=np.int64)[np.maximum(span, 0)], tokens)
    return out[~(mask & prev)]


class SpanCorruption:
    """Sample ``i`` of fixed encoder/decoder length from a chunk of ``raw_len`` tokens (arguments as for
    :class:`T5Dataset`); the noise mask is drawn from ``default_rng([seed, i])``."""

    def __init__(self, encoder_len: int, seed: int, *, sentinel_ids: Sequence[int], eos_id: int, pad_id: int,
                 noise_density: float = 0.15, mean_noise_span_length: float = 3.0, decoder_len: int | None = None):
        self.encoder_len, self.seed = encoder_len, seed
        self.noise_density, self.mean_noise_span_length = noise_density, mean_noise_span_length
        self.sentinel_ids, self.eos_id, self.pad_id = list(sentinel_ids), eos_id, pad_id
        self.raw_len, self.target_len = compute_input_and_target_lengths(encoder_len, noise_density,
                                                                         mean_noise_span_length)
        self.decoder_len = self.target_len if decoder_len is None else decoder_len
        if self.decoder_len < self.target_len:
            raise ValueError(f"decoder_len {decoder_len} is shorter than the {self.target_len} targets that "
                             f"encoder_len {encoder_len} implies")
        spans = _noise_counts(self.raw_len, noise_density, mean_noise_span_length)[1]
        if spans > len(self.sentinel_ids):
            raise ValueError(f"encoder_len {encoder_len} needs {spans} sentinel ids, got {len(self.sentinel_ids)}")

    def __call__(self, tokens: np.ndarray, i: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, i])
        mask = random_spans_noise_mask(len(tokens), self.noise_density, self.mean_noise_span_length, rng)
        inputs = np.append(span_to_sentinel(tokens, mask, self.sentinel_ids), self.eos_id)
        labels = np.append(span_to_sentinel(tokens, ~mask, self.sentinel_ids), self.eos_id)
        assert len(inputs) <= self.encoder_len and len(labels) == self.target_len, (len(inputs), len(labels))
        input_ids, attention_mask = self._pad(inputs, self.encoder_len)
        labels, loss_mask = self._pad(labels, self.decoder_len)
        decoder_input_ids = np.concatenate([[self.pad_id], labels[:-1]])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "decoder_input_ids": decoder_input_ids,
                "labels": labels, "loss_mask": loss_mask.astype(np.float32)}

    def _pad(self, tokens: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
        """``tokens`` padded to ``length`` with ``pad_id``, and the mask of real tokens."""
        out = np.full(length, self.pad_id, dtype=np.int64)
        out[:len(tokens)] = tokens
        return out, (np.arange(length) < len(tokens)).astype(np.int64)


class T5Dataset(SpanCorruption):
    """Span-corrupted samples of fixed encoder/decoder length from packed chunks of a shard.

    Args:
        indexed, documents, num_samples, seed, cache_dir, add_eod: as for :class:`~pretrain.data.gpt_dataset.GPTDataset`
            (the raw chunks are packed the same way, without the extra token).
        encoder_len: encoder input length (512 in T5); the target length follows (114 for 512).
        decoder_len: pad targets to this length (loss-masked) for a rounder shape; at least the target length.
        sentinel_ids: ids of ``<extra_id_0>, <extra_id_1>, ...`` in that order (T5's vocabulary has them
            at the top ids counting down: ``[vocab_size - 1, vocab_size - 2, ...]``).
        eos_id: appended to inputs and targets. pad_id: pads the encoder input, and starts the decoder.
    """

    def __init__(self, indexed: IndexedDataset, documents: np.ndarray, num_samples: int | None, encoder_len: int,
                 seed: int, *, sentinel_ids: Sequence[int], eos_id: int, pad_id: int, noise_density: float = 0.15,
                 mean_noise_span_length: float = 3.0, decoder_len: int | None = None, add_eod: bool = False,
                 cache_dir: str | Path | None = None):
        super().__init__(encoder_len, seed, sentinel_ids=sentinel_ids, eos_id=eos_id, pad_id=pad_id,
                         noise_density=noise_density, mean_noise_span_length=mean_noise_span_length,
                         decoder_len=decoder_len)
        self.chunks = GPTDataset(indexed, documents, num_samples, self.raw_len, seed, eos_id, add_eod=add_eod,
                                 extra_token=0, cache_dir=cache_dir)

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self(self.chunks.window(i)[0], i)
