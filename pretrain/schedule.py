"""Learning-rate and batch-size schedules as pure functions of training progress.

Nothing here keeps state: the LR and the global batch are recomputed from ``(step, consumed_samples)``,
so resuming a run needs only those two numbers.

* **Scaling rule** (Goyal et al. 2017): ``peak_lr = lr * B / base_batch_size`` ("linear") or
  ``lr * sqrt(B / base_batch_size)`` ("sqrt"), ``B`` the final global batch size.
* **Warmup**: linear from 0 to ``peak_lr``; the step being taken counts, so step ``s`` (0-based) uses
  ``peak_lr * (s + 1) / warmup``. Given in steps, in samples (then the schedule runs in samples:
  progress = samples consumed after this step) or as a fraction of training.
* **Decay** after warmup, to ``min_lr`` at the end: constant, linear, cosine, inverse-sqrt
  (``peak_lr * sqrt(warmup / progress)``) or warmup-stable-decay (flat, then a linear/cosine/1-sqrt
  decay over the last ``decay_fraction`` of training).
* **Batch ramp-up** (GPT-3, Megatron's ``--rampup-batch-size start increment samples``): the global batch
  starts at ``start`` and grows by ``increment`` every ``samples / num_increments`` consumed samples
  (:func:`pretrain.data.sampler.ramp_up`, shared with the data sampler).
"""

from __future__ import annotations

import math

from pretrain.config import SCALING_RULES, Config
from pretrain.data.sampler import ramp_up


def scaled_lr(lr: float, global_batch_size: int, base_batch_size: int | None, rule: str) -> float:
    """Peak LR for ``global_batch_size`` from an LR tuned at ``base_batch_size`` (Goyal et al.)."""
    if rule == "none" or base_batch_size is None:
        return lr
    ratio = global_batch_size / base_batch_size
    if rule == "linear":
        return lr * ratio
    if rule == "sqrt":
        return lr * math.sqrt(ratio)
    raise ValueError(f"unknown scaling rule {rule!r} (expected one of {SCALING_RULES})")


def lr_at(progress: float, total: float, warmup: float, peak_lr: float, min_lr: float,
          decay: str = "cosine", decay_fraction: float = 0.2, wsd_decay: str = "linear") -> float:
    """LR for the update that brings training to ``progress`` (1-based) out of ``total``.

    ``progress``, ``total`` and ``warmup`` share one unit: steps or samples.
    """
    if warmup > 0 and progress <= warmup:
        return peak_lr * progress / warmup
    if decay == "constant":
        return peak_lr
    if decay == "inverse_sqrt":
        return max(min_lr, peak_lr * math.sqrt(max(warmup, 1.0) / progress))
    if decay == "wsd":
        decay_start = total - decay_fraction * (total - warmup)
        if progress <= decay_start:
            return peak_lr
        t = min(1.0, (progress - decay_start) / max(total - decay_start, 1e-12))
        return min_lr + (peak_lr - min_lr) * _decay_factor(wsd_decay, t)
    t = min(1.0, max(0.0, (progress - warmup) / max(total - warmup, 1e-12)))
    return min_lr + (peak_lr - min_lr) * _decay_factor(decay, t)


def _decay_factor(style: str, t: float) -> float:
    """1 at the start of the decay (t=0), 0 at its end (t=1)."""
    if style == "linear":
        return 1.0 - t
    if style == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if style == "sqrt":
        return 1.0 - math.sqrt(t)
    raise ValueError(f"unknown decay style {style!r}")


class Schedule:
    """The schedule of one config: ``lr(step, consumed_samples)`` and ``batch_size(consumed_samples)``."""

    def __init__(self, cfg: Config):
        s, t = cfg.schedule, cfg.train
        self.cfg = cfg
        self.steps = t.steps
        self.peak_lr = scaled_lr(cfg.optimizer.lr, t.global_batch_size, s.base_batch_size, s.scaling)
        self.min_lr = s.min_lr
        self.batch_size = (ramp_up(s.rampup_start, s.rampup_increment, s.rampup_samples, t.global_batch_size)
                           if s.rampup_start else lambda consumed_samples: t.global_batch_size)
        self.by_samples = s.warmup_samples is not None
        if self.by_samples:
            self.total = float(self.total_samples())
            self.warmup = float(s.warmup_samples)
        else:
            self.total = float(t.steps)
            self.warmup = float(s.warmup_steps if s.warmup_steps is not None
                                else round(s.warmup_fraction * t.steps))

    def lr(self, step: int, consumed_samples: int) -> float:
        """LR for step ``step`` (0-based), taken after ``consumed_samples`` samples."""
        progress = consumed_samples + self.batch_size(consumed_samples) if self.by_samples else step + 1
        s = self.cfg.schedule
        return lr_at(progress, self.total, self.warmup, self.peak_lr, self.min_lr, s.decay,
                     s.decay_fraction, s.wsd_decay)

    def total_samples(self) -> int:
        """Samples consumed by the whole run (ramp-up included)."""
        return sum(b for _, _, b in self.trajectory())

    def trajectory(self):
        """Yield ``(step, consumed_samples_before, batch_size)`` for every step of training."""
        consumed = 0
        for step in range(self.steps):
            b = self.batch_size(consumed)
            yield step, consumed, b
            consumed += b
