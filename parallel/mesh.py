"""The process mesh: data x pipeline x tensor groups (plus expert groups inside data) from world size + layout.

Rank order is Megatron's and DeepSpeed's (tensor fastest, then data, then pipeline)::

    rank = tp_rank + tp * (dp_rank + dp * pp_rank)

so the ``tp`` ranks of one tensor group sit on one node. Expert parallelism splits the data dimension, as in
Megatron and DeepSpeed-MoE: ``dp = ep * expert_dp``; consecutive data ranks form an expert group (they hold
different experts and exchange tokens), and ranks with the same expert index form the expert-data-parallel
group (over which expert gradients are averaged). Context parallelism splits it the same way (Megatron's
tp-cp-dp order): ``dp = cp * replicas``; consecutive data ranks form a context group that shares each sample's
tokens, and gradients are reduced over the whole data group, context ranks included.

Groups are plain ``torch.distributed`` groups, so the same code runs on gloo (CPU) and NCCL (GPU). Each rank
creates only the groups it belongs to (:func:`group_plan`), with ``use_local_synchronization`` (a barrier among
the group's members, not the world), each distinct rank list once (with pp=1 the tensor group is the model
group), and one group of itself for all its size-1 kinds: 3 ``new_group`` calls per rank at 512 ranks with tp=8
instead of 1,168 world-wide barriers. Every rank walks the kinds in the same order, so the local barriers
cannot deadlock (each kind partitions the world).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed import ProcessGroup

SLOW_BARRIER_TIMEOUT_S = 3600.0  # PRETRAIN_BARRIER_TIMEOUT overrides it


@dataclass(frozen=True)
class Layout:
    """Sizes of each dimension; ``dp`` is what is left of the world after tensor and pipeline."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    cp: int = 1  # context parallelism: consecutive data ranks split each sequence (parallel/context.py)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def replicas(self) -> int:
        """Data ranks that read different samples: ``dp / cp`` (``cp`` ranks share each sample's tokens)."""
        return self.dp // self.cp

    @property
    def expert_dp(self) -> int:
        return self.dp // self.ep

    @classmethod
    def from_world(cls, world_size: int, tp: int = 1, pp: int = 1, ep: int = 1, cp: int = 1) -> Layout:
        if world_size % (tp * pp):
            raise ValueError(f"world size {world_size} is not divisible by tp*pp = {tp}*{pp}")
        dp = world_size // (tp * pp)
        if dp % ep:
            raise ValueError(f"expert parallel size {ep} must divide the data-parallel size {dp} "
                             f"(world {world_size} / tp {tp} / pp {pp})")
        if dp % cp:
            raise ValueError(f"context parallel size {cp} must divide the data-parallel size {dp}")
        return cls(tp=tp, pp=pp, dp=dp, ep=ep, cp=cp)

    def coords(self, rank: int) -> tuple[int, int, int]:
        """``(pp_rank, dp_rank, tp_rank)`` of a global rank."""
        return rank // (self.tp * self.dp), (rank // self.tp) % self.dp, rank % self.tp

    def rank_of(self, pp_rank: int, dp_rank: int, tp_rank: int) -> int:
        return tp_rank + self.tp * (dp_rank + self.dp * pp_rank)

    def groups(self) -> dict[str, list[list[int]]]:
        """Rank lists of every group kind, in a fixed order (the order ``new_group`` is called in)."""
        r = range
        out: dict[str, list[list[int]]] = {
            "tp": [[self.rank_of(p, d, t) for t in r(self.tp)] for p in r(self.pp) for d in r(self.dp)],
            "dp": [[self.rank_of(p, d, t) for d in r(self.dp)] for p in r(self.pp) for t in r(self.tp)],
            "pp": [[self.rank_of(p, d, t) for p in r(self.pp)] for d in r(self.dp) for t in r(self.tp)],
            # tensor x pipeline: everything that holds one model replica (DeepSpeed's "model parallel")
            "mp": [[self.rank_of(p, d, t) for p in r(self.pp) for t in r(self.tp)] for d in r(self.dp)],
        }
        out["ep"] = [g[i * self.ep:(i + 1) * self.ep] for g in out["dp"] for i in r(self.expert_dp)]
        out["edp"] = [g[i::self.ep] for g in out["dp"] for i in r(self.ep)]
        out["cp"] = [g[i * self.cp:(i + 1) * self.cp] for g in out["dp"] for i in r(self.replicas)]
        return out


