"""Context parallelism: step time and peak memory per rank of a small GPT at long sequences, CP=1, 2, 4.

    python benchmarks/bench_context.py                       # seq 4096 and 8192, CP 1/2/4, on the CPU (gloo)
    python benchmarks/bench_context.py --seq 4096 16384 65536 --hidden 256 --layers 4

Reference: CP=1 is one process training the same model on whole sequences (the local engine, dense SDPA
attention); CP=N starts N gloo processes, each training on its load-balanced 1/N of every sequence
(``parallel.cp=N``, with ``parallel.cp_comm`` all_gather and ring). Per configuration: the median time of the
training steps after one warm-up step (the slowest rank), the peak resident memory a step adds on a rank
(``ru_maxrss`` after the steps minus the resident set before them, the largest over ranks) and both relative
to CP=1. A configuration that fails (out of memory, time limit) is reported as such. On a CPU the ranks share
the cores, so the times show the communication and masking overhead rather than a speed-up; the memory column
is the point. Load average is printed, since the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MiB = 2**20


def config(args: argparse.Namespace, seq: int, cp: int, comm: str):
    from pretrain.config import from_dict

    return from_dict({
        "model": {"family": "gpt", "flavour": "llama", "vocab_size": 512, "hidden_size": args.hidden,
                  "num_layers": args.layers, "num_heads": args.heads, "num_kv_heads": args.heads // 2,
                  "max_seq_len": seq, "attention_backend": "sdpa"},
        "data": {"seq_length": seq},
        "train": {"steps": args.steps, "global_batch_size": 1, "micro_batch_size": 1, "device": "cpu"},
        "parallel": {"cp": cp, "cp_comm": comm} if cp > 1 else {}})


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB


def worker(args: argparse.Namespace) -> None:
    """One rank: build the engine, time the steps, write ``{"times": [...], "peak_mib": ...}``."""
    from pretrain.engines import build_engine

    torch.set_num_threads(1)
    cfg = config(args, args.run_seq, args.run_cp, args.run_comm)
    engine = build_engine(cfg)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 512, (1, args.run_seq + 1), generator=g)
    batch = [{"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(1, args.run_seq)}]
    before = rss_mib()
    times = []
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        engine.train_step(batch, 1e-4)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before  # ru_maxrss is in KiB on Linux
    Path(args.out, f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps({"times": times[1:],
                                                                                     "peak_mib": peak}))


def run(args: argparse.Namespace, seq: int, cp: int, comm: str) -> dict | str:
    """Start ``cp`` ranks for one configuration; the slowest rank's median step and the largest peak."""
    from pretrain.launch.local import free_port

    with tempfile.TemporaryDirectory(prefix="bench_cp_") as out:
        env = {**os.environ, "WORLD_SIZE": str(cp), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
               "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        cmd = [sys.executable, __file__, "--worker", "--out", out, "--run-seq", str(seq), "--run-cp", str(cp),
               "--run-comm", comm, "--hidden", str(args.hidden), "--layers", str(args.layers),
               "--heads", str(args.heads), "--steps", str(args.steps)]
        procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for r in range(cp)]
        try:
            codes = [p.wait(timeout=args.timeout) for p in procs]
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            return f"over {args.timeout} s"
        if any(codes):
            err = next(p.stderr.read().decode(errors="replace") for p, c in zip(procs, codes) if c)
            return "failed: " + (err.strip().splitlines() or ["?"])[-1][:60]
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(cp)]
    return {"step_s": max(statistics.median(r["times"]) for r in ranks), "peak_mib": max(r["peak_mib"] for r in ranks)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--run-seq", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--run-cp", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--run-comm", help=argparse.SUPPRESS)
    ap.add_argument("--comm", nargs="+", default=["all_gather", "ring"], help="parallel.cp_comm values to run")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    print(f"GPT (Llama style) hidden {args.hidden}, {args.layers} layers, {args.heads} heads (GQA 2:1), batch 1, "
          f"fp32, CPU; load average {os.getloadavg()[0]:.1f}")
    print(f"{'seq':>7} {'cp':>3} {'cp_comm':>10} {'step s':>8} {'vs cp=1':>8} {'peak MiB/rank':>14} {'vs cp=1':>8}")
    for seq in args.seq:
        base = None
        for cp, comm in [(cp, comm) for cp in args.cp for comm in (["-"] if cp == 1 else args.comm)]:
            r = run(args, seq, cp, comm)
            if isinstance(r, str):
                print(f"{seq:>7} {cp:>3} {comm:>10} {r}")
                continue
            base = base or (r if cp == 1 else None)
            rel = (lambda k: f"{r[k] / base[k]:.2f}x") if base else (lambda k: "-")
            print(f"{seq:>7} {cp:>3} {comm:>10} {r['step_s']:>8.2f} {rel('step_s'):>8} {r['peak_mib']:>14.0f} "
                  f"{rel('peak_mib'):>8}")


if __name__ == "__main__":
    main()
