"""``pretrain plan CONFIG [overrides] --gpus N [--gpus-per-node G] --gpu NAME [--json]``.

    pretrain plan configs/gpt_7b.yaml --gpus 64 --gpu h100-sxm
    pretrain plan configs/gpt_7b.yaml train.global_batch_size=512 --gpus 16 \
        --gpu custom:memory=80,bf16=400,nvlink=300,network=25

Prints the configured layout's estimate, then the best layouts (fits?, memory by component in GiB, step time,
tokens/s per GPU, MFU) and how many layouts the stack refuses, with their reasons; ``--json`` prints all of it
as one JSON document. docs/planning.md explains every term.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from pretrain.config import load_config
from pretrain.configlib import need
from pretrain.plan.hardware import DEVICES, device
from pretrain.plan.memory import COMPONENTS
from pretrain.plan.search import Estimate, estimate, layout_of, refusal, search

GiB = 2**30


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = __doc__.split("\n\n", 1)[1]
    p.add_argument("config", help="training YAML")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs (ranks)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--gpu", default="h100-sxm", help=f"{' | '.join(DEVICES)} | custom:memory=GB,bf16=TFLOPS,"
                                                     f"nvlink=GB/s,network=GB/s (default h100-sxm)")
    p.add_argument("--efficiency", type=float, help="achieved fraction of the bf16 peak (default: the device's)")
    p.add_argument("--top", type=int, default=10, help="rows of the ranked table (default 10)")
    p.add_argument("--json", action="store_true", help="print everything as JSON")


def _row(e: Estimate) -> dict:
    mem = {k: getattr(e.memory, k) for k in COMPONENTS}
    return {"layout": e.layout, "fits": e.fits, "memory_bytes": {**mem, "total": e.memory.total, "cpu": e.memory.cpu},
            "peak_stage": e.memory.stage, "time_s": {**dataclasses.asdict(e.timing), "step": e.timing.step}}


def _layout_text(layout: dict) -> str:
    flags = "".join(f" {k}" for k, on in (("sp", layout["sp"]), ("offload-opt", layout["offload_optimizer"]),
                                          ("offload-params", layout["offload_params"])) if on)
    return (f"tp{layout['tp']} pp{layout['pp']}" + (f"x{layout['vpp']}" if layout["vpp"] > 1 else "")
            + (f" ep{layout['ep']}" if layout["ep"] > 1 else "") + f" z{layout['zero']} mb{layout['micro_batch']}"
            + f" ckpt={layout['checkpointing']}{flags}")


def _table(rows: list[tuple[str, Estimate]]) -> str:
    heads = ["#", "layout", "fits", *[k[:6] for k in COMPONENTS], "total", "step s", "tok/s/GPU", "MFU"]
    lines = [heads]
    for label, e in rows:
        lines.append([label, _layout_text(e.layout), "yes" if e.fits else "NO",
                      *[f"{getattr(e.memory, k) / GiB:.1f}" for k in COMPONENTS], f"{e.memory.total / GiB:.1f}",
                      f"{e.timing.step:.2f}", f"{e.timing.tokens_per_gpu:,.0f}", f"{e.timing.mfu:.1%}"])
    widths = [max(len(r[c]) for r in lines) for c in range(len(heads))]
    return "\n".join("  ".join(c.rjust(w) if j != 1 else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths)))
                     for r in lines)


def run(args: argparse.Namespace) -> int:
    need(args.gpus >= 1 and args.gpus_per_node >= 1, "--gpus and --gpus-per-node must be >= 1")
    need(args.efficiency is None or 0 < args.efficiency <= 1, "--efficiency must be in (0, 1]")
    gpu = device(args.gpu)
    cfg = load_config(args.config, args.overrides)
    per_node = min(args.gpus_per_node, args.gpus)
    why = refusal(cfg, args.gpus)
    configured = None if why else estimate(cfg, args.gpus, per_node, gpu, args.efficiency)
    ranked, refused = search(cfg, args.gpus, per_node, gpu, args.efficiency)
    if args.json:
        json.dump({"gpu": dataclasses.asdict(gpu), "gpus": args.gpus, "gpus_per_node": per_node,
                   "configured": _row(configured) if configured else {"layout": layout_of(cfg), "refused": why},
                   "layouts": [_row(e) for e in ranked],
                   "refused": [{"layout": layout, "reason": reason} for layout, reason in refused]}, sys.stdout)
        print()
        return 0
    print(f"{gpu.name}: {gpu.memory_gb:g} GB, {gpu.bf16_tflops:g} bf16 TFLOPS at {args.efficiency or gpu.achieved:.0%} "
          f"achieved; {args.gpus} GPUs, {per_node} per node. Memory in GiB per GPU (peak rank).")
    if why:
        print(f"configured layout ({_layout_text(layout_of(cfg))}) is refused: {why}")
    rows = ([("cfg", configured)] if configured else []) + [(str(i + 1), e) for i, e in enumerate(ranked[:args.top])]
    print(_table(rows))
    fits = sum(e.fits for e in ranked)
    print(f"{len(ranked)} valid layouts, {fits} fit in {gpu.memory_gb:g} GB; {len(refused)} refused by the "
          f"pre-flight check")
    reasons: dict[str, int] = {}
    for _, reason in refused:
        reasons[reason] = reasons.get(reason, 0) + 1
    for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:5]:
        print(f"  {n:5d} x {reason}")
    if not fits:
        print("no layout fits: add GPUs, shorten data.seq_length, or lower train.global_batch_size")
    return 0
