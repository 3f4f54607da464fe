"""Devices and process groups: which GPU a rank uses, which backend carries its collectives, how matmuls run.

The one place for these rules (the launcher, every engine and ``pretrain eval`` call it):

* a rank's GPU is ``LOCAL_RANK % visible GPUs``: the same rule whether a node's 8 GPUs are all visible
  (torchrun) or Slurm gives each task its own GPU (every rank then sees one device, index 0);
* the backend follows the training device, not what the host has: ``gloo`` for CPU training (also on a GPU
  host), ``cpu:gloo,cuda:nccl`` for GPU training (NCCL for device tensors, gloo for the few CPU ones);
* fp32 training on CUDA uses TF32 tensor-core matmuls (10-bit mantissa inputs, fp32 accumulation) unless
  ``train.tf32=false`` (exact fp32, what parity checks use); ``train.precision=bf16`` runs the forward under
  bf16 autocast (:func:`autocast`) in every engine.
"""

from __future__ import annotations

import contextlib
import os
from typing import Mapping

import torch
import torch.distributed as dist

from pretrain.config import Config


def local_device_index(environ: Mapping[str, str] | None = None, visible: int | None = None) -> int:
    """``LOCAL_RANK % visible GPUs`` (``LOCAL_RANK`` from ``environ``, default ``os.environ``; 0 if unset)."""
    env = os.environ if environ is None else environ
    visible = torch.cuda.device_count() if visible is None else visible
    if visible < 1:
        raise RuntimeError("a CUDA device was requested but none is visible (check CUDA_VISIBLE_DEVICES)")
    return int(env.get("LOCAL_RANK") or 0) % visible


def cuda_device(environ: Mapping[str, str] | None = None) -> torch.device:
    """This rank's GPU (:func:`local_device_index`), made the current device."""
    device = torch.device("cuda", local_device_index(environ))
    torch.cuda.set_device(device.index)
    return device


def resolve(want: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` (or ``cuda:N``, taken as this rank's GPU) -> this rank's device."""
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    return cuda_device() if want.startswith("cuda") else torch.device("cpu")


def backend_for(device: torch.device | str) -> str:
    """The process-group backend for collectives of tensors on ``device``'s type (and CPU tensors)."""
    return "cpu:gloo,cuda:nccl" if torch.device(device).type == "cuda" else "gloo"


def set_matmul_precision(cfg: Config, device: torch.device) -> None:
    """TF32 for fp32 matmuls and convolutions on CUDA unless ``train.tf32`` is false; CPU runs are untouched."""
    if device.type != "cuda" or cfg.train.precision != "fp32":
        return
    torch.set_float32_matmul_precision("high" if cfg.train.tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = cfg.train.tf32


def pick_device(cfg: Config) -> torch.device:
    """This rank's device for ``train.device``, with the matmul precision set for it."""
    device = resolve(cfg.train.device)
    set_matmul_precision(cfg, device)
    return device


def join_process_group(device: torch.device) -> None:
    """Join the process group described by torchrun's environment (a 1-process group when run plainly)."""
    if dist.is_initialized():
        return
    for key, default in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500"), ("RANK", "0"),
                         ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):  # DeepSpeed asserts LOCAL_RANK is set
        os.environ.setdefault(key, default)
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend_for(device), **kwargs)


def autocast(cfg: Config, device: torch.device):
    """bf16 autocast for ``train.precision=bf16`` (forward passes only), else a no-op context."""
    if cfg.train.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