def group_plan(layout: Layout, rank: int) -> dict[str, list[int]]:
    """The ranks of each kind's group that ``rank`` belongs to, kinds in :meth:`Layout.groups` order."""
    return {kind: next(ranks for ranks in rank_lists if rank in ranks)
            for kind, rank_lists in layout.groups().items()}


class Mesh:
    """This rank's process groups and coordinates. Build once per process after ``init_process_group``."""

    def __init__(self, layout: Layout):
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed must be initialized before building the mesh")
        if dist.get_world_size() != layout.world_size:
            raise ValueError(f"layout {layout} needs {layout.world_size} processes, "
                             f"but the world has {dist.get_world_size()}")
        self.layout = layout
        self.rank = dist.get_rank()
        self.pp_rank, self.dp_rank, self.tp_rank = layout.coords(self.rank)
        self.ep_rank = self.dp_rank % layout.ep
        self.edp_rank = self.dp_rank // layout.ep
        self.cp_rank, self.replica_rank = self.dp_rank % layout.cp, self.dp_rank // layout.cp
        self.ranks = {kind: ranks for kind, ranks in group_plan(layout, self.rank).items()}
        self._groups: dict[str, ProcessGroup] = {}
        made: dict[tuple[int, ...], ProcessGroup] = {}
        for kind, ranks in self.ranks.items():
            key = tuple(ranks) if len(ranks) > 1 else (self.rank,)
            if key not in made:  # only this group's members call it: a local barrier, not a global one
                made[key] = dist.new_group(list(key), use_local_synchronization=True)
            self._groups[kind] = made[key]

    def group(self, kind: str) -> ProcessGroup:
        """``kind``: tp, dp, pp, mp (tensor x pipeline), ep (expert), edp (expert data parallel), cp (context)."""
        return self._groups[kind]

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.layout.pp - 1

    def __repr__(self) -> str:
        lay = self.layout
        return (f"Mesh(rank={self.rank}, tp={self.tp_rank}/{lay.tp}, dp={self.dp_rank}/{lay.dp}, "
                f"pp={self.pp_rank}/{lay.pp}, ep={self.ep_rank}/{lay.ep})")


class SlowBarrier:
    """A barrier of every rank around slow work (checkpoint writes, evaluations): its own gloo group with a long
    timeout (``PRETRAIN_BARRIER_TIMEOUT`` seconds, default 1 h), so waiting for rank 0 to publish a large
    checkpoint is bounded by neither the training collectives' timeout nor the NCCL watchdog, and
    ``monitored_barrier`` names the rank that never arrives. Creating it is collective: every rank, once."""

    def __init__(self, timeout_s: float | None = None):
        seconds = float(os.environ.get("PRETRAIN_BARRIER_TIMEOUT", SLOW_BARRIER_TIMEOUT_S)) if timeout_s is None \
            else timeout_s
        self.timeout = datetime.timedelta(seconds=seconds)
        alone = not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1
        self.group = None if alone else dist.new_group(backend="gloo", timeout=self.timeout)

    def __call__(self) -> None:
        if self.group is not None:
            dist.monitored_barrier(self.group, timeout=self.timeout)


class DeepSpeedMPU:
    """The ``mpu`` object DeepSpeed asks for the tensor/pipeline/data groups.

    Without it DeepSpeed averages gradients over the whole world and counts tensor-sharded parameters once
    per rank in the gradient norm: the results are silently wrong.
    """

    def __init__(self, mesh: Mesh):
        self.mesh = mesh

    def get_model_parallel_rank(self) -> int:
        return self.mesh.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.mesh.layout.tp

    def get_model_parallel_group(self) -> ProcessGroup:
        return self.mesh.group("tp")

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self) -> int:
        return self.mesh.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.mesh.layout.dp

    def get_data_parallel_group(self) -> ProcessGroup:
        return self.mesh.group("dp")

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.mesh.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.mesh.layout.pp

    def get_pipeline_model_parallel_group(self) -> ProcessGroup:
        return self.mesh.group("pp")
