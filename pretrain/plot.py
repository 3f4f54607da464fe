"""``pretrain plot RUN_DIR [--out PNG]``: loss, validation loss, LR and throughput curves of a run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pretrain.metrics import read_metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run's logging.dir (holds metrics.jsonl)")
    parser.add_argument("--out", default=None, help="PNG to write (default: RUN_DIR/curves.png)")


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the curves of ``run_dir/metrics.jsonl``; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    if not train:
        raise ValueError(f"{Path(run_dir) / 'metrics.jsonl'} has no training records yet")
    steps = [r["step"] for r in train]
    fig, (ax_loss, ax_lr, ax_tp) = plt.subplots(3, 1, sharex=True, figsize=(8, 9))
    ax_loss.plot(steps, [r["loss"] for r in train], label="train")
    if val:
        ax_loss.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_loss.set_title(str(run_dir))
    ax_lr.plot(steps, [r["lr"] for r in train], color="tab:green")
    ax_lr.set_ylabel("learning rate")
    ax_tp.plot(steps, [r["tokens_per_s"] for r in train], color="tab:red")
    ax_tp.set_ylabel("tokens/s")
    ax_tp.set_xlabel("step")
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def run(args: argparse.Namespace) -> int:
    try:
        out = plot_run(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"pretrain plot: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
