"""T5 under context parallelism across checkpoints and evaluation, on real gloo processes.

One 2-rank launch trains T5 (the parity test's tiny model and batches: 16 encoder tokens with padding, 8 decoder
tokens) under CP2 with ZeRO-1 for 5 steps, saves as the trainer does (:mod:`tests.test_reshard`'s helpers) and
evaluates under CP2, then resumes that checkpoint under TP2 without context parallelism and under CP2 on the
ring (evaluating first). The test process resumes it in one process. Every resumed run must reproduce the
never-stopped single-process losses (relative 1e-5), and each evaluation the single-process evaluation of the
same weights. Training parity of T5 under CP
(CP2, CP4, with TP+SP, ZeRO-1/3, PP, EP, a sparse encoder pattern) is in tests/test_parallel_parity.py.
"""

from __future__ import annotations

import pytest
import torch

from pretrain import reshard
from tests.dist_utils import run_distributed
from tests.test_parallel_parity import make_config, micro_batches, train
from tests.test_reshard import GLOBAL_BATCH, HALF, LOSS_RTOL, STEPS, rel, save

pytestmark = pytest.mark.dist

SOURCE = {"cp": 2, "zero": 1}
TARGETS = {"cp2 zero1 -> tp2": {"tp": 2}, "cp2 zero1 -> cp2 ring": {"cp": 2, "cp_comm": "ring"}}


def load(engine, path):
    full = reshard.consolidate(path)
    reshard.load_into(engine, full)
    assert full.consumed_samples // GLOBAL_BATCH == full.step == HALF
    return engine


def resume(engine, path) -> list[float]:
    return train(load(engine, path), "t5", range(HALF, STEPS))["loss"]


def evaluate(engine) -> list[float]:
    result = engine.eval_step(micro_batches(0, "t5", engine.dp_rank, engine.dp_size))
    return [result.lm_loss_sum, result.num_tokens]


def worker(args: dict) -> dict:
    import torch.distributed as dist

    from pretrain.engines import build_engine

    cfg = make_config("t5", SOURCE)
    engine = build_engine(cfg, parallel=True)
    train(engine, "t5", range(HALF))
    save(engine, cfg, args["root"], HALF, dist.get_rank(), dist.get_world_size(), dist.barrier)
    out = {"eval under cp2": evaluate(engine)}
    del engine
    for target, parallel in TARGETS.items():
        engine = load(build_engine(make_config("t5", parallel), parallel=True), args["root"])
        if parallel.get("cp_comm") == "ring":
            out["eval under cp2 ring"] = evaluate(engine)
        out[target] = train(engine, "t5", range(HALF, STEPS))["loss"]
        del engine
    return out


def test_t5_resumes_from_context_parallel_checkpoints_and_evaluates_under_cp(tmp_path):
    from pretrain.engines import build_engine

    torch.set_num_threads(1)
    engine = build_engine(make_config("t5", {}))
    first = train(engine, "t5", range(HALF))["loss"]
    evaluation = evaluate(engine)
    never_stopped = first + train(engine, "t5", range(HALF, STEPS))["loss"]
    got = run_distributed("tests.test_context_parallel_t5:worker", 2, {"root": str(tmp_path)}, timeout=600)[0]
    resumed = resume(build_engine(make_config("t5", {})), tmp_path)
    diffs = {target: rel(got[target], never_stopped[HALF:]) for target in TARGETS}
    diffs["cp2 zero1 -> 1 process"] = rel(resumed, never_stopped[HALF:])
    diffs |= {key: rel(got[key], evaluation) for key in ("eval under cp2", "eval under cp2 ring")}
    print(diffs)
    assert all(d <= LOSS_RTOL for d in diffs.values()), diffs
