"""``pretrain plot RUN_DIR [--out PNG]``: loss, validation loss, LR and throughput curves of a run; for an MoE
run also ``expert_load.png``, a heatmap per MoE layer of each expert's load (selections / mean) over the steps
(the ``moe/<layer>/load`` telemetry of :mod:`pretrain.moe_balance`)."""

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


def expert_load_matrix(records: list[dict]) -> tuple[list[int], dict[str, list[list[float]]]]:
    """(logged steps, per MoE layer one row per step of each expert's load divided by the mean load)."""
    rows = [r for r in records if any(k.startswith("moe/") and k.endswith("/load") for k in r)]
    layers: dict[str, list[list[float]]] = {}
    for r in rows:
        for key, load in r.items():
            if key.startswith("moe/") and key.endswith("/load"):
                mean = max(sum(load) / len(load), 1e-9)
                layers.setdefault(key[len("moe/"):-len("/load")], []).append([v / mean for v in load])
    return [r["step"] for r in rows], layers


def plot_expert_load(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """Draw the expert-load heatmaps of ``run_dir`` (None when the run logged no expert load)."""
    steps, layers = expert_load_matrix(read_metrics(run_dir))
    if not layers:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(layers), 1, figsize=(8, 2.5 * len(layers) + 1), squeeze=False)
    for ax, (name, matrix) in zip(axes[:, 0], layers.items()):
        image = ax.imshow(list(map(list, zip(*matrix))), aspect="auto", cmap="viridis", interpolation="nearest",
                          extent=(steps[0] - 0.5, steps[-1] + 0.5, len(matrix[0]) - 0.5, -0.5))
        ax.set_ylabel(f"{name}\nexpert")
        fig.colorbar(image, ax=ax, label="load / mean")
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "expert_load.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def run(args: argparse.Namespace) -> int:
    try:
        out = plot_run(args.run_dir, args.out)
        heatmap = plot_expert_load(args.run_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"pretrain plot: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}" + (f" and {heatmap}" if heatmap else ""))
    return 0
