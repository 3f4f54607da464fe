"""Loss spikes and non-finite steps: detect, then skip, roll back past the data, or stop (``train.spike_*``).

Detection, after every step, from the step's global numbers (reduced over all ranks, so every rank decides the
same):

* non-finite loss or gradient norm (the engine has already skipped that update);
* loss spike: ``train.spike_zscore > 0`` and the loss lies more than that many standard deviations above the mean
  of the last ``train.spike_window`` accepted losses (once the window is full);
* gradient-norm spike: ``train.spike_grad_factor > 0`` and the norm exceeds that factor times the median of the
  last ``train.spike_window`` accepted norms (once the window is full).

Action (``train.spike_action``):

* ``skip``: a non-finite step's update is skipped (``train.max_nonfinite`` in a row stop the run, exit 3, as
  before); a finite spike's update has been applied already: it is logged and counted, training goes on;
* ``rollback``: reload the last checkpoint (waiting for a background write) and skip the data window from that
  checkpoint's data position to the end of the offending step: the data position then runs ahead of
  ``consumed_samples`` (which the LR and batch-size schedules follow) by :attr:`SpikeGuard.data_skip` samples,
  saved in the checkpoint (``meta.json["data_skip"]``) so a resume continues past the window too. The run then
  trains exactly like one whose sampler never held that window. At most ``train.spike_max_rollbacks``, then stop;
* ``stop``: log a diagnostic (step, loss, window mean and deviation, norm, the samples of the step) and end the run
  with exit code 3 without saving: the last checkpoint is the last good state.

Counts (``spikes/nonfinite``, ``spikes/loss``, ``spikes/grad``, ``spikes/rollbacks``) go into every metrics row.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from typing import Callable

from pretrain import checkpoint as ckpt

log = logging.getLogger("pretrain.train")

ACTIONS = ("skip", "rollback", "stop")


class SpikeGuard:
    """The detector, the action and the data skip of one run."""

    def __init__(self, train_cfg, checkpoint_dir: str | None) -> None:
        self.t, self.checkpoint_dir = train_cfg, checkpoint_dir
        self.losses: deque[float] = deque(maxlen=train_cfg.spike_window)
        self.norms: deque[float] = deque(maxlen=train_cfg.spike_window)
        self.data_skip = 0  # samples the data position runs ahead of consumed_samples (rolled-back windows)
        self.counts = {"nonfinite": 0, "loss": 0, "grad": 0, "rollbacks": 0}

    def shifted(self, batch_size: Callable[[int], int]) -> Callable[[int], int]:
        """``batch_size`` (a function of consumed samples) as a function of the data position."""
        skip = self.data_skip
        return lambda position: batch_size(position - skip)

    def check(self, step: int, out) -> str | None:
        """The action for this step's result (None: nothing detected)."""
        what = self._detect(out)
        if what is None:
            self.losses.append(out.loss)
            self.norms.append(out.grad_norm)
            return None
        self.counts[what] += 1
        action = self.t.spike_action
        if action == "rollback" and self.counts["rollbacks"] >= self.t.spike_max_rollbacks:
            log.error("step %d: %s, and train.spike_max_rollbacks=%d rollbacks already done: stopping", step,
                      self._describe(what, out), self.t.spike_max_rollbacks)
            return "stop"
        if action == "stop":
            log.error("step %d: %s: stopping (train.spike_action=stop) without saving; the last checkpoint is the "
                      "last good state", step, self._describe(what, out))
        elif what != "nonfinite" or action == "rollback":  # non-finite with skip: the trainer logs it as before
            log.warning("step %d: %s: %s", step, self._describe(what, out),
                        "rolling back" if action == "rollback" else "update kept (train.spike_action=skip)")
        return action

    def _detect(self, out) -> str | None:
        if out.skipped:
            return "nonfinite"
        if self.t.spike_zscore > 0 and len(self.losses) == self.losses.maxlen:
            mean, std = statistics.fmean(self.losses), statistics.pstdev(self.losses)
            if out.loss > mean + self.t.spike_zscore * max(std, 1e-12):
                return "loss"
        if self.t.spike_grad_factor > 0 and len(self.norms) == self.norms.maxlen:
            if out.grad_norm > self.t.spike_grad_factor * statistics.median(self.norms):
                return "grad"
        return None

    def _describe(self, what: str, out) -> str:
        if what == "nonfinite" or not self.losses:
            return f"non-finite loss {out.loss:.4g} or grad norm {out.grad_norm:.4g}"
        mean, std = statistics.fmean(self.losses), statistics.pstdev(self.losses)
        z = (out.loss - mean) / max(std, 1e-12)
        return (f"{'loss' if what == 'loss' else 'grad-norm'} spike: loss {out.loss:.4f} (z-score {z:.1f} over the "
                f"last {len(self.losses)}: mean {mean:.4f}, std {std:.4f}), grad norm {out.grad_norm:.4g} (median "
                f"{statistics.median(self.norms):.4g})")

    def rollback(self, trainer) -> bool:
        """Reload the last checkpoint into ``trainer`` and skip the data up to the end of the current step; False
        (nothing done) when there is no checkpoint to go back to."""
        trainer.writer.wait()
        path = ckpt.resolve(self.checkpoint_dir, "auto") if self.checkpoint_dir else None
        if path is None or hasattr(trainer.train_data, "micro_batches"):
            log.error("rollback impossible (%s): stopping", "raw-text streams cannot skip a window" if path else
                      "no checkpoint yet")
            return False
        bad_step, bad_end = trainer.step, trainer.consumed_samples
        skip = self.data_skip + bad_end  # the position after the bad step, less the restored consumed samples
        trainer.batches.close()
        trainer._restore(str(path))
        self.data_skip = skip - trainer.consumed_samples
        self.counts["rollbacks"] += 1
        self.losses.clear()
        self.norms.clear()
        trainer.metrics.resume_at(trainer.step)
        trainer.batches = trainer._step_batches()
        log.warning("rolled back from step %d to %s (step %d); skipping samples %d to %d of the data (now %d "
                    "samples ahead of the schedule)", bad_step, path.name, trainer.step,
                    trainer.consumed_samples + skip - bad_end, skip, self.data_skip)
        return True

    def resume(self, meta: dict) -> None:
        self.data_skip = int(meta.get("data_skip", 0))

    def metrics(self) -> dict[str, int]:
        return {f"spikes/{k}": v for k, v in self.counts.items()}


def validate(t) -> list[tuple[bool, str]]:
    """``(ok, message)`` checks of the ``train.spike_*`` keys, for :meth:`TrainConfig.validate`."""
    return [(t.spike_action in ACTIONS, f"train.spike_action must be one of {'|'.join(ACTIONS)}, "
                                        f"got {t.spike_action!r}"),
            (t.spike_window >= 2, f"train.spike_window must be >= 2, got {t.spike_window}"),
            (t.spike_zscore >= 0 and math.isfinite(t.spike_zscore),
             f"train.spike_zscore must be >= 0 (0 = off), got {t.spike_zscore}"),
            (t.spike_grad_factor == 0 or t.spike_grad_factor > 1,
             f"train.spike_grad_factor must be > 1 (0 = off), got {t.spike_grad_factor}"),
            (t.spike_max_rollbacks >= 1, f"train.spike_max_rollbacks must be >= 1, got {t.spike_max_rollbacks}")]
