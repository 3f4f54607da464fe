"""Expert parallelism for Switch layers: each expert-parallel rank keeps ``num_experts / ep`` experts.

Routing, capacity and dropping stay local and unchanged (:class:`~pretrain.models.moe.TokenDispatcher` fills
the ``[experts, capacity, dim]`` buffer exactly as one process would for the same micro-batch); only the buffer
moves: an all-to-all sends each expert's slots to the rank owning it and another brings the outputs back.
Both are autograd-aware, so expert gradients arrive on the owner. Expert parameters are marked
``expert_parallel`` and reduced over the expert-data-parallel group only (:mod:`pretrain.parallel.data`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn as nn
from torch.distributed import ProcessGroup

from pretrain.models.moe import SwitchMLP, TokenDispatcher

EXPERT_PARAMS = ("w_in", "w_out", "bias_in", "bias_out")


def _all_to_all(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Block ``i`` of dim 0 goes to rank ``i``; the result's block ``i`` came from rank ``i``."""
    x = x.contiguous()
    return dist_fn.all_to_all_single(torch.empty_like(x), x, group=group)


class AllToAllDispatcher(TokenDispatcher):
    def __init__(self, group: ProcessGroup):
        self.group, self.ep = group, dist.get_world_size(group)

    def dispatch(self, x, expert, num_experts, capacity):
        buf, keep, state = super().dispatch(x, expert, num_experts, capacity)
        local = num_experts // self.ep
        recv = _all_to_all(buf, self.group).view(self.ep, local, capacity, -1)  # [source, my experts, C, d]
        return recv.transpose(0, 1).reshape(local, self.ep * capacity, -1), keep, (state, capacity)

    def combine(self, y, state):
        state, capacity = state
        local = y.shape[0]
        y = y.view(local, self.ep, capacity, -1).transpose(0, 1)  # [destination, my experts, C, d]
        return super().combine(_all_to_all(y, self.group).view(self.ep * local, capacity, -1), state)


def shard_experts(model: nn.Module, group: ProcessGroup) -> int:
    """Keep this rank's experts in every Switch layer and swap in the all-to-all dispatcher.

    Returns the number of Switch layers. The model was built from the shared seed, so the kept slices are the
    single-process experts ``[rank * E/ep, (rank + 1) * E/ep)``.
    """
    ep, rank = dist.get_world_size(group), dist.get_rank(group)
    layers = [m for m in model.modules() if isinstance(m, SwitchMLP)]
    for layer in layers:
        local = layer.cfg.num_experts // ep
        for name in EXPERT_PARAMS:
            full = getattr(layer, name)
            if full is None:
                continue
            param = nn.Parameter(full.detach()[rank * local:(rank + 1) * local].clone())
            param.expert_parallel = True
            setattr(layer, name, param)
        layer.dispatcher = AllToAllDispatcher(group)
    return len(layers)
