"""Device, backend and matmul precision choices, in simulated environments (no GPU needed): a rank's GPU is
``LOCAL_RANK % visible devices``, the process-group backend follows ``train.device``, fp32 runs on CUDA use TF32
unless ``train.tf32=false``. The single-process engine reads the device once per step."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from pretrain.config import from_dict
from tests.host_syncs import HostSyncCounter


class FakeCuda:
    """``torch.cuda`` as seen by a process with ``count`` visible GPUs; records ``set_device``."""

    def __init__(self, monkeypatch, count: int):
        self.selected: list[int] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: self.selected.append(torch.device(d, 0).index
                                                                                     if isinstance(d, str) else
                                                                                     getattr(d, "index", d)))


def tiny_config(**train) -> object:
    return from_dict({"model": {"family": "gpt", "vocab_size": 64, "hidden_size": 16, "num_layers": 1,
                                "num_heads": 2, "max_seq_len": 8},
                      "data": {"seq_length": 8},
                      "train": {"global_batch_size": 4, "micro_batch_size": 2, "seed": 3, **train}})


@pytest.mark.parametrize("local_rank, visible, expected", [(0, 8, 0), (3, 8, 3), (3, 1, 0), (5, 2, 1)])
def test_a_rank_uses_local_rank_modulo_visible_gpus(monkeypatch, local_rank, visible, expected):
    """One GPU per Slurm task (CUDA_VISIBLE_DEVICES set per task): every rank uses its only device 0."""
    from pretrain.devices import pick_device

    fake = FakeCuda(monkeypatch, visible)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda p: None)
    assert pick_device(tiny_config(device="cuda")) == torch.device("cuda", expected)
    assert fake.selected == [expected]


@pytest.fixture
def captured_init(monkeypatch):
    """Runs ``init_distributed`` of a 2-rank torchrun environment up to ``init_process_group``, which records
    its arguments instead of connecting (nothing is communicated)."""
    calls: list[tuple] = []
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    return calls


def test_cpu_training_never_uses_nccl_even_with_gpus_visible(monkeypatch, captured_init):
    from pretrain.launch.env import init_distributed

    FakeCuda(monkeypatch, 8)
    init_distributed("cpu")
    assert captured_init[0][0] == "gloo" and "device_id" not in captured_init[0][1]


def test_gpu_training_gets_nccl_for_cuda_and_gloo_for_cpu_tensors(monkeypatch, captured_init):
    from pretrain.launch.env import init_distributed

    fake = FakeCuda(monkeypatch, 1)
    init_distributed("cuda")
    assert captured_init[0][0] == "cpu:gloo,cuda:nccl"
    assert captured_init[0][1]["device_id"] == torch.device("cuda", 0) and fake.selected == [0]


@pytest.mark.parametrize("precision, tf32, expected", [("fp32", True, "high"), ("fp32", False, "highest"),
                                                       ("bf16", True, "highest")])
def test_fp32_on_cuda_uses_tf32_unless_opted_out(monkeypatch, precision, tf32, expected):
    from pretrain.devices import pick_device

    FakeCuda(monkeypatch, 1)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", torch.backends.cudnn.allow_tf32)  # restored after
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        pick_device(tiny_config(device="cuda", precision=precision, tf32=tf32))
        assert torch.get_float32_matmul_precision() == expected
        if precision == "fp32":
            assert torch.backends.cudnn.allow_tf32 == tf32
    finally:
        torch.set_float32_matmul_precision(before)


def test_cpu_runs_leave_matmul_precision_alone(monkeypatch):
    from pretrain.devices import pick_device

    FakeCuda(monkeypatch, 1)
    assert pick_device(tiny_config(device="cpu")) == torch.device("cpu")
    assert torch.get_float32_matmul_precision() == "highest"


def test_local_engine_reads_the_device_once_per_step(monkeypatch):
    """Token counts, losses and the grad norm reach the host in one ``tolist``; nothing else syncs."""
    from pretrain.engines import build_engine

    torch.manual_seed(0)
    engine = build_engine(tiny_config(device="cpu"))
    tolist, calls = torch.Tensor.tolist, []
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self, *a, **k: calls.append(1) or tolist(self, *a, **k))
    for step in range(2):
        ids = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(step))
        mbs = [{"input_ids": ids[i:i + 2, :-1], "labels": ids[i:i + 2, 1:], "loss_mask": torch.ones(2, 8)}
               for i in (0, 2)]
        calls.clear()
        with HostSyncCounter() as counter:
            engine.train_step(mbs, 1e-3)
        assert counter.ops.count("_local_scalar_dense") + len(calls) == 1, (counter.ops, len(calls))
