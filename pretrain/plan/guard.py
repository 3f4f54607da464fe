"""The launchers' memory check: before ``pretrain launch local|slurm`` starts a training job, predict the chosen
layout's peak memory per GPU (:func:`pretrain.plan.search.estimate`) and warn when it exceeds the device, or
refuse with ``--strict``. The device is ``--gpu NAME`` (any name ``pretrain plan`` takes) or, for local launches
on a CUDA machine, the visible GPU's name; without either the check is skipped (CPU runs)."""

from __future__ import annotations

from pretrain.config import Config
from pretrain.configlib import ConfigError
from pretrain.plan.hardware import device
from pretrain.plan.memory import COMPONENTS
from pretrain.plan.search import estimate

GiB = 2**30
# substrings of torch.cuda.get_device_name() -> table name (first match wins)
CUDA_NAMES = (("H100 PCIe", "h100-pcie"), ("H100", "h100-sxm"), ("H200", "h200"), ("B200", "b200"),
              ("A100-SXM4-40GB", "a100-40gb"), ("A100-PCIE-40GB", "a100-40gb"), ("A100", "a100-80gb"),
              ("MI300X", "mi300x"))


def visible_gpu() -> str | None:
    """The table name of this machine's first GPU, or None (no GPU, or one the table lacks)."""
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((table for part, table in CUDA_NAMES if part in name), None)


def check_fits(cfg: Config, world_size: int, per_node: int, gpu: str | None, strict: bool) -> str | None:
    """The one-line prediction for ``cfg`` on ``world_size`` GPUs of ``gpu`` (None: :func:`visible_gpu` for
    GPU training, else skip), a warning when the layout does not fit; None when skipped. A layout that does not
    fit raises :class:`ConfigError` instead with ``strict``."""
    if gpu is None and cfg.train.device != "cpu":
        gpu = visible_gpu()
    if gpu is None:
        return None
    dev = device(gpu)
    est = estimate(cfg, world_size, min(per_node, world_size), dev)
    parts = ", ".join(f"{k} {getattr(est.memory, k) / GiB:.1f}" for k in COMPONENTS if getattr(est.memory, k))
    line = (f"planner: predicted peak {est.memory.total / GiB:.1f} GiB per GPU on {dev.name} "
            f"({dev.memory_gb:g} GB): {parts}")
    if est.fits:
        return line
    fix = (f"it would run out of memory; `pretrain plan CONFIG --gpus {world_size} --gpus-per-node {per_node} "
           f"--gpu {gpu}` ranks layouts that fit")
    if strict:
        raise ConfigError(f"{line}; {fix} (or drop --strict to launch anyway)")
    return f"warning: {line}; {fix}"
