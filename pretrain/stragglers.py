"""Straggler attribution: which rank is slow, and in which part of the step (``train.straggler_interval``).

Each rank times the sections of its training loop, in this order: ``data`` (waiting for the step's micro-batches),
``forward`` (from the model's forward pre-hook to its forward hook), ``backward`` (from there to the next forward
or the optimizer: backward and the gradient communication that overlaps it), ``optimizer`` (torch's global
optimizer-step hooks: the update, and under ZeRO its partition communication), ``step`` (the rest of the engine's
step: loss reductions) and ``other`` (logging, evaluation, checkpoint saves: the rest of the loop). Engines whose
modules the root hooks do not see (pipeline stages) keep forward and backward inside ``step``.

Every ``interval`` steps the per-rank totals are gathered (one ``all_gather_object`` on every rank at the same
step). For each section the slowest rank's total is compared with the median of the other ranks' totals; the
first section in the order above where it exceeds ``train.straggler_factor`` times that median (and by at least
:data:`MIN_GAP_S`, so that millisecond noise is not named) names the straggler: a rank slow in one section makes
the others wait in a *later* one (their gradient all-reduce, say), so the earliest slow section is the cause.
Rank 0 logs the rank and section and writes a metrics row: ``straggler/rank``, ``straggler/section``,
``straggler/ratio``, ``straggler/seconds`` (the slow rank's total) and ``straggler/median_seconds``.

``PRETRAIN_SLOW_RANK=R:S[:SECTION]`` (tests and drills only): rank R sleeps S seconds each time it enters
SECTION (default ``data``).
"""

from __future__ import annotations

import logging
import os
import statistics
import time

import torch
import torch.distributed as dist

log = logging.getLogger("pretrain.train")

MIN_GAP_S = 0.05
SECTIONS = ("data", "forward", "backward", "optimizer", "step", "other")
IN_STEP = ("step", "forward", "backward", "optimizer")  # the model and optimizer hooks act only inside the step


def slowest(per_rank: list[dict[str, float]], factor: float) -> dict | None:
    """The straggler ``{"rank", "section", "ratio", "seconds", "median_seconds"}`` of the first section (in
    :data:`SECTIONS` order) where the slowest rank exceeds the median of the others by ``factor`` (and
    :data:`MIN_GAP_S`), or None."""
    for section in SECTIONS:
        times = [r.get(section, 0.0) for r in per_rank]
        rank = max(range(len(times)), key=times.__getitem__)
        others = statistics.median(times[:rank] + times[rank + 1:])
        ratio = times[rank] / max(others, 1e-9)
        if times[rank] - others >= MIN_GAP_S and ratio > factor:
            return {"rank": rank, "section": section, "ratio": ratio, "seconds": times[rank],
                    "median_seconds": others}
    return None


class SectionTimer:
    """Per-section wall time of this rank's loop; :meth:`report` gathers and names the straggler."""

    def __init__(self, interval: int, factor: float, rank: int, world_size: int) -> None:
        self.interval, self.factor = interval if world_size > 1 else 0, factor
        self.rank = rank
        self.totals = dict.fromkeys(SECTIONS, 0.0)
        self.current, self.since = "other", time.perf_counter()
        slow = (os.environ.get("PRETRAIN_SLOW_RANK", "") + "::data").split(":")
        self.sleep = float(slow[1]) if slow[0] and int(slow[0]) == rank else 0.0
        self.slow_section = slow[2] or "data"
        self._hooks: list = []

    def attach(self, model: torch.nn.Module) -> None:
        """Time ``forward``, ``backward`` and ``optimizer`` inside the step through module and optimizer hooks
        (removed by :meth:`close`)."""
        if not self.interval:
            return
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        def within(section):
            return lambda *args: self.mark(section) if self.current in IN_STEP else None

        self._hooks = [model.register_forward_pre_hook(within("forward")),
                       model.register_forward_hook(within("backward")),
                       register_optimizer_step_pre_hook(within("optimizer")),
                       register_optimizer_step_post_hook(within("step"))]

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def mark(self, section: str) -> None:
        """End the running section and start ``section``."""
        if not self.interval:
            return
        now = time.perf_counter()
        self.totals[self.current] += now - self.since
        self.current, self.since = section, now
        if section == self.slow_section and self.sleep:
            time.sleep(self.sleep)

    def report(self, step: int, metrics) -> dict | None:
        """Every ``interval`` steps (collective: call it at the same point on every rank): gather the totals,
        name the straggler (log and ``metrics`` row, rank 0), start over."""
        if not self.interval or step % self.interval:
            return None
        per_rank: list = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, self.totals)
        self.totals = dict.fromkeys(SECTIONS, 0.0)
        worst = slowest(per_rank, self.factor)
        if worst is not None and self.rank == 0:
            log.warning("step %d: straggler: rank %d spent %.2f s in '%s' over the last %d steps, %.1fx the median "
                        "of the other ranks (%.2f s)", step, worst["rank"], worst["seconds"], worst["section"],
                        self.interval, worst["ratio"], worst["median_seconds"])
            metrics.write({"step": step, **{f"straggler/{k}": v for k, v in worst.items()}})
        return worst
