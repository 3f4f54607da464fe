"""Checkpoint saves at scale: ZeRO optimizer state saved natively per rank (no collective per parameter, moments
stored once), portable moments derived when consolidating; pruning after the last barrier; checkpoint barriers
on their own long-timeout group; RNG restore with fewer GPUs visible than at save time."""

from __future__ import annotations

import pytest
import torch

from pretrain import checkpoint as ckpt
from pretrain import reshard
from tests.dist_utils import run_distributed
from tests.test_reshard import make_config, save, train

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
               "all_gather_object", "reduce", "gather", "scatter")


def _count_collectives(monkeypatch_targets) -> list[str]:
    """Wrap (not replace) the collectives of ``torch.distributed`` and ``deepspeed.comm``: each call is
    recorded, then runs for real."""
    calls: list[str] = []
    for module in monkeypatch_targets:
        for name in COLLECTIVES:
            real = getattr(module, name, None)
            if real is not None:
                def wrapped(*a, _real=real, _name=name, **kw):
                    calls.append(_name)
                    return _real(*a, **kw)
                setattr(module, name, wrapped)
    return calls


def zero_save_worker(args: dict) -> dict:
    import deepspeed.comm
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_optimizer_state

    from pretrain.engines import build_engine

    torch.manual_seed(3)
    out = {}
    for zero in (2, 3):
        cfg = make_config("gpt2", {"zero": zero})
        engine = build_engine(cfg, parallel=True)
        train(engine, range(3))
        reshard._link_moments(engine.ds.optimizer)  # DeepSpeed's per-parameter views, for the reference
        ref = {n: {k: safe_get_full_optimizer_state(p, k).detach().clone().reshape(getattr(p, "ds_shape", p.shape))
                   for k in reshard.MOMENTS} for n, p in engine.model.named_parameters()}
        originals = {m: {n: getattr(m, n) for n in COLLECTIVES if hasattr(m, n)} for m in (dist, deepspeed.comm)}
        calls = _count_collectives([dist, deepspeed.comm])
        portable = reshard.optimizer_moments(engine)
        for module, fns in originals.items():
            for name, fn in fns.items():
                setattr(module, name, fn)
        save(engine, cfg, f"{args['root']}/zero{zero}", 3, dist.get_rank(), dist.get_world_size(), dist.barrier)
        out[zero] = {"collectives": len(calls), "portable_bytes": ckpt.nbytes(portable), "moments": ref}
        del engine
    return out


@pytest.mark.dist
def test_zero_save_is_local_and_consolidation_derives_the_moments(tmp_path):
    """Before: ``optimizer_moments`` ran 2 collectives per parameter (112 counted for ZeRO-2 on this 2-layer GPT)
    and stored full fp32 moments next to the native partitions. Now: no collective, no extra tensor, and
    ``consolidate`` derives the same full moments from each rank's native partitions."""
    result = run_distributed("tests.test_checkpoint_zero:zero_save_worker", 2, {"root": str(tmp_path)},
                             timeout=600)[0]
    for zero in (2, 3):
        got = result[zero]
        assert got["collectives"] == 0 and got["portable_bytes"] == 0, (zero, got["collectives"])
        full = reshard.consolidate(tmp_path / f"zero{zero}")
        assert full.optimizer_step == 3
        assert sorted(full.moments) == sorted(got["moments"])
        for name, ref in got["moments"].items():
            for k in reshard.MOMENTS:
                torch.testing.assert_close(full.moments[name][k], ref[k], rtol=0, atol=0, msg=f"{zero} {name} {k}")


def test_prune_runs_after_the_last_barrier(tmp_path):
    """The other ranks wait in the barriers; deleting old checkpoints must not happen while they do."""
    seen = []

    def barrier():
        seen.append(sorted(p.name for p in tmp_path.glob("step_*")))

    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, {"w": torch.zeros(2)}, {}, {"consumed_samples": step}, keep_last=1,
                             barrier=barrier)
    assert seen[-1] == ["step_00000001", "step_00000002"]  # the last barrier: step 1 not yet deleted
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002"]  # deleted after it


def test_rng_state_restores_with_fewer_gpus_visible(monkeypatch):
    """Saved with 8 GPUs visible, resumed with one GPU per task: the visible device gets a state, none fails."""
    torch.manual_seed(0)
    state = ckpt.rng_state()
    state["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    restored = {}

    def set_rng_state(new_state, device="cuda"):
        index = torch.device(device).index if not isinstance(device, int) else device
        index = 0 if index is None else index
        if index >= 1:
            raise RuntimeError(f"CUDA error: invalid device ordinal {index}")
        restored[index] = int(new_state[0])

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)
    ckpt.set_rng_state(state)
    assert restored == {0: 0}


def slow_barrier_worker(args: dict) -> dict:
    import time

    import torch.distributed as dist

    from pretrain.parallel.mesh import SlowBarrier

    rank, out = dist.get_rank(), {}
    for name, timeout in (("short", 1.0), ("default", None)):
        barrier = SlowBarrier(timeout)
        if rank == 1:
            time.sleep(3.0)  # rank 0 publishing a checkpoint, say
        try:
            barrier()
            out[name] = "passed"
        except RuntimeError as e:
            out[name] = str(e)
        dist.barrier()
    return out


@pytest.mark.dist
def test_checkpoint_barrier_has_its_own_long_timeout():
    """The trainer's checkpoint barrier is a gloo group of its own: with the default (1 h) it outwaits a slow rank;
    with a short timeout its error names the rank that did not arrive (``monitored_barrier``)."""
    out = run_distributed("tests.test_checkpoint_zero:slow_barrier_worker", 2, timeout=300)[0]
    assert out["default"] == "passed"
    assert "1" in out["short"] and "monitoredBarrier" in out["short"], out["short"]
