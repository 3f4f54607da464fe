"""Requests per second: our scoring engine vs lm-evaluation-harness's ``hf`` backend, same model and requests.

Both score the identical (context, continuation) pairs / documents built from our task YAMLs, tokenisation
included, at the same batch size; the table also shows the largest log-likelihood difference between them.
Rates are per CPU-second of this process (``time.process_time``), which stays meaningful on a shared machine;
run single-threaded (the default) for the comparison to be fair.

    python benchmarks/bench_eval.py                       # random-init Llama (d=256, 4 layers, vocab 8k)
    python benchmarks/bench_eval.py --smollm2 --limit 100 # the real SmolLM2-135M (converted once, ~40 s)
    python benchmarks/bench_eval.py --hf HF_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from pretrain.evals.engine import Scorer  # noqa: E402
from pretrain.evals.local_data import ensure_local_eval_data  # noqa: E402
from pretrain.evals.model import HFModel  # noqa: E402
from pretrain.evals.random_model import random_hf_llama  # noqa: E402
from pretrain.evals.tasks import load_task  # noqa: E402


def random_llama(out: Path, data_dir: Path) -> Path:
    """A random-init Llama with a byte-level BPE 8k tokenizer trained on the KJV tasks' text."""
    texts = [json.loads(line)["text"] for line in open(data_dir / "kjv_chapters.jsonl")]
    texts += [" ".join([r["ctx"], *r["endings"]]) for r in map(json.loads, open(data_dir / "kjv_cont.jsonl"))]
    return random_hf_llama(out, texts, vocab_size=8192, hidden_size=256, intermediate_size=688, num_layers=4,
                           num_heads=8, num_kv_heads=4, max_positions=512)


def task_requests(name: str, limit: int) -> tuple[str, list]:
    """(request type, arguments) exactly as the harness would build them at 0 shots."""
    task = load_task(name, limit=limit)
    delim = task.cfg.get("target_delimiter", " ")
    if task.output_type == "multiple_choice":
        return "loglikelihood", [(task.context(i, 0), delim + c) for i, d in enumerate(task.docs)
                                 for c in task.choices(d)]
    if task.output_type == "loglikelihood":
        return "loglikelihood", [(task.context(i, 0), task.target(d)) for i, d in enumerate(task.docs)]
    return "loglikelihood_rolling", [(task.target(d),) for d in task.docs]


def time_ours(model: HFModel, kind: str, args: list, batch_size: int) -> tuple[float, list[float]]:
    engine = Scorer(model, batch_size=batch_size, progress=False)
    start = time.process_time()
    if kind == "loglikelihood":
        lls = [ll for ll, _ in engine.loglikelihood(args)]
    else:
        lls = [ll for ll, _ in engine.loglikelihood_rolling([a[0] for a in args])]
    return time.process_time() - start, lls


def time_lm_eval(lm, kind: str, args: list) -> tuple[float, list[float]]:
    from lm_eval.api.instance import Instance

    reqs = [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]
    start = time.process_time()
    out = getattr(lm, kind)(reqs, disable_tqdm=True)
    lls = [o[0] if isinstance(o, tuple) else o for o in out]
    return time.process_time() - start, lls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--hf", help="HF causal-LM directory (default: a random-init Llama built here)")
    src.add_argument("--smollm2", action="store_true", help="the real SmolLM2-135M, converted once into the cache")
    p.add_argument("--tasks", default="kjv_cont,mmlu_dev,kjv_lastword,kjv_ppl")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    data_dir = ensure_local_eval_data()
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        if args.smollm2:
            from pretrain.hf.smollm2 import ensure_smollm2

            path = ensure_smollm2()
        else:
            path = Path(args.hf) if args.hf else random_llama(Path(tmp), data_dir)
        ours = HFModel.from_pretrained(path, max_length=args.max_length)
    from lm_eval.models.huggingface import HFLM

    theirs = HFLM(pretrained=ours.model, tokenizer=ours.tokenizer, batch_size=args.batch_size,
                  max_length=args.max_length, device="cpu")
    n_params = sum(p.numel() for p in ours.model.parameters()) / 1e6
    print(f"model {path} ({n_params:.1f} M params), batch size {args.batch_size}, context {args.max_length}, "
          f"{torch.get_num_threads()} thread(s), limit {args.limit} items per task\n")
    rows = []
    for name in args.tasks.split(","):
        kind, reqs = task_requests(name, args.limit)
        time_ours(ours, kind, reqs[:8], args.batch_size)  # warm-up both
        time_lm_eval(theirs, kind, reqs[:8])
        t_ours, ll_ours = time_ours(ours, kind, reqs, args.batch_size)
        t_lm, ll_lm = time_lm_eval(theirs, kind, reqs)
        t_ours = min(t_ours, time_ours(ours, kind, reqs, args.batch_size)[0])  # best of two, interleaved
        t_lm = min(t_lm, time_lm_eval(theirs, kind, reqs)[0])
        diff = max(abs(a - b) for a, b in zip(ll_ours, ll_lm))
        rows.append((name, kind, len(reqs), len(reqs) / t_ours, len(reqs) / t_lm, t_lm / t_ours, diff))
    print("| task | request type | requests | ours req/CPU-s | lm-eval hf req/CPU-s | speed-up | max abs dLL |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, kind, n, ro, rl, sp, d in rows:
        print(f"| {name} | {kind} | {n} | {ro:.1f} | {rl:.1f} | {sp:.2f}x | {d:.1e} |")


if __name__ == "__main__":
    main()
