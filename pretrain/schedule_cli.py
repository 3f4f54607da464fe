"""``pretrain schedule CONFIG [section.key=value ...] [--out PNG]``: plot the LR and batch size over training."""

from __future__ import annotations

import argparse
import sys

from pretrain.config import ConfigError, load_config
from pretrain.schedule import Schedule


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted overrides")
    parser.add_argument("--out", default="schedule.png", help="PNG to write (default: schedule.png)")


def key_points(schedule: Schedule) -> list[tuple[str, int, int, float, int]]:
    """(label, step, consumed samples, lr, batch size) at the moments that define the schedule."""
    traj = list(schedule.trajectory())
    rows = [("start", *traj[0])]
    end_of_warmup = next((t for t in traj if (t[1] + t[2] if schedule.by_samples else t[0] + 1) >= schedule.warmup),
                         None)
    if schedule.warmup and end_of_warmup:
        rows.append(("end of warmup", *end_of_warmup))
    full = next((t for t in traj if t[2] == schedule.cfg.train.global_batch_size), None)
    if full and full[0] > 0:
        rows.append(("full batch", *full))
    rows += [("middle", *traj[len(traj) // 2]), ("end", *traj[-1])]
    rows.sort(key=lambda row: row[1])
    return [(label, step, consumed, schedule.lr(step, consumed), batch) for label, step, consumed, batch in rows]


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"pretrain schedule: config error: {e}", file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schedule = Schedule(cfg)
    every = max(1, cfg.train.steps // 5000)  # plot at most ~5000 points
    points = [(s, c, schedule.lr(s, c), b) for s, c, b in schedule.trajectory() if s % every == 0]
    steps, _, lrs, batches = zip(*points)
    fig, (ax_lr, ax_bs) = plt.subplots(2, 1, sharex=True, figsize=(8, 6))
    ax_lr.plot(steps, lrs)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_title(f"{args.config}: peak LR {schedule.peak_lr:.3g}, {cfg.schedule.decay} decay")
    ax_bs.plot(steps, batches, color="tab:orange")
    ax_bs.set_ylabel("global batch (samples)")
    ax_bs.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    plt.close(fig)
    print(f"{'point':<14} {'step':>10} {'samples':>14} {'lr':>12} {'batch':>7}")
    for label, step, consumed, lr, batch in key_points(schedule):
        print(f"{label:<14} {step:>10,} {consumed:>14,} {lr:>12.4e} {batch:>7}")
    print(f"total: {cfg.train.steps:,} steps, {schedule.total_samples():,} samples; plot: {args.out}")
    return 0
