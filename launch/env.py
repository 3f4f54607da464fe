"""Where am I running? Slurm (one srun task per rank), torchrun, or a plain single process.

The trainer calls :func:`detect` (no flags needed) and :func:`init_distributed`. Detection reads only
environment variables, so it is cheap and works before torch is imported:

* torchrun (also torchrun started by ``srun`` on each node) sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``;
* ``srun`` without torchrun sets ``SLURM_PROCID``/``SLURM_STEP_NUM_TASKS``/``SLURM_LOCALID`` inside a step
  (the batch script itself has ``SLURM_PROCID`` too but no step id, so it counts as a single process);
* anything else is one process.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import sys
from dataclasses import dataclass
from typing import Mapping

DEFAULT_TIMEOUT_S = 600.0  # collective timeout; PRETRAIN_DIST_TIMEOUT overrides it


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job."""

    launcher: str  # "single" | "torchrun" | "slurm"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    node_name: str  # the Slurm node name when under Slurm (hostnames may be shared or opaque)
    job_id: str | None  # SLURM_JOB_ID
    restart_count: int  # SLURM_RESTART_COUNT: how often Slurm requeued this job

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        job = f" job {self.job_id} restart {self.restart_count}" if self.job_id else ""
        return (f"rank {self.rank}/{self.world_size} (local {self.local_rank}/{self.local_world_size}) on "
                f"{self.node_name} via {self.launcher}, master {self.master_addr}:{self.master_port}{job}")


def first_host(nodelist: str) -> str:
    """First host of a Slurm hostlist: ``gpu[003-005,9],login1`` -> ``gpu003`` (what ``scontrol show
    hostnames | head -1`` prints, without a subprocess)."""
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[-,]", m.group(1))[0], first)


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    value = env.get(key, "")
    try:
        return int(value) if value != "" else default
    except ValueError:
        raise ValueError(f"environment variable {key}={value!r} is not an integer") from None


def detect(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read the launcher's environment variables (``os.environ`` by default)."""
    env = os.environ if environ is None else environ
    job_id = env.get("SLURM_JOB_ID")
    node = env.get("SLURMD_NODENAME") or socket.gethostname()
    common = dict(node_name=node, job_id=job_id, restart_count=_int(env, "SLURM_RESTART_COUNT", 0))
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE", 1)
        return DistEnv("torchrun", _int(env, "RANK", 0), world, _int(env, "LOCAL_RANK", 0),
                       _int(env, "LOCAL_WORLD_SIZE", world), env.get("MASTER_ADDR", "127.0.0.1"),
                       _int(env, "MASTER_PORT", 29500), **common)
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        world = _int(env, "SLURM_STEP_NUM_TASKS", _int(env, "SLURM_NTASKS", 1))
        nodes = _int(env, "SLURM_STEP_NUM_NODES", _int(env, "SLURM_NNODES", 1))
        master = env.get("MASTER_ADDR") or first_host(env.get("SLURM_STEP_NODELIST")
                                                      or env.get("SLURM_JOB_NODELIST", node))
        # a port every task derives alike; the job script exports MASTER_PORT the same way
        port = _int(env, "MASTER_PORT", 20000 + _int(env, "SLURM_JOB_ID", 0) % 20000)
        return DistEnv("slurm", _int(env, "SLURM_PROCID", 0), world, _int(env, "SLURM_LOCALID", 0),
                       max(world // max(nodes, 1), 1), master, port, **common)
    return DistEnv("single", 0, 1, 0, 1, "127.0.0.1", _int(env, "MASTER_PORT", 29500), **common)


def export(denv: DistEnv) -> None:
    """Set ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*`` so ``env://`` init and libraries that read
    them (DeepSpeed, megatron-core) agree with :func:`detect`."""
    os.environ.update(RANK=str(denv.rank), WORLD_SIZE=str(denv.world_size), LOCAL_RANK=str(denv.local_rank),
                      LOCAL_WORLD_SIZE=str(denv.local_world_size), MASTER_ADDR=denv.master_addr,
                      MASTER_PORT=str(denv.master_port))


def collective_timeout_s(timeout_s: float | None = None) -> float:
    if timeout_s is not None:
        return float(timeout_s)
    return float(os.environ.get("PRETRAIN_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))


def init_distributed(device: str = "auto", timeout_s: float | None = None) -> DistEnv:
    """Detect the launcher and, when there is more than one rank, join the process group.

    ``device`` is ``train.device`` (auto | cpu | cuda): the backend follows it (:mod:`pretrain.devices`: gloo
    for CPU training even on a GPU host, ``cpu:gloo,cuda:nccl`` for GPU training, this rank's GPU being
    ``LOCAL_RANK % visible GPUs``). ``timeout_s`` bounds every collective (default ``PRETRAIN_DIST_TIMEOUT`` or
    600 s): a dead peer becomes an error naming the operation instead of an endless wait. Single processes get
    no process group.
    """
    import torch.distributed as dist

    from pretrain.devices import backend_for, resolve

    denv = detect()
    if not denv.is_distributed or dist.is_initialized():
        return denv
    export(denv)
    where = resolve(device)
    backend = backend_for(where)
    kwargs = {"device_id": where} if where.type == "cuda" else {}
    timeout = datetime.timedelta(seconds=collective_timeout_s(timeout_s))
    dist.init_process_group(backend, init_method="env://", rank=denv.rank, world_size=denv.world_size,
                            timeout=timeout, **kwargs)
    if denv.rank == 0:
        print(f"[launch] {denv.describe()}, backend {backend}, collective timeout {timeout.total_seconds():g} s",
              file=sys.stderr, flush=True)
    return denv
