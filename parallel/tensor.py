"""Tensor and sequence parallelism: a :class:`LayerFactory` on megatron-core's tensor-parallel layers.

Parameters, their sharding metadata (``tensor_model_parallel``, ``partition_dim``) and the non-sequence-
parallel forward passes are megatron-core's ``ColumnParallelLinear`` / ``RowParallelLinear`` /
``VocabParallelEmbedding``. Three small pieces are our own because megatron-core hard-codes CUDA there:
the sequence-parallel all-gather / reduce-scatter (its buffers are allocated on ``torch.cuda.current_device``),
the vocab-parallel cross-entropy (it only knows the global ``parallel_state`` group; we reuse its math) and the
logits gather.

Initialization: every layer is first drawn at full size by :class:`LocalLayers` and this rank keeps its shard,
so one seed gives the same model under every tensor-parallel size (what the parity tests rely on).

Under sequence parallelism (``sp=True``) activations between blocks are split along the sequence (dim 1):

* ``column(...)`` takes the sequence-sharded input and all-gathers it (reduce-scatter in backward);
* ``row(...)`` reduce-scatters its output back to sequence shards;
* ``scatter_sequence`` enters the region after the embedding; ``gather_sequence`` leaves it before
  ``lm_head``, whose input is the full sequence. A T5 decoder feeds the still sequence-sharded encoder
  output to its cross-attention ``column`` layers (which gather it like any other ``column`` input).
* norm weights see only their sequence shard, so their gradients are summed over the tensor group by
  :func:`register_sequence_parallel_grad_hooks` (engines call it before DeepSpeed installs its own hooks).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    set_tensor_model_parallel_attributes,
)
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from torch.distributed import ProcessGroup

from pretrain.models.layers import LayerFactory, LocalLayers


# ---------------------------------------------------------------------------------------------------------
# Sequence-parallel communication along dim 1 ([batch, seq, ...]), device-agnostic.

def _all_gather_seq(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    world = dist.get_world_size(group)
    local = x.movedim(1, 0).contiguous()
    out = local.new_empty((world * local.shape[0], *local.shape[1:]))
    dist.all_gather_into_tensor(out, local, group=group)
    return out.movedim(0, 1).contiguous()  # contiguous: pipelines send these (and their gradients) as is


def _reduce_scatter_seq(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    world = dist.get_world_size(group)
    full = x.movedim(1, 0).contiguous()
    if full.shape[0] % world:
        raise ValueError(f"sequence length {full.shape[0]} is not divisible by tensor-parallel size {world}")
    out = full.new_empty((full.shape[0] // world, *full.shape[1:]))
    dist.reduce_scatter_tensor(out, full, group=group)
    return out.movedim(0, 1).contiguous()


def _split_seq(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if x.shape[1] % world:
        raise ValueError(f"sequence length {x.shape[1]} is not divisible by tensor-parallel size {world}")
    return x.chunk(world, dim=1)[rank].contiguous()


class _ScatterToSequence(torch.autograd.Function):
    """Replicated -> sequence shard; backward all-gathers."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_seq(grad, ctx.group), None


class _GatherFromSequence(torch.autograd.Function):
    """Sequence shard -> full sequence. Backward: reduce-scatter when the consumer is tensor-sharded
    (each rank holds a partial gradient), a plain split when the consumer is replicated."""

    @staticmethod
    def forward(ctx, x, group, grad_is_partial):
        ctx.group, ctx.grad_is_partial = group, grad_is_partial
        return _all_gather_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        split = _reduce_scatter_seq if ctx.grad_is_partial else _split_seq
        return split(grad, ctx.group), None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    """Partial sums over the tensor group -> summed sequence shard; backward all-gathers."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_seq(grad, ctx.group), None


# ---------------------------------------------------------------------------------------------------------
# Vocab-parallel cross-entropy: megatron-core's math, our process group.

class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, group):
        vpce = VocabParallelCrossEntropy
        # clone: megatron's helpers work in place and fp32 logits would otherwise be overwritten
        logits, logits_max = vpce.calculate_logits_max(logits.float().clone())
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        part = logits.shape[-1]
        start = dist.get_rank(group) * part
        target_mask, masked_target, predicted, sum_exp, exp_logits = vpce.calculate_predicted_logits(
            logits, labels, logits_max, start, start + part)
        dist.all_reduce(predicted, group=group)
        dist.all_reduce(sum_exp, group=group)
        softmax, loss = vpce.calculate_cross_entropy_loss(exp_logits, predicted, sum_exp)
        ctx.save_for_backward(softmax, target_mask, masked_target)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, target_mask, masked_target = ctx.saved_tensors
        vpce = VocabParallelCrossEntropy
        grad_2d, arange, update, grad_input = vpce.prepare_gradient_calculation_operands(softmax, target_mask)
        return vpce.calculate_gradients(grad_2d, arange, masked_target, update, grad_input, grad_loss), None, None


# ---------------------------------------------------------------------------------------------------------
# Layers: megatron-core modules returning a tensor (not ``(output, bias)``), initialized from a full draw.

def shard(full: torch.Tensor, dim: int, rank: int, world: int, stride: int = 1) -> torch.Tensor:
    """This rank's slice of each of the ``stride`` equal sections of ``full`` along ``dim``, concatenated."""
    sections = full.chunk(stride, dim)
    return torch.cat([s.chunk(world, dim)[rank] for s in sections], dim)


