"""Planned exits before a time limit, without signals: ``train.exit_at_step`` and ``train.exit_after_minutes``.

When one is due the trainer stops like on a stop request: it saves a checkpoint (synchronously) and exits 75
(:data:`pretrain.launch.preemption.PREEMPTED_EXIT_CODE`), so ``--resume auto`` continues exactly and the Slurm job
script requeues the job. ``exit_at_step`` is the same on every rank and stops them all at that step (once: a run resumed
at or past it, e.g. the requeued job whose command still sets it, trains on).
``exit_after_minutes`` counts wall-clock minutes from the start of the process (imports, data and model building
included: they count against a job's time limit too); each rank reads its own clock, so the stop travels as a
stop request with the next step's numbers (every rank stops at the same step, one step later; a single process
stops at once). Rank 0 then creates ``$PRETRAIN_STOP_FILE`` when it is set: the job script
(:mod:`pretrain.launch.slurm`) requeues a job whose ranks stopped with that file present.

:func:`slurm_minutes` reads a Slurm ``--time`` value, for ``pretrain launch slurm --exit-before-time``.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

import psutil

log = logging.getLogger("pretrain.train")

_SLURM_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def slurm_minutes(limit: str) -> float:
    """Minutes in a Slurm time limit: ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``."""
    match = _SLURM_TIME.match(limit.strip())
    if not match:
        raise ValueError(f"--time {limit!r} is not a Slurm time (M, M:S, H:M:S, D-H, D-H:M or D-H:M:S)")
    days, *parts = (int(g) if g is not None else None for g in match.groups())
    if days is not None:  # D-H[:M[:S]]
        return days * 1440 + parts[0] * 60 + (parts[1] or 0) + (parts[2] or 0) / 60
    if parts[2] is not None:  # H:M:S
        return parts[0] * 60 + parts[1] + parts[2] / 60
    return parts[0] + (parts[1] or 0) / 60  # M or M:S


class PlannedExit:
    """Tells the training loop, after each step, whether a planned exit is due."""

    def __init__(self, exit_at_step: int | None, exit_after_minutes: float | None, rank: int) -> None:
        self.exit_at_step, self.exit_after_minutes = exit_at_step, exit_after_minutes
        self.rank = rank
        self.started = psutil.Process(os.getpid()).create_time()  # wall clock, seconds since the epoch

    def due(self, step: int, stop) -> bool:
        """True when this rank stops after ``step`` on its own (``exit_at_step``). When the time is up, asks
        ``stop`` (the trainer's :class:`~pretrain.trainer.StopFlag`) to stop, which every rank then agrees on."""
        if step == self.exit_at_step:  # not >=: the requeued run, resumed at that step, goes on
            self._mark(stop, f"train.exit_at_step={self.exit_at_step}")
            return True
        minutes = (time.time() - self.started) / 60
        if self.exit_after_minutes is not None and minutes >= self.exit_after_minutes and not stop.requested:
            self._mark(stop, f"train.exit_after_minutes={self.exit_after_minutes:g} ({minutes:.2f} min since "
                             f"the process started)")
        return False

    def _mark(self, stop, reason: str) -> None:
        stop.request(reason)
        stop_file = os.environ.get("PRETRAIN_STOP_FILE")
        if self.rank == 0 and stop_file:
            Path(stop_file).touch()  # the job script requeues a job that stopped with it present
