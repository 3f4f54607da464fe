"""Context parallelism across checkpoints and evaluation, on real gloo processes.

One 4-rank launch trains Llama-style GPT under CP2 x DP2 with ZeRO-1 for 5 steps and saves (as the trainer
does, via :mod:`tests.test_reshard`'s helpers), then resumes that checkpoint under CP4 and under TP2 x DP2
without context parallelism, and evaluates under CP4. The test process resumes it in one process. Every
resumed run must reproduce the never-stopped single-process losses (relative 1e-5), and the evaluation the
single-process evaluation of the same weights.
"""

from __future__ import annotations

import pytest
import torch

from pretrain import reshard
from tests.dist_utils import run_distributed
from tests.test_reshard import (HALF, LOSS_RTOL, STEPS, local_engine, make_config, micro_batches, rel, resume, save,
                                 train)

pytestmark = pytest.mark.dist

SOURCE = ("cp2 dp2 zero1", {"cp": 2, "zero": 1})
TARGETS = {"cp2 dp2 zero1 -> cp4": {"cp": 4}, "cp2 dp2 zero1 -> tp2 dp2": {"tp": 2}}


def worker(args: dict) -> dict:
    import torch.distributed as dist

    from pretrain.engines import build_engine

    name, parallel = SOURCE
    cfg = make_config("llama", parallel)
    engine = build_engine(cfg, parallel=True)
    train(engine, range(HALF))
    save(engine, cfg, f"{args['root']}/{name}", HALF, dist.get_rank(), dist.get_world_size(), dist.barrier)
    del engine
    out = {}
    for target, parallel in TARGETS.items():
        engine = build_engine(make_config("llama", parallel), parallel=True)
        out[target] = resume(engine, f"{args['root']}/{name}")
        if parallel.get("cp"):  # evaluation of the trained weights under context parallelism
            result = engine.eval_step(micro_batches(0, engine.dp_rank, engine.dp_size))
            out["eval"] = [result.lm_loss_sum, result.num_tokens]
        del engine
    return out


def test_resume_under_other_context_parallel_sizes_and_eval(tmp_path):
    torch.set_num_threads(1)
    _, engine = local_engine("llama")
    never_stopped = train(engine, range(STEPS))
    result = engine.eval_step(micro_batches(0, 0, 1))
    got = run_distributed("tests.test_context_parallel_resume:worker", 4, {"root": str(tmp_path)}, timeout=600)[0]
    diffs = {target: rel(got[target], never_stopped[HALF:]) for target in TARGETS}
    _, engine = local_engine("llama")
    diffs["cp2 dp2 zero1 -> 1 process"] = rel(resume(engine, tmp_path / SOURCE[0]), never_stopped[HALF:])
    diffs["eval under cp4"] = rel(got["eval"], [result.lm_loss_sum, result.num_tokens])
    print(diffs)
    assert all(d <= LOSS_RTOL for d in diffs.values()), diffs
    assert reshard.consolidate(tmp_path / SOURCE[0]).step == HALF
