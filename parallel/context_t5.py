"""T5's attention on the context-parallel ring (``parallel.cp_comm=ring``, see :mod:`pretrain.parallel.context`).

Contract of :func:`ring_attention`: ``q`` ``[b, q_local, heads, d]`` are this rank's queries, ``k``/``v``
``[b, k_local, heads, d]`` this rank's keys and values (its chunks of the encoder's or the decoder's sequence;
``k_local`` may differ from ``q_local`` in cross-attention). ``bias`` ``[1, heads, q_local, S_k]`` (T5's
relative position bias, or None), ``mask`` (bool ``[b or 1, 1, q_local, S_k]``, True = may attend, or None) and
``key_mask`` (``[b, S_k]`` padding) cover all keys in *ring order*: context rank 0's chunks, then rank 1's, ...
(the order in which :class:`pretrain.parallel.ring.RingAttention` visits the blocks; :func:`key_positions` and
:func:`keys_whole` give positions and masks in it). The output is the attention of the local queries
to every key, ``softmax(q k^T + bias) v`` (scale 1 as in T5), exactly as one process computes those rows.

The ring adds the bias's tile to each tile of scores (:meth:`BiasRingPlan.scores`); its backward hands each
tile's score gradient ``dS`` to the plan (:meth:`pretrain.parallel.ring.RingPlan.score_grad`), which sums it over
the batch into ``dbias``. :class:`_BiasGrad`, an identity on ``q`` applied before the ring, runs its backward
after the ring's (it needs the ring's ``dQ``) and returns ``dbias`` as the bias's gradient, so the relative
position table gets one process's gradient. Every tile is computed (no causal skipping) in fp32.
"""

from __future__ import annotations

import torch

from pretrain.parallel.ring import RingAttention, RingPlan


def key_positions(cp, local_len: int, device: torch.device) -> torch.Tensor:
    """Global positions of the context group's keys (``local_len`` per rank) in the order T5's attention takes
    them: global order for ``all_gather`` (``cp.whole``), ring order for ``ring``."""
    if cp.comm != "ring":
        return torch.arange(local_len * cp.size, device=device)
    return cp.gathered_index(local_len, device)


def keys_whole(cp, x: torch.Tensor) -> torch.Tensor:
    """Every context rank's padding mask ``x`` ``[b, local]`` in the order of :func:`key_positions` (the ring's is the
    all-gather's own order; no gradient)."""
    return cp.whole(x) if cp.comm != "ring" else cp.gathered(x)


class BiasRingPlan(RingPlan):
    """A :class:`RingPlan` whose scores carry ``bias`` (ring order) and whose backward collects ``dbias``."""

    def __init__(self, cp, bias: torch.Tensor | None, mask: torch.Tensor | None, block_len: int):
        self.block_len = block_len
        super().__init__(cp.group, lambda src, rows: None if mask is None else mask[:, :, rows, self.block(src)],
                         lambda src, rows: True, scale=1.0)
        self.bias = bias
        self.dbias = None if bias is None else torch.zeros_like(bias, dtype=torch.float32)

    def block(self, src: int) -> slice:
        """Context rank ``src``'s keys among all keys (ring order)."""
        return slice(src * self.block_len, (src + 1) * self.block_len)

    def scores(self, step: int, qf: torch.Tensor, rows: slice, kf: torch.Tensor, scale: float) -> torch.Tensor:
        s = super().scores(step, qf, rows, kf, scale)
        return s if self.bias is None else s + self.bias[:, :, rows, self.block(self.source(step))].float()

    def score_grad(self, step: int, rows: slice, ds: torch.Tensor) -> None:
        if self.dbias is not None:
            self.dbias[:, :, rows, self.block(self.source(step))] += ds.sum(0, keepdim=True)


class _BiasGrad(torch.autograd.Function):
    """Identity on ``q``; backward: the plan's ``dbias`` (filled by the ring's backward, which runs first)."""

    @staticmethod
    def forward(ctx, q, bias, plan):
        ctx.plan, ctx.dtype = plan, bias.dtype
        return q.view_as(q)

    @staticmethod
    def backward(ctx, grad):
        return grad, ctx.plan.dbias.to(ctx.dtype), None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp, bias: torch.Tensor | None,
                   mask: torch.Tensor | None, key_mask: torch.Tensor | None) -> torch.Tensor:
    """This rank's queries attending to the context group's keys over the ring (see the module docstring); ``cp``:
    the :class:`pretrain.parallel.context.ContextParallel` of the forward; ``key_mask``: ``[b, S_k]`` padding
    (1 = token), ring order."""
    if key_mask is not None:
        keys = key_mask.bool()[:, None, None, :]
        mask = keys if mask is None else mask & keys
    plan = BiasRingPlan(cp, bias, mask, k.shape[1])
    if bias is not None:
        q = _BiasGrad.apply(q, bias, plan)
    return RingAttention.apply(q, k, v, plan)
