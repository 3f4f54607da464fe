"""Where models get their large layers from.

Model code asks a :class:`LayerFactory` for its projections, embeddings, norms and loss instead of building
``nn.Linear`` itself. :class:`LocalLayers` (here) returns plain torch modules; ``pretrain.parallel.tensor`` returns
megatron-core tensor-parallel layers (plus sequence parallelism) behind the same calls. That is the whole
difference between a single-process model and a tensor-parallel one: the block code is shared.

Shapes are ``[batch, seq, features]``. "Local" means this rank's shard:

* ``column(i, o)``: input full, output is this rank's ``o / tp`` features (heads, MLP columns).
* ``row(i, o)``: input is this rank's ``i / tp`` features, output full ``o`` (summed over ranks).
* ``embedding(v, d)``: vocab split over ranks, output full ``d``.
* ``lm_head``: logits over this rank's ``v / tp`` vocab entries; ``cross_entropy`` consumes them.
* ``head_cross_entropy(h, head, labels)``: both in one call, so a factory may fuse them (``LocalLayers`` does).
* ``scatter_sequence`` / ``gather_sequence``: enter/leave the sequence-parallel region (no-ops here).
* ``head_shard``: this rank's heads of a tensor computed in full (no-op here).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class TiedHead(nn.Module):
    """Output projection sharing the (possibly vocab-sharded) embedding matrix."""

    def __init__(self, embedding: nn.Module):
        super().__init__()
        self._embedding = [embedding]  # a list keeps the embedding from being registered twice

    @property
    def weight(self) -> torch.Tensor:
        return self._embedding[0].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class LinearCrossEntropy(torch.autograd.Function):
    """Per-token ``cross_entropy(x @ weight.T, labels)`` with the logits handled a chunk of tokens at a time.

    Each chunk's logits are turned into ``softmax - one_hot`` (the loss gradient) in place while still in cache,
    and ``d loss / d x`` is computed right away; only the per-token upstream gradients wait for backward (they
    scale rows, so that stays exact). This saves several full passes over the ``[tokens, vocab]`` logits.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        loss = x.new_empty(x.shape[0])
        grad_logits = x.new_empty(x.shape[0], weight.shape[0])
        grad_x = torch.empty_like(x)
        for start in range(0, x.shape[0], chunk):
            end, y = start + chunk, labels[start:start + chunk, None]
            z = torch.mm(x[start:end], weight.t(), out=grad_logits[start:end])
            top = z.amax(1, keepdim=True)
            target = z.gather(1, y)
            z.sub_(top).exp_()
            total = z.sum(1, keepdim=True)
            loss[start:end] = (total.log() + top - target).squeeze(1)
            z.div_(total).scatter_add_(1, y, z.new_full(y.shape, -1.0))
            torch.mm(z, weight, out=grad_x[start:end])
        ctx.save_for_backward(x, grad_logits, grad_x)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        x, grad_logits, grad_x = ctx.saved_tensors
        g = grad_loss[:, None]
        dx = grad_x * g if ctx.needs_input_grad[0] else None
        dw = grad_logits.t().mm(x * g) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None


def init_normal_(weight: torch.Tensor, std: float) -> torch.Tensor:
    return nn.init.normal_(weight, mean=0.0, std=std)


