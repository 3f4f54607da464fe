"""Data-parallel batch sampler that resumes exactly, at any data-parallel size.

The global sample sequence is a function of (seed, position) only: position ``g`` is sample
``perm(seed, epoch)[g % n]`` with ``epoch = g // n`` (or just ``g % n`` without shuffling, when the dataset is
already shuffled, as packed GPT datasets are). A global batch of size ``G`` at ``consumed_samples = c`` is
positions ``[c, c + G)``; rank ``r`` of ``dp`` takes the contiguous part ``[c + r*G/dp, c + (r+1)*G/dp)`` and
splits it into micro-batches. So the set of samples in every optimizer step depends on ``c`` and ``G`` only:
resuming with 4 ranks what 2 started trains on the same global batches. ``G`` may change between steps
(batch-size ramp-up, see :func:`ramp_up`).

Checkpoint the *trainer's* ``consumed_samples``: a DataLoader with workers reads ahead, so the sampler's own
counter runs ahead of training.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np


def ramp_up(start: int, increment: int, ramp_samples: int, final: int) -> Callable[[int], int]:
    """Megatron's batch-size ramp-up: ``start``, growing by ``increment`` evenly over ``ramp_samples``
    consumed samples, then ``final``. Depends on consumed samples only, never on the data-parallel size."""
    if start <= 0 or increment <= 0 or final < start or (final - start) % increment:
        raise ValueError(f"ramp-up {start}->{final} by {increment}: need 0 < start <= final and "
                         f"final - start divisible by increment")
    steps = (final - start) // increment
    per_step = ramp_samples / steps if steps else 0.0

    def global_batch_size(consumed_samples: int) -> int:
        if steps == 0 or consumed_samples >= ramp_samples:
            return final
        return min(final, start + int(consumed_samples / per_step) * increment)

    return global_batch_size


class DataParallelSampler:
    """Yields this rank's micro-batches (lists of dataset indices) of every global batch.

    Args:
        num_samples: length of the dataset; positions past it wrap into the next epoch.
        dp_rank, dp_size: this rank and the data-parallel world size.
        micro_batch_size: samples per forward pass on one rank.
        global_batch_size: samples per optimizer step over all ranks, or a function of consumed samples
            (ramp-up). It must be a multiple of ``micro_batch_size * dp_size``.
        consumed_samples: where to resume.
        seed, shuffle: reshuffle every epoch with ``seed + epoch`` (off by default: packed datasets are
            shuffled already, and the order then is the dataset's own).
    """

    def __init__(self, num_samples: int, dp_rank: int, dp_size: int, micro_batch_size: int,
                 global_batch_size: int | Callable[[int], int], consumed_samples: int = 0, seed: int = 0,
                 shuffle: bool = False):
        if num_samples <= 0:
            raise ValueError(f"sampler over an empty dataset ({num_samples} samples)")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        if micro_batch_size <= 0 or consumed_samples < 0:
            raise ValueError(f"micro_batch_size {micro_batch_size} and consumed_samples {consumed_samples} "
                             f"must be positive / non-negative")
        self.num_samples, self.dp_rank, self.dp_size = num_samples, dp_rank, dp_size
        self.micro_batch_size, self.consumed_samples = micro_batch_size, consumed_samples
        self.seed, self.shuffle = seed, shuffle
        self.schedule = global_batch_size if callable(global_batch_size) else (lambda _: global_batch_size)
        self._epoch, self._perm = -1, None

    def _checked(self, gbs: int) -> int:
        if gbs <= 0 or gbs % (self.micro_batch_size * self.dp_size):
            raise ValueError(f"global batch size {gbs} is not a positive multiple of micro_batch_size "
                             f"{self.micro_batch_size} x data-parallel size {self.dp_size}")
        return gbs

    def global_batch_size(self, consumed_samples: int | None = None) -> int:
        """The global batch size (from the schedule) of the batch starting at ``consumed_samples``."""
        return self._checked(int(self.schedule(self.consumed_samples if consumed_samples is None
                                               else consumed_samples)))

    def num_micro_batches(self, consumed_samples: int | None = None) -> int:
        """Gradient-accumulation steps of the global batch that starts at ``consumed_samples``."""
        return self.global_batch_size(consumed_samples) // (self.micro_batch_size * self.dp_size)

    def _sample(self, positions: np.ndarray) -> np.ndarray:
        if not self.shuffle:
            return positions % self.num_samples
        out = np.empty_like(positions)
        epochs = positions // self.num_samples
        for epoch in np.unique(epochs):
            if epoch != self._epoch:
                self._epoch = int(epoch)
                self._perm = np.random.default_rng([self.seed, self._epoch]).permutation(self.num_samples)
            sel = epochs == epoch
            out[sel] = self._perm[positions[sel] % self.num_samples]
        return out

    def global_batch(self, consumed_samples: int, global_batch_size: int) -> np.ndarray:
        """All sample indices of the global batch starting at ``consumed_samples`` (independent of dp)."""
        return self._sample(np.arange(consumed_samples, consumed_samples + global_batch_size, dtype=np.int64))

    def next_global_batch(self, global_batch_size: int | None = None) -> list[list[int]]:
        """This rank's micro-batches of the next global batch; advances ``consumed_samples``."""
        gbs = self.global_batch_size() if global_batch_size is None else self._checked(global_batch_size)
        per_rank = gbs // self.dp_size
        start = self.consumed_samples + self.dp_rank * per_rank
        mine = self._sample(np.arange(start, start + per_rank, dtype=np.int64))
        self.consumed_samples += gbs
        return [m.tolist() for m in mine.reshape(-1, self.micro_batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        """Micro-batches forever (use as a DataLoader ``batch_sampler``; the trainer decides when to stop)."""
        while True:
            yield from self.next_global_batch()

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples, self.seed, self.shuffle = state["consumed_samples"], state["seed"], state["shuffle"]
