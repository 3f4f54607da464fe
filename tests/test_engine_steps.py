"""What every engine does in one step, on real gloo processes: host syncs, compute dtype, pipeline forwards,
gradient all-reduce overlapped with backward, and a hermetic (GPU-free) test environment.

Host syncs are counted with a ``TorchDispatchMode`` on ``aten._local_scalar_dense`` (behind ``.item()``,
``float()``, ``int()``, ``bool()`` of a tensor) plus a wrapper around ``Tensor.tolist`` (which bypasses the
dispatcher): on a GPU each is a device -> host wait. Layouts run on 2 ranks: plain data parallelism
(``LocalEngine``), tensor parallel (DeepSpeed engine), pipeline (1F1B) and expert parallel.
"""

from __future__ import annotations

import gc
import math
import os

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.host_syncs import HostSyncCounter
from tests.test_parallel_parity import make_config, micro_batches

pytestmark = pytest.mark.dist

LR = 1e-2
LAYOUTS = {"dp2": ("gpt2", {}), "tp2": ("gpt2", {"tp": 2}), "pp2": ("gpt2", {"pp": 2}),
           "ep2": ("switch", {"ep": 2})}
MATMULS = {"mm", "addmm", "bmm", "baddbmm"}
BF16_LOSS_RTOL = 5e-3  # bf16 autocast (LocalEngine, pipeline, EP) or bf16 weights (DeepSpeed: 8.5e-4), 3 steps


class OpCounter(HostSyncCounter):
    """Host syncs (``ops``) plus the input dtypes and shapes of every matmul."""

    def __init__(self):
        super().__init__()
        self.matmuls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in MATMULS:
            self.matmuls.append([(a.dtype, tuple(a.shape)) for a in args if isinstance(a, torch.Tensor)])
        return super().__torch_dispatch__(func, types, args, kwargs)


def counted_step(engine, step: int, model: str, counter: OpCounter):
    """One ``train_step`` under ``counter``; returns (result, tolist calls)."""
    calls, tolist = [], torch.Tensor.tolist

    def counting(self, *a, **k):
        calls.append(1)
        return tolist(self, *a, **k)

    torch.Tensor.tolist = counting
    try:
        with counter:
            out = engine.train_step(micro_batches(step, model, engine.dp_rank, engine.dp_size), LR)
    finally:
        torch.Tensor.tolist = tolist
    return out, len(calls)


def count_forwards(engine) -> list[int]:
    """Forward calls of this rank's pipeline stages (or of the whole model), one list entry per call."""
    calls = []
    for m in getattr(engine, "stages", None) or [engine.model]:
        m.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def steps_worker(args: dict) -> dict:
    from pretrain.engines import build_engine

    out = {"cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES")}
    for name, (model, parallel) in LAYOUTS.items():
        cfg = make_config(model, parallel)
        cfg.train.precision = args["precision"]
        engine = build_engine(cfg)
        forwards = count_forwards(engine)
        losses, syncs, tolists, matmuls, calls = [], [], [], [], []
        for step in range(3):
            counter, before = OpCounter(), len(forwards)
            result, n_tolist = counted_step(engine, step, model, counter)
            losses.append(result.loss)
            syncs.append(counter.ops.count("_local_scalar_dense"))
            tolists.append(n_tolist)
            matmuls += counter.matmuls
            calls.append(len(forwards) - before)
        evals = [engine.eval_step(micro_batches(0, model, engine.dp_rank, engine.dp_size)) for _ in range(2)]
        engine.train_step(micro_batches(3, model, engine.dp_rank, engine.dp_size), LR)  # eval -> train -> eval
        evals.append(engine.eval_step(micro_batches(0, model, engine.dp_rank, engine.dp_size)))
        out[name] = {"loss": losses, "syncs": syncs, "tolist": tolists, "forwards": calls,
                     "eval": [e.lm_loss_sum / e.num_tokens for e in evals],
                     "fp32_matmuls": [m for m in matmuls if any(d == torch.float32 for d, _ in m)
                                      and not any(4 in s for _, s in m)],  # 4 = num_experts: fp32 router
                     "matmuls": len(matmuls)}
        del engine
        gc.collect()
    return out


@pytest.fixture(scope="module")
def fp32_runs():
    return run_distributed("tests.test_engine_steps:steps_worker", 2, {"precision": "fp32"}, timeout=600)


def test_one_host_sync_per_step_in_every_engine(fp32_runs):
    """Step 0 may pay one-off setup (a pipeline's first handshake); every later step reads the device once."""
    for rank, out in enumerate(fp32_runs):
        for name in LAYOUTS:
            r = out[name]
            per_step = [s + t for s, t in zip(r["syncs"][1:], r["tolist"][1:])]
            print(f"rank {rank} {name}: _local_scalar_dense per step {r['syncs']}, tolist {r['tolist']}")
            assert all(n <= 1 for n in per_step), (rank, name, r["syncs"], r["tolist"])


def test_pipeline_runs_one_forward_per_micro_batch(fp32_runs):
    """Stages and schedule are built once: after the first step, no shape-inference forward. Each rank holds
    one stage of the 2-layer GPT and gets 4 micro-batches per step, so its stage runs exactly 4 forwards."""
    for out in fp32_runs:
        assert out["pp2"]["forwards"][1:] == [4, 4], out["pp2"]["forwards"]


def test_eval_steps_reuse_the_built_schedules(fp32_runs):
    """Evaluation between training steps (cached train and eval schedules): the same number twice, another one
    after an update."""
    for out in fp32_runs:
        for name in LAYOUTS:
            first, again, after = out[name]["eval"]
            assert first == again and after != first, (name, out[name]["eval"])