def unshard(local: torch.Tensor, dim: int, group: ProcessGroup, stride: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard`: the full tensor from every rank's slice (a collective over ``group``)."""
    world = dist.get_world_size(group)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous(), group=group)
    per_rank = [p.chunk(stride, dim) for p in parts]
    return torch.cat([torch.cat([r[s] for r in per_rank], dim) for s in range(stride)], dim)


def full_state_dict(model: nn.Module, state: dict[str, torch.Tensor], group: ProcessGroup) -> dict[str, torch.Tensor]:
    """Unsharded copy of a tensor-parallel ``state`` (from ``model.state_dict()``): the single-process names
    and shapes. Collective over ``group``."""
    params = dict(model.named_parameters())
    out = {}
    for name, tensor in state.items():
        p = params.get(name)
        if p is not None and getattr(p, "tensor_model_parallel", False):
            tensor = unshard(tensor, p.partition_dim, group, p.partition_stride)
        out[name] = tensor
    return out


def _keep_shard(param: nn.Parameter, full: torch.Tensor, dim: int, rank: int, world: int, stride: int = 1) -> None:
    with torch.no_grad():
        param.copy_(shard(full, dim, rank, world, stride))
    if not hasattr(param, "tensor_model_parallel"):
        set_tensor_model_parallel_attributes(param, True, dim, stride)


def _no_extra_state(module: nn.Module) -> None:
    """Our checkpoints hold tensors only: drop megatron's ``_extra_state`` (always None without TE)."""
    module._load_state_dict_pre_hooks.clear()


def _unused_init(weight: torch.Tensor) -> None:
    """Weights are copied from a full :class:`LocalLayers` draw; megatron's own init is switched off."""


class Column(ColumnParallelLinear):
    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    def __init__(self, full: nn.Linear, config: ModelParallelConfig, group: ProcessGroup, sp: bool,
                 stride: int = 1):
        super().__init__(full.in_features, full.out_features, config=config, init_method=_unused_init,
                         bias=full.bias is not None, disable_grad_reduce=sp, tp_group=group, stride=stride)
        _no_extra_state(self)
        self.sp = sp
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        _keep_shard(self.weight, full.weight, 0, rank, world, stride)
        if self.bias is not None:
            _keep_shard(self.bias, full.bias, 0, rank, world, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sp:  # megatron's own SP gather allocates on CUDA; ours is device-agnostic
            x = _GatherFromSequence.apply(x, self.tp_group, True)
        return super().forward(x)[0]


class Row(RowParallelLinear):
    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    def __init__(self, full: nn.Linear, config: ModelParallelConfig, group: ProcessGroup, sp: bool):
        super().__init__(full.in_features, full.out_features, config=config, init_method=_unused_init,
                         bias=full.bias is not None, input_is_parallel=True, skip_bias_add=False,
                         tp_group=group)
        _no_extra_state(self)
        self.sp = sp
        _keep_shard(self.weight, full.weight, 1, dist.get_rank(group), dist.get_world_size(group))
        if self.bias is not None:
            with torch.no_grad():
                self.bias.copy_(full.bias)
            self.bias.sequence_parallel = sp  # added to a sequence shard: partial grads under SP

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sp:
            return super().forward(x)[0]
        out = _ReduceScatterToSequence.apply(F.linear(x, self.weight), self.tp_group)
        return out + self.bias if self.bias is not None else out


class Embedding(VocabParallelEmbedding):
    def __init__(self, full: nn.Embedding, config: ModelParallelConfig, group: ProcessGroup):
        super().__init__(full.num_embeddings, full.embedding_dim, init_method=_unused_init, config=config,
                         tp_group=group)
        _keep_shard(self.weight, full.weight, 0, dist.get_rank(group), dist.get_world_size(group))


class TiedParallelHead(nn.Module):
    """Logits over this rank's vocab shard from the vocab-sharded embedding matrix."""

    def __init__(self, embedding: Embedding):
        super().__init__()
        self._embedding = [embedding]  # a list keeps the embedding from being registered twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emb = self._embedding[0]
        return F.linear(copy_to_tensor_model_parallel_region(x, group=emb.tp_group), emb.weight)


# ---------------------------------------------------------------------------------------------------------

class TensorParallelLayers(LayerFactory):
    """Megatron-core tensor-parallel layers over ``group``, optionally with sequence parallelism."""

    def __init__(self, group: ProcessGroup, sequence_parallel: bool = False):
        self.group = group
        self.tp_size, self.tp_rank = dist.get_world_size(group), dist.get_rank(group)
        self.sp = sequence_parallel and self.tp_size > 1
        self._local = LocalLayers()
        self._config = ModelParallelConfig(tensor_model_parallel_size=self.tp_size, use_cpu_initialization=True,
                                           perform_initialization=False, params_dtype=torch.float32)

    def column(self, in_features, out_features, bias, init_std, stride=1):
        self._check(out_features, "column output features", stride)
        full = self._local.column(in_features, out_features, bias, init_std)
        return Column(full, self._config, self.group, self.sp, stride)

    def row(self, in_features, out_features, bias, init_std):
        self._check(in_features, "row input features")
        full = self._local.row(in_features, out_features, bias, init_std)
        return Row(full, self._config, self.group, self.sp)

    def embedding(self, num_embeddings, dim, init_std):
        self._check(num_embeddings, "vocabulary size")
        return Embedding(self._local.embedding(num_embeddings, dim, init_std), self._config, self.group)

    def lm_head(self, dim, vocab_size, init_std, tied_to=None):
        if tied_to is not None:
            if not isinstance(tied_to, Embedding):
                raise TypeError("a tied head needs the embedding built by this factory")
            return TiedParallelHead(tied_to)
        self._check(vocab_size, "vocabulary size")
        full = self._local.column(dim, vocab_size, False, init_std)
        return Column(full, self._config, self.group, sp=False)  # input is the gathered full sequence

    def norm(self, dim, kind="rmsnorm", eps=1e-6, bias=True):
        norm = super().norm(dim, kind, eps, bias)
        for p in norm.parameters():
            p.sequence_parallel = self.sp
        return norm

    def head_norm(self, dim, eps):
        norm = super().head_norm(dim, eps)
        norm.weight.sequence_parallel = self.tp_size > 1  # this rank's heads only: partial grads
        return norm

    def cross_entropy(self, logits, labels):
        return _VocabParallelCrossEntropy.apply(logits, labels, self.group)

    @torch.no_grad()
    def gather_logits(self, logits):
        parts = [torch.empty_like(logits) for _ in range(self.tp_size)]
        dist.all_gather(parts, logits.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def scatter_sequence(self, x):
        return _ScatterToSequence.apply(x, self.group) if self.sp else x

    def gather_sequence(self, x):
        return _GatherFromSequence.apply(x, self.group, False) if self.sp else x

    def head_shard(self, x):
        # the same dim-1 split (backward: all-gather) as entering the sequence region, over heads here
        return _ScatterToSequence.apply(x, self.group) if self.tp_size > 1 else x

    def _check(self, n: int, what: str, stride: int = 1) -> None:
        if n % (self.tp_size * stride):
            raise ValueError(f"{what} ({n}) is not divisible by tensor-parallel size {self.tp_size}"
                             + (f" times {stride} fused sections" if stride > 1 else ""))


def register_sequence_parallel_grad_hooks(model: nn.Module, group: ProcessGroup) -> int:
    """Sum gradients of ``sequence_parallel`` parameters over the tensor group; returns how many were hooked.

    A tensor hook runs before the gradient is accumulated, hence before ZeRO's accumulation hooks copy it
    into their buckets (all-reducing after ``backward`` would be too late under ZeRO-2/3).
    """

    def all_reduce(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    hooked = 0
    for p in model.parameters():
        if getattr(p, "sequence_parallel", False) and p.requires_grad:
            p.register_hook(all_reduce)
            hooked += 1
    return hooked
