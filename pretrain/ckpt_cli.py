"""``pretrain ckpt inspect DIR`` and ``pretrain ckpt consolidate DIR OUT``.

``inspect`` prints step, consumed samples, layout, every tensor (global shape, dtype, split) and file sizes, and
verifies every file against the size and checksum ``meta.json`` records (exit 1 naming a damaged file).
``consolidate`` writes OUT as a one-rank checkpoint root (``OUT/step_N/model_rank00000.safetensors``, the
single-file full model, plus ``meta.json`` and the full Adam moments when saved), which every layout, the HF
exporter and ``checkpoint.init_from`` can read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pretrain.checkpoint import CheckpointError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    inspect = sub.add_parser("inspect", help="print step, layout, tensors, sizes and consumed samples")
    inspect.add_argument("dir", help="checkpoint root (uses `latest`) or step directory")
    cons = sub.add_parser("consolidate", help="write the full model as a one-rank checkpoint")
    cons.add_argument("dir", help="checkpoint root (uses `latest`) or step directory")
    cons.add_argument("out", help="output checkpoint root (must not exist)")
    cons.add_argument("--model-only", action="store_true", help="leave out the optimizer moments")


def _split(spec: dict) -> str:
    parts = []
    if spec.get("tp_dim") is not None:
        parts.append(f"tp dim {spec['tp_dim']}" + (f" stride {spec['tp_stride']}" if spec["tp_stride"] > 1 else ""))
    if spec.get("ep_dim") is not None:
        parts.append(f"ep dim {spec['ep_dim']}")
    return ", ".join(parts) or "replicated"


def inspect(path: str) -> str:
    from pretrain.reshard import read_meta

    step_dir, meta = read_meta(path)
    sharding = meta.get("sharding") or {}
    layout = sharding.get("layout") or {k: v for k, v in ((meta.get("config") or {}).get("parallel") or {}).items()
                                        if k in ("tp", "pp", "ep")}
    par = (meta.get("config") or {}).get("parallel") or {}
    lines = [f"checkpoint        {step_dir}",
             f"step              {meta['step']}",
             f"consumed samples  {meta.get('consumed_samples')}",
             f"world size        {meta.get('world_size')}",
             f"layout            {' '.join(f'{k}={v}' for k, v in layout.items())} zero={par.get('zero', 0)}"]
    tensors = sharding.get("tensors")
    if tensors is None:  # no index: list rank 0's file
        from safetensors import safe_open

        with safe_open(str(step_dir / "model_rank00000.safetensors"), framework="pt") as f:
            tensors = {k: {"shape": list(f.get_slice(k).get_shape()), "dtype": f.get_slice(k).get_dtype()}
                       for k in f.keys()}
        lines.append("(no sharding index: rank 0's tensors)")
    numel = 0
    lines.append(f"{'tensor':<44} {'shape':<18} {'dtype':<9} split")
    for name, spec in tensors.items():
        n = 1
        for d in spec["shape"]:
            n *= d
        numel += n
        lines.append(f"{name:<44} {'x'.join(map(str, spec['shape'])):<18} {spec['dtype']:<9} {_split(spec)}")
    files = sorted(p for p in step_dir.iterdir() if p.is_file())
    size = sum(p.stat().st_size for p in files)
    lines.append(f"{len(tensors)} tensors, {numel:,} elements; {len(files)} files, {size / 2**20:.2f} MiB")
    lines.append(verify(step_dir, meta))
    return "\n".join(lines)


def verify(step_dir: Path, meta: dict) -> str:
    """Check every file ``meta.json`` records (size and checksum); raises CheckpointError naming each damaged one."""
    from pretrain.checkpoint import CHECKSUM, verify_file

    recorded = meta.get("files")
    if not recorded:
        return "files not verified: this checkpoint records no checksums (saved by an older version)"
    problems = []
    for name in recorded:
        try:
            verify_file(step_dir / name, meta)
        except CheckpointError as e:
            problems.append(str(e))
    if problems:
        raise CheckpointError("\n".join(problems))
    return f"{len(recorded)} files verified (size and {CHECKSUM})"


def consolidate_to(path: str, out: str, optimizer: bool = True) -> Path:
    """Write the consolidated checkpoint of ``path`` as the one-rank checkpoint root ``out``."""
    from pretrain import checkpoint as ckpt
    from pretrain.reshard import consolidate

    out_root = Path(out)
    if out_root.exists():
        raise CheckpointError(f"{out_root} exists; choose a new output directory")
    full = consolidate(path, optimizer=optimizer)
    sharding = full.meta.get("sharding") or {}
    tensors = sharding.get("tensors") or {n: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                                              "tp_dim": None, "tp_stride": 1, "ep_dim": None}
                                          for n, t in full.model.items()}
    meta = {k: v for k, v in full.meta.items() if k not in ("format_version", "step", "world_size")}
    meta["sharding"] = {"layout": {"tp": 1, "pp": 1, "dp": 1, "ep": 1},
                        "tensors": {n: {**s, "tp_dim": None, "ep_dim": None} for n, s in tensors.items()},
                        "name_sets": [sorted(full.model)], "rank_names": [0]}
    meta["consolidated_from"] = {"world_size": full.meta.get("world_size"), "layout": sharding.get("layout")}
    state = {}
    if full.moments is not None:
        state["portable"] = {"step": full.optimizer_step, "moments": full.moments}
    return ckpt.save_checkpoint(out_root, full.step, full.model, state, meta, keep_last=1)


def run(args: argparse.Namespace) -> int:
    try:
        if args.action == "inspect":
            print(inspect(args.dir))
        else:
            path = consolidate_to(args.dir, args.out, optimizer=not args.model_only)
            print(f"wrote {path}")
    except (CheckpointError, FileNotFoundError) as e:
        print(f"pretrain ckpt: {e}", file=sys.stderr)
        return 1
    return 0