def test_cpu_tests_hide_gpus(fp32_runs):
    assert all(out["cuda_visible"] == "" for out in fp32_runs)


def _reference_losses(model: str, precision: str) -> list[float]:
    from pretrain.engines import build_engine

    torch.manual_seed(0)
    cfg = make_config(model, {})
    cfg.train.precision = precision
    engine = build_engine(cfg)
    return [engine.train_step(micro_batches(step, model, 0, 1), LR).loss for step in range(3)]


def test_every_engine_computes_in_bf16():
    """Under ``train.precision=bf16`` every layout's matmuls take bf16 inputs (the Switch router stays fp32 by
    design) and its losses agree with the single-process bf16 run within BF16_LOSS_RTOL."""
    torch.set_num_threads(1)
    refs = {m: _reference_losses(m, "bf16") for m in {"gpt2", "switch"}}
    runs = run_distributed("tests.test_engine_steps:steps_worker", 2, {"precision": "bf16"}, timeout=600)
    for rank, out in enumerate(runs):
        for name, (model, _) in LAYOUTS.items():
            r = out[name]
            assert r["matmuls"] > 0 and not r["fp32_matmuls"], (rank, name, r["fp32_matmuls"][:3])
            diffs = [abs(a - b) / abs(b) for a, b in zip(r["loss"], refs[model])]
            print(f"rank {rank} {name}: bf16 loss rel diff {max(diffs):.1e}, fp32 matmuls {len(r['fp32_matmuls'])}")
            assert all(math.isfinite(d) and d <= BF16_LOSS_RTOL for d in diffs), (name, r["loss"], refs[model])


def overlap_worker(args: dict) -> dict:
    """Order of gradient all-reduces and the embedding's gradient (the last one backward produces) in a
    2-micro-batch step of a 4-layer GPT wide enough for several DDP buckets."""
    import torch.distributed as dist

    from pretrain.config import from_dict
    from pretrain.engines import build_engine

    cfg = make_config("gpt2_deep", {}).to_dict()
    cfg["model"].update(hidden_size=256, ffn_hidden_size=1024)
    engine = build_engine(from_dict(cfg))
    events, all_reduce = [], dist.all_reduce

    def logged(*a, **k):
        events.append("all_reduce")
        return all_reduce(*a, **k)

    engine.model.tok_emb.weight.register_post_accumulate_grad_hook(lambda p: events.append("embedding grad"))
    dist.all_reduce = logged
    try:
        for step in range(2):
            events.clear()
            engine.train_step(micro_batches(step, "gpt2_deep", engine.dp_rank, engine.dp_size), LR)
    finally:
        dist.all_reduce = all_reduce
    return {"events": events}


def test_data_parallel_gradients_are_reduced_during_backward():
    """Plain data parallelism: some gradient buckets are all-reduced while the last micro-batch's backward still
    runs (before the embedding, the first layer, gets its gradient), not all after it."""
    events = run_distributed("tests.test_engine_steps:overlap_worker", 2, timeout=300)[0]["events"]
    grads = [i for i, e in enumerate(events) if e == "embedding grad"]
    assert len(grads) == 2, events  # one per micro-batch
    assert "all_reduce" in events[grads[0] + 1:grads[1]], events


def trainer_worker(args: dict) -> dict:
    """Host syncs of a 2-rank training run (no validation, no checkpoints) from the first step's start to the
    end: every ``_local_scalar_dense``, and the ``tolist`` calls inside ``train_step`` (outside it, ``tolist``
    only reads CPU data: the loader's token lists)."""
    from pretrain.config import load_config
    from pretrain.train import build_datasets
    from pretrain.trainer import EXIT_OK, Trainer

    torch.set_num_threads(1)
    cfg = load_config(args["config"], [])
    trainer = Trainer(cfg, *build_datasets(cfg))
    counter, tolist, train_step = HostSyncCounter(), torch.Tensor.tolist, trainer.engine.train_step
    calls, starts, inside = [], [], []

    def counting(self, *a, **k):
        calls.extend([1] if inside else [])
        return tolist(self, *a, **k)

    def step(*a, **k):
        starts.append(counter.ops.count("_local_scalar_dense") + len(calls))
        inside.append(1)
        try:
            return train_step(*a, **k)
        finally:
            inside.clear()

    trainer.engine.train_step, torch.Tensor.tolist = step, counting
    try:
        with counter:
            code = trainer.fit()
    finally:
        torch.Tensor.tolist = tolist
    assert code == EXIT_OK
    return {"steps": trainer.step, "syncs": counter.ops.count("_local_scalar_dense") + len(calls) - starts[0]}


def test_training_loop_reads_the_device_once_per_step(tmp_path, tiny_shard_prefix, tiny_tokenizer):
    """The whole loop, stop-request agreement included: one device read per optimizer step on every rank."""
    from pretrain.config import save_config
    from tests.test_trainer import make_cfg

    overrides = ["train.steps=3", "train.global_batch_size=8", "train.micro_batch_size=2", "train.device=cpu",
                 "checkpoint.dir=null", f"logging.dir={tmp_path / 'logs'}", "train.prefetch=false"]
    cfg = make_cfg("gpt_tiny.yaml", tmp_path, tiny_shard_prefix, tiny_tokenizer, *overrides)
    save_config(cfg, tmp_path / "config.yaml")
    for out in run_distributed("tests.test_engine_steps:trainer_worker", 2, {"config": str(tmp_path / "config.yaml")},
                               timeout=300):
        print(out)
        assert out["steps"] == 3 and out["syncs"] <= 3, out
