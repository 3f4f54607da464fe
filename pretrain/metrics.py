"""Where training metrics go (metrics.jsonl + TensorBoard) and the peak FLOP/s that MFU is measured against."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

# Dense bf16 peak per GPU (TFLOP/s, no sparsity) by device-name fragment, for MFU when logging.peak_tflops is not
# set. The first fragment found in the name wins, so variants come before their family ("H100 PCIe" before "H100",
# which is the SXM part: "NVIDIA H100 80GB HBM3"; "H200 NVL" before "H200"). GPUs without bf16 (V100, T4) are
# absent: 0, MFU not reported (their fp16 peak is not the rate a bf16 run gets).
GPU_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H200 NVL": 835.0, "H200": 989.0, "H100": 989.0,
                   "A100": 312.0, "A10G": 125.0, "L4": 121.0}


class MetricsLogger:
    """Appends one JSON record per call to ``DIR/metrics.jsonl`` and mirrors numbers to TensorBoard.

    ``directory=None`` (non-zero ranks, or no logging dir) makes every call a no-op. :meth:`resume_at` drops the
    rows a resumed run is about to write again, so every step has one row.
    """

    def __init__(self, directory: str | Path | None, tensorboard: bool = True):
        self.file = self.writer = None
        if directory is None:
            return
        self.path = Path(directory) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a")
        if tensorboard:
            self.writer = self._tensorboard()

    def _tensorboard(self, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.path.parent / "tensorboard"), purge_step=purge_step)

    def resume_at(self, step: int) -> int:
        """Drop the rows (and TensorBoard events) of steps after ``step``: the run continues from ``step``, so they
        are replayed or superseded. Unreadable lines (a crash mid-write) go too. Returns how many rows went."""
        if self.file is None:
            return 0
        self.file.close()
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if _step_of(line) <= step]
        if len(kept) < len(lines):
            tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)
            if self.writer is not None:
                self.writer.close()
                self.writer = self._tensorboard(purge_step=step + 1)
        self.file = open(self.path, "a")
        return len(lines) - len(kept)

    def write(self, record: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"train/{key}", value, record["step"])
                elif isinstance(value, list):  # per-expert numbers (MoE telemetry): one curve each
                    for i, v in enumerate(value):
                        self.writer.add_scalar(f"train/{key}/{i}", v, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl line (infinite for an unreadable line)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (is {run_dir} a run's logging.dir?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def measure_cpu_flops(n: int = 1024, repeats: int = 5) -> float:
    """Best fp32 matmul rate (FLOP/s) on the current threads: the CPU's practical peak."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def gpu_peak_flops(name: str) -> float:
    """Dense bf16 peak FLOP/s of the GPU called ``name`` (0 when unknown: MFU is then not reported)."""
    return next((v * 1e12 for k, v in GPU_PEAK_TFLOPS.items() if k.lower() in name.lower()), 0.0)


def peak_flops(device: torch.device) -> float:
    """Peak FLOP/s of one device: the GPU table, or the CPU matmul rate.

    The CPU probe (~0.1 s) runs once per process; the best rate seen on this machine and thread count is cached
    and used, so a probe slowed down by other jobs does not inflate MFU later.
    """
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device))
    from pretrain.data.demo_corpus import cache_dir  # $PRETRAIN_CACHE or ~/.cache/pretrain

    cache = cache_dir() / "cpu_peak_flops.json"
    key = f"{platform.node()}|{platform.machine()}|{torch.get_num_threads()}"
    table = json.loads(cache.read_text()) if cache.is_file() else {}
    measured = measure_cpu_flops()
    if measured > table.get(key, 0.0):
        table[key] = measured
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(table))
        tmp.replace(cache)
    return table[key]
