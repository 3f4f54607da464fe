"""Expert parallelism for MoE layers: each expert-parallel rank keeps ``num_experts / ep`` experts.

Routing, capacity and dropping stay local and unchanged (:class:`~pretrain.models.moe.TokenDispatcher` fills
the ``[experts, capacity, dim]`` buffer exactly as one process would for the same micro-batch); only the buffer
moves: an all-to-all sends each expert's slots to the rank owning it and another brings the outputs back.
Dropless layers (:class:`AllToAllSortedDispatcher`) send each rank the rows routed to its experts, with
variable split sizes: exchanging the counts and reading them on the host is one sync per layer (as
Megatron-Core's all-to-all dispatcher). All collectives are autograd-aware, so expert gradients arrive on the
owner. Router, selection bias and shared expert stay replicated (dense parameters). Expert parameters are marked
``expert_parallel`` and reduced over the expert-data-parallel group only (:mod:`pretrain.parallel.data`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn as nn
from torch.distributed import ProcessGroup

from pretrain.models.dropless import SortedDispatcher
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


@dataclass
class _Sent:
    order: torch.Tensor  # the local sort by expert (SortedDispatcher)
    perm: torch.Tensor  # received rows, [source][expert] order -> [expert][source] order
    send: list[int]  # rows sent to each rank
    recv: list[int]  # rows received from each rank


class AllToAllSortedDispatcher(SortedDispatcher):
    """Dropless: rows sorted by (global) expert go to the rank owning their expert and come back."""

    def __init__(self, group: ProcessGroup):
        self.group, self.ep = group, dist.get_world_size(group)

    def dispatch(self, x, expert, num_experts):
        rows, offs, order = super().dispatch(x, expert, num_experts)
        counts = torch.diff(offs, prepend=offs.new_zeros(1)).view(self.ep, -1)  # [destination, its experts]
        received = torch.empty_like(counts)  # [source, my experts]
        dist.all_to_all_single(received, counts, group=self.group)
        sizes = torch.stack([counts.sum(1), received.sum(1)]).tolist()  # the host sync
        send, recv = sizes
        got = dist_fn.all_to_all_single(rows.new_empty(sum(recv), rows.shape[1]), rows.contiguous(), recv, send,
                                        group=self.group)
        local = counts.shape[1]
        source_expert = torch.arange(self.ep * local, device=rows.device) % local  # of each received block
        perm = torch.argsort(torch.repeat_interleave(source_expert, received.flatten()), stable=True)
        local_offs = received.sum(0).cumsum(0).to(torch.int32)
        return got.index_select(0, perm), local_offs, _Sent(order, perm, send, recv)

    def combine(self, y, state):
        y = super().combine(y, state.perm)  # back to [source][expert] order
        back = dist_fn.all_to_all_single(y.new_empty(sum(state.send), y.shape[1]), y, state.send, state.recv,
                                         group=self.group)
        return super().combine(back, state.order)


def shard_experts(model: nn.Module, group: ProcessGroup) -> int:
    """Keep this rank's experts in every MoE layer and swap in the all-to-all dispatcher.

    Returns the number of MoE layers. The model was built from the shared seed, so the kept slices are the
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
        layer.dispatcher = AllToAllSortedDispatcher(group) if layer.cfg.dropless else AllToAllDispatcher(group)
    return len(layers)
