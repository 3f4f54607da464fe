"""Training stall per checkpoint save: synchronous (the reference, ``checkpoint.async_save=false``) vs asynchronous.

Two gloo processes on the CPU train a GPT under DP2 DeepSpeed ZeRO-1 and under TP2; every ``--interval`` steps
the real ``Trainer.save`` runs (state gathered at the step boundary, files, fsync, checksums, barrier, rename,
``latest``, pruning). The stall is how long ``save`` keeps the training loop from its next step, per save, on
rank 0 (median over the saves). "step s" is the mean training step time without saves (sync run, between
saves) and while a background write runs alongside (on few cores the write competes with training for them).

    python benchmarks/bench_async_save.py                         # hidden 512, 8 layers (~40M params), 3 saves
    python benchmarks/bench_async_save.py --hidden 256 --layers 4 --saves 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

LAYOUTS = {"DP2 ZeRO-1": {"zero": 1}, "TP2": {"tp": 2}}


def config(args, parallel: dict, root: str, mode: str):
    from pretrain.config import from_dict

    model = {"family": "gpt", "flavour": "gpt2", "vocab_size": args.vocab, "hidden_size": args.hidden,
             "num_layers": args.layers, "num_heads": 8, "max_seq_len": args.seq}
    return from_dict({"model": model, "data": {"seq_length": args.seq},
                      "train": {"steps": 10**6, "global_batch_size": 4, "micro_batch_size": 2, "device": "cpu"},
                      "checkpoint": {"dir": f"{root}/{mode}", "keep_last": 2, "async_save": mode == "async"},
                      "logging": {"tensorboard": False}, "parallel": parallel})


def batches(engine, seq: int, vocab: int, step: int) -> list[dict]:
    g = torch.Generator().manual_seed(step * 100 + engine.dp_rank)
    tokens = torch.randint(0, vocab, (2, seq + 1), generator=g)
    return [{"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, seq)}]


def rank_main(args) -> None:
    """One rank: for each layout and mode, train and save every ``interval`` steps; rank 0 prints JSON."""
    import torch.distributed as dist

    from pretrain.trainer import Trainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = {}
    for name, parallel in LAYOUTS.items():
        for mode in ("sync", "async"):
            cfg = config(args, parallel, args.root, mode)
            trainer = Trainer(cfg, train_data=None)
            stalls, step_times = [], []
            for step in range(1, args.saves * args.interval + 1):
                start = time.perf_counter()
                writing = trainer.writer.busy()
                trainer.engine.train_step(batches(trainer.engine, args.seq, args.vocab, step), 1e-4)
                trainer.step = step
                trainer.consumed_samples = step * cfg.train.global_batch_size
                if step > 1 and (writing or mode == "sync"):  # sync: every step but the first (warm-up)
                    step_times.append(time.perf_counter() - start)
                if step % args.interval == 0:
                    start = time.perf_counter()
                    trainer.save(background=True)
                    stalls.append(time.perf_counter() - start)
            trainer.writer.wait()
            state_bytes = sum(f.stat().st_size for f in Path(cfg.checkpoint.dir).glob("step_*/*_rank00000.*"))
            results[f"{name}/{mode}"] = {"stalls": stalls, "step_times": step_times,
                                         "rank0_mb": state_bytes / 2**20 / min(args.saves, 2)}
            del trainer
            dist.barrier()
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(results), flush=True)
    dist.destroy_process_group()


def launch(args) -> dict:
    from pretrain.launch.local import free_port

    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "CUDA_VISIBLE_DEVICES": ""}
        procs.append(subprocess.Popen([sys.executable, __file__, "--rank-main", *sys.argv[1:]], env=env,
                                      stdout=subprocess.PIPE, text=True))
    outputs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        sys.exit(f"a rank failed: exit codes {[p.returncode for p in procs]}")
    line = next(line for line in outputs[0].splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--interval", type=int, default=4, help="training steps between saves")
    parser.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_main:
        rank_main(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench_async_save_") as root:
        sys.argv += ["--root", root]
        results = launch(args)
    params = args.vocab * args.hidden + args.layers * 12 * args.hidden**2
    print(f"GPT hidden {args.hidden}, {args.layers} layers, vocab {args.vocab} (~{params / 1e6:.0f}M params), "
          f"{args.saves} saves every {args.interval} steps, 2 gloo ranks on the CPU; load average "
          f"{os.getloadavg()[0]:.2f}")
    print(f"{'layout':<12} {'rank-0 MB/save':>14} {'sync stall s':>13} {'async stall s':>14} {'async/sync':>10} "
          f"{'step s (no write)':>17} {'step s (bg write)':>17}")
    for name in LAYOUTS:
        sync, asyn = results[f"{name}/sync"], results[f"{name}/async"]
        s, a = statistics.median(sync["stalls"]), statistics.median(asyn["stalls"])
        quiet, busy = (statistics.mean(r["step_times"] or [float("nan")]) for r in (sync, asyn))
        print(f"{name:<12} {sync['rank0_mb']:>14.1f} {s:>13.3f} {a:>14.3f} {a / s:>10.1%} {quiet:>17.3f} "
              f"{busy:>17.3f}")


if __name__ == "__main__":
    main()
