"""Helpers shared by the GPU benchmark (``gpu_train.py``) and the GPU check's probes (``gpu_probes.py``):
device timing, synthetic samples in the dataset format, the tiny numerics config, host-sync counting."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch

from pretrain.config import Config, load_config
from pretrain.data.loader import collate
from pretrain.metrics import gpu_peak_flops

ROOT = Path(__file__).resolve().parents[1]


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a device named like ``torch.cuda.get_device_name`` (the trainer's table); None when
    unknown (or CPU)."""
    return gpu_peak_flops(device_name) / 1e12 or None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, device: torch.device, repeats: int = 10, trials: int = 3) -> float:
    """Seconds per call of ``fn``: the best mean over ``trials`` rounds of ``repeats`` calls, after a warm-up."""
    fn()
    best = float("inf")
    for _ in range(trials):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync(device)
        best = min(best, (time.perf_counter() - t0) / repeats)
    return best


def matmul_tflops(device: torch.device, n: int, dtype: torch.dtype) -> float:
    """Rate of back-to-back ``n x n`` matmuls: the practically reachable peak."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 / best_time(lambda: a @ b, device, trials=5) / 1e12


# --- data -------------------------------------------------------------------------------------------------
def synthetic_samples(n: int, seq: int, vocab: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Learnable GPT samples in the dataset format (docs/design.md): ``start + i * stride`` mod vocab."""
    rng = np.random.default_rng(seed)
    tokens = (rng.integers(0, vocab, (n, 1)) + np.arange(seq + 1) * rng.integers(1, 8, (n, 1))) % vocab
    return [{"input_ids": t[:-1], "labels": t[1:], "loss_mask": np.ones(seq, np.float32),
             "position_ids": np.arange(seq), "document_ids": np.zeros(seq, np.int64)} for t in tokens]


def step_batches(pool: list[dict], step: int, micro: int, accum: int) -> list[dict]:
    """This step's micro-batches, collated like the trainer does (cycling through ``pool``)."""
    start = step * micro * accum
    return [collate([pool[(start + m * micro + i) % len(pool)] for i in range(micro)]) for m in range(accum)]


def tiny_config(args, precision: str, zero: int = 0) -> Config:
    """The numerics checks' model: small enough to train for dozens of steps in seconds."""
    return load_config(ROOT / "configs/gpt_tiny.yaml", [
        f"train.precision={precision}", f"train.device={args.device}", "train.seed=0", "train.micro_batch_size=4",
        "train.global_batch_size=8", "checkpoint.dir=null", "optimizer.lr=3e-3", "optimizer.eps=1e-5",
        "model.vocab_size=256", "model.max_seq_len=64", "data.seq_length=64", f"parallel.zero={zero}"])


def count_host_syncs(device: torch.device, fn) -> int | None:
    """Synchronising CUDA calls made by ``fn()`` (torch's sync debug mode); None on CPU."""
    if device.type != "cuda":
        fn()
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)
