"""``pretrain eval``: zero/few-shot evaluation of a checkpoint or HF model; prints and writes the results table.

    pretrain eval --hf HF_DIR --tasks kjv_cont,kjv_ppl --num-fewshot 0,5 --limit 100 --output results.json
    pretrain eval --checkpoint runs/tiny/checkpoints --tasks kjv_cont --output results.json

Under ``torchrun`` every rank scores its share of the requests (gloo on CPU, nccl on GPU); rank 0 writes.
``--tp``/``--pp`` split a checkpoint's model over ranks instead of loading it whole on each
(:mod:`pretrain.evals.parallel_model`); the world size must be a multiple of tp x pp. Encoder (masked LM)
checkpoints take the tasks of :mod:`pretrain.evals.mlm` (masked-token accuracy, pseudo-log-likelihood).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from pretrain.console import setup_logging
from pretrain.devices import backend_for, cuda_device
from pretrain.evals.harness import evaluate_tasks
from pretrain.evals.metrics import markdown_table, write_results
from pretrain.evals.loading import load_model
from pretrain.evals import mlm


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="our checkpoint: a step directory or a checkpoint root (uses latest)")
    src.add_argument("--hf", help="a Hugging Face model directory (causal LM, or T5 / Switch encoder-decoder)")
    p.add_argument("--tokenizer", help="tokenizer for --checkpoint (default: the training config's data.tokenizer)")
    p.add_argument("--tasks", required=True, help="comma-separated task names or YAML paths")
    p.add_argument("--include", action="append", default=[], help="extra directory of task YAMLs (repeatable)")
    p.add_argument("--num-fewshot", default="0", help="few-shot counts, e.g. 0 or 0,1,5")
    p.add_argument("--limit", type=int, help="evaluate only the first N items of each task")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, help="context length (default: from the model config)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size for --checkpoint (under torchrun)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size for --checkpoint (GPT, under torchrun)")
    p.add_argument("--output", required=True, help="results JSON path (the markdown table goes next to it)")
    p.add_argument("--log-samples", action="store_true", help="also store per-item scores in the JSON")


def run(args: argparse.Namespace) -> int:
    setup_logging(fmt="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    shots = [int(k) for k in args.num_fewshot.split(",")]
    if any(k < 0 for k in shots):
        raise SystemExit(f"--num-fewshot: counts must be >= 0, got {args.num_fewshot}")
    if args.checkpoint and mlm.is_encoder_checkpoint(args.checkpoint):
        return mlm.run(args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if min(args.tp, args.pp) < 1 or world % (args.tp * args.pp):
        raise SystemExit(f"--tp {args.tp} x --pp {args.pp} must divide the number of processes ({world})")
    if args.tp * args.pp > 1 and not args.checkpoint:
        raise SystemExit("--tp/--pp split our checkpoints; use them with --checkpoint")
    distributed = world > 1
    if args.device == "cuda":  # this rank's GPU: LOCAL_RANK % visible GPUs (an explicit cuda:N is kept)
        args.device = str(cuda_device())
    if distributed and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend_for(args.device))
    group = None
    if args.tp * args.pp > 1:
        from pretrain.evals.parallel_model import load_sharded_model

        model, group = load_sharded_model(args.checkpoint, args.tp, args.pp, args.tokenizer, args.device,
                                          args.max_length)
    else:
        model = load_model(args.checkpoint, args.hf, args.tokenizer, args.device, args.max_length)
    rank = torch.distributed.get_rank() if distributed else 0
    results = evaluate_tasks(model, [t for t in args.tasks.split(",") if t], shots, args.limit, args.batch_size,
                             args.include, progress=rank == 0, log_samples=args.log_samples, group=group)
    results["model"] = args.checkpoint or args.hf
    if rank == 0:
        print(markdown_table(results))
        md = write_results(results, args.output)
        print(f"wrote {args.output} and {md}")
        if results["truncated"]:
            print(f"warning: {results['truncated']} requests were longer than the context and truncated from the left")
    if distributed:
        torch.distributed.destroy_process_group()
    return 0