class LayerFactory:
    """Interface; see the module docstring. ``tp_size``/``tp_rank`` describe the tensor-parallel group."""

    tp_size: int = 1
    tp_rank: int = 0
    sp: bool = False  # sequence parallelism: activations between blocks are split along the sequence
    cp = None  # context parallelism: a pretrain.parallel.context.ContextParallel set by the engine factory

    @property
    def sequence_shards(self) -> int:
        """Ranks a sequence is split over between blocks (a pipeline stage's input holds ``1 / this``)."""
        return self.tp_size if self.sp else 1

    def column(self, in_features: int, out_features: int, bias: bool, init_std: float,
               stride: int = 1) -> nn.Module:
        """``stride``: number of equal sections fused in the output (2 for ``[gate; up]``); each tensor rank
        keeps its slice of every section (Megatron's ``partition_stride``)."""
        raise NotImplementedError

    def row(self, in_features: int, out_features: int, bias: bool, init_std: float) -> nn.Module:
        raise NotImplementedError

    def embedding(self, num_embeddings: int, dim: int, init_std: float) -> nn.Module:
        raise NotImplementedError

    def lm_head(self, dim: int, vocab_size: int, init_std: float, tied_to: nn.Module | None = None) -> nn.Module:
        raise NotImplementedError

    def norm(self, dim: int, kind: str = "rmsnorm", eps: float = 1e-6, bias: bool = True) -> nn.Module:
        """Norms are replicated; under sequence parallelism their grads need a tensor-group all-reduce."""
        if kind == "rmsnorm":
            return RMSNorm(dim, eps)
        if kind == "layernorm":
            return nn.LayerNorm(dim, eps=eps, bias=bias)
        raise ValueError(f"unknown norm kind {kind!r} (expected 'rmsnorm' or 'layernorm')")

    def head_norm(self, dim: int, eps: float) -> nn.Module:
        """An RMSNorm over ``dim = head_dim`` that every head shares (QK-norm). Replicated; under tensor
        parallelism each rank normalises only its own heads, so its weight's grads need a tensor-group sum."""
        return RMSNorm(dim, eps)

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token loss (no reduction) from this rank's vocab shard of ``logits``."""
        raise NotImplementedError

    def head_cross_entropy(self, h: torch.Tensor, head: nn.Module, labels: torch.Tensor) -> torch.Tensor:
        """``cross_entropy(head(h), labels)``; factories may fuse the two."""
        return self.cross_entropy(head(h), labels)

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Full-vocab logits from this rank's shard (for evaluation and export)."""
        raise NotImplementedError

    def scatter_sequence(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def gather_sequence(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def head_shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's heads (dim 1) of a per-head tensor every rank computes in full from replicated weights
        (T5's relative position bias); under tensor parallelism the backward gathers all ranks' gradients."""
        return x

    def local_heads(self, num_heads: int) -> int:
        if num_heads % self.tp_size:
            raise ValueError(f"{num_heads} heads do not split over tensor-parallel size {self.tp_size}")
        return num_heads // self.tp_size


class LocalLayers(LayerFactory):
    """Single-process layers: plain ``nn.Linear`` / ``nn.Embedding`` / ``F.cross_entropy``.

    ``fused_loss``: compute the head and the loss a chunk at a time (:class:`LinearCrossEntropy`). The engine
    that builds the model turns it off where the head's weight is not a plain tensor during the step
    (DeepSpeed ZeRO-3 gathers it only inside the head's own forward) or the model is compiled (inductor fuses
    the plain version a little better still).
    """

    loss_chunk = 256  # tokens per chunk of the fused head + cross-entropy (their logits stay in cache)

    def __init__(self, fused_loss: bool = True):
        self.fused_loss = fused_loss

    def column(self, in_features, out_features, bias, init_std, stride=1):
        return self._linear(in_features, out_features, bias, init_std)

    def row(self, in_features, out_features, bias, init_std):
        return self._linear(in_features, out_features, bias, init_std)

    @staticmethod
    def _linear(in_features, out_features, bias, init_std):
        layer = nn.Linear(in_features, out_features, bias=bias)
        init_normal_(layer.weight, init_std)
        if bias:
            nn.init.zeros_(layer.bias)
        return layer

    def embedding(self, num_embeddings, dim, init_std):
        emb = nn.Embedding(num_embeddings, dim)
        init_normal_(emb.weight, init_std)
        return emb

    def lm_head(self, dim, vocab_size, init_std, tied_to=None):
        return TiedHead(tied_to) if tied_to is not None else self._linear(dim, vocab_size, False, init_std)

    def cross_entropy(self, logits, labels):
        return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), reduction="none").view_as(labels)

    def head_cross_entropy(self, h, head, labels):
        # Unfused: switched off, bf16 or autocast (logits are upcast to fp32 there), a biased head, or no backward
        # to prepare.
        w = head.weight
        fusable = (self.fused_loss and h.dtype == w.dtype == torch.float32
                   and not torch.is_autocast_enabled(h.device.type) and getattr(head, "bias", None) is None)
        if not (fusable and torch.is_grad_enabled() and (h.requires_grad or w.requires_grad)):
            return super().head_cross_entropy(h, head, labels)
        loss = LinearCrossEntropy.apply(h.flatten(0, -2), w, labels.flatten(), self.loss_chunk)
        return loss.view_as(labels)

    def gather_logits(self, logits):
        return logits


def scaled_init_std(base_std: float, num_layers: int) -> float:
    """GPT-2 / Megatron "scaled init" for output projections feeding the residual stream."""
    return base_std / math.sqrt(2.0 * num_layers)
