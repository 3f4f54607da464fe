"""Ring attention: context-parallel attention with K/V passed rank to rank (``parallel.cp_comm=ring``).

Each rank keeps its queries; the context group's K/V blocks travel around the ring (``isend`` to the next rank,
``irecv`` from the previous one, started before the local block is computed, so the transfer overlaps the
compute). Every step attends the local queries to one block under the exact mask of the global indices and
document ids (:func:`pretrain.parallel.context.context_mask`) and merges it into the running output with the
log-sum-exp rule (the online softmax of flash attention): ``lse = logaddexp(lse, lse_b)``,
``out = out * exp(lse_old - lse) + out_b * exp(lse_b - lse)``. Rows that see no key of a block contribute
nothing; a row that sees no key at all (an encoder's padding token among padding in a local window) ends with
output 0, as SDPA gives it, and its ``lse`` is stored as 0 so that the backward's ``p = exp(-inf - lse)`` is 0.

Backward recomputes each block's probabilities from the saved ``lse`` (``p = exp(s - lse)``), accumulates
``dQ`` locally and sends ``dK``/``dV`` accumulators around the ring with their blocks; after the last step they
take one more hop home. Scores and masks are materialized one tile of ``TILE`` query rows against one block at
a time (the all-gather variant holds ``[q_local, S]``), computed in fp32 whatever the input dtype; a tile that
causality alone hides from a block (``RingPlan.visible``, decided on the host from the global indices, no
device sync) is skipped, which is most of the front chunk's work against later ranks' blocks.

Purely causal masks (no documents, no sparse pattern) on the CPU take a faster path (``RingPlan.pieces``): each
block is cut into the chunk pairs of the load-balanced split, each entirely visible or a causal square, and
SDPA's CPU flash kernel computes them (no scores held, its log-sum-exp merged as above); its backward kernel,
given this rank's final output and log-sum-exp, yields each piece's exact gradients (flash attention's ring
backward). Elsewhere (documents, patterns, CUDA) the fp32 tiles are used.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from pretrain.models.attention import expand_kv


TILE = 256  # query rows whose scores against one K/V block are materialized at a time
# SDPA's CPU flash kernel and its backward, which return / take the log-sum-exp the ring merges with
FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class RingPlan:
    """One layer's ring: the group, its neighbours, ``mask(src, rows)``, the bool mask ``[batch or 1, 1, rows,
    block]`` of local query ``rows`` against context rank ``src``'s block (None: nothing masked), and
    ``visible(src, rows)``, False when that tile is known to be entirely masked (decided on the host: skipped)."""

    def __init__(self, group: ProcessGroup, mask, visible, scale: float | None = None, causal_only: bool = False):
        self.group, self.mask, self.visible, self.scale = group, mask, visible, scale
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        self.rank, self.size = rank, size
        self.next, self.prev = (dist.get_global_rank(group, (rank + d) % size) for d in (1, -1))
        self.causal_only = causal_only  # the masks are the causal mask alone (no documents, no pattern)

    def pieces(self, step: int, n: int, device: torch.device) -> list[tuple[slice, slice, bool | None]]:
        """``(query rows, block columns, kernel)`` to compute against the block held at ``step``: on the CPU with
        a purely causal mask, the chunk pairs of the load-balanced split, each entirely visible (``False``) or a
        causal square (``True``), for SDPA's flash kernel; otherwise tiles of rows against the whole block under
        :meth:`mask` (``None``)."""
        if not (self.causal_only and device.type == "cpu"):
            return [(rows, slice(None), None) for rows in self.work(step, n)]
        half, src = n // 2, self.source(step)
        q_chunks = (self.rank, 2 * self.size - 1 - self.rank)
        k_chunks = (src, 2 * self.size - 1 - src)
        return [(slice(a * half, (a + 1) * half), slice(c * half, (c + 1) * half), kc == qc)
                for a, qc in enumerate(q_chunks) for c, kc in enumerate(k_chunks) if kc <= qc]

    @staticmethod
    def tiles(n: int) -> list[slice]:
        return [slice(i, min(i + TILE, n)) for i in range(0, n, TILE)]

    def work(self, step: int, n: int) -> list[slice]:
        """The tiles of ``n`` query rows that see something of the block held at ``step``."""
        return [rows for rows in self.tiles(n) if self.visible(self.source(step), rows)]

    def ring(self, kv: list[torch.Tensor], heads: int):
        """Yields ``(step, K, V)`` (fp32, ``[b, heads, block, d]``) for each block this rank holds, the next
        block's transfer in flight while the caller computes; ``kv`` is this rank's ``[k, v]``."""
        for step in range(self.size):
            nxt, reqs = self.shift(kv) if step < self.size - 1 else (None, [])
            yield step, _heads(kv[0], heads), _heads(kv[1], heads)
            for r in reqs:
                r.wait()
            kv = nxt

    def score_grad(self, step: int, rows: slice, ds: torch.Tensor) -> None:
        """The backward's gradient of the scores of query ``rows`` against the block held at ``step`` (fp32
        ``[b, heads, rows, block]``); a plan whose scores carry a learned bias collects it here
        (:class:`pretrain.parallel.context_t5.BiasRingPlan`)."""

    def scores(self, step: int, qf: torch.Tensor, rows: slice, kf: torch.Tensor, scale: float) -> torch.Tensor:
        """Masked fp32 scores of query ``rows`` against the block held at ``step``."""
        return _scores(qf[:, :, rows], kf, self.mask(self.source(step), rows), scale)

    def source(self, step: int) -> int:
        """The context rank whose block this rank holds at ``step``."""
        return (self.rank - step) % self.size

    def shift(self, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list]:
        """Start sending ``tensors`` to the next rank and receiving the previous rank's; returns the receive
        buffers and the pending requests (wait on them before reading the buffers)."""
        bufs = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, b, self.prev, self.group) for b in bufs]
        return bufs, dist.batch_isend_irecv(ops)


def _scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """fp32 scores ``[b, heads, q, k]`` of ``q`` ``[b, heads, q, d]`` and ``k`` ``[b, heads, k, d]``, masked."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    return s if mask is None else s.masked_fill(~mask, float("-inf"))


def _merge(out: torch.Tensor, lse: torch.Tensor, rows: slice, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """Fold one piece's normalized output and log-sum-exp into the running ones (online softmax), in place."""
    new = torch.logaddexp(lse[..., rows], lse_b)
    weight = lambda x: torch.where(new == float("-inf"), 0.0, (x - new).exp())[..., None]  # noqa: E731
    out[:, :, rows] = out[:, :, rows] * weight(lse[..., rows]) + out_b * weight(lse_b)
    lse[..., rows] = new


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[b, s, kv_heads, d]`` -> fp32 ``[b, heads, s, d]`` (grouped-query K/V expanded)."""
    return expand_kv(x, heads).transpose(1, 2).float()


def _fold(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """fp32 ``[b, heads, s, d]`` gradient -> ``[b, s, kv_heads, d]`` (summed over each kv head's query group)."""
    b, heads, s, d = grad.shape
    return grad.transpose(1, 2).reshape(b, s, kv_heads, heads // kv_heads, d).sum(3)


class RingAttention(torch.autograd.Function):
    """``out [b, q, heads, d]`` of local ``q`` and the ring's K/V (local ``k``/``v`` ``[b, k, kv_heads, d]``)."""

    @staticmethod
    def forward(ctx, q, k, v, plan: RingPlan):
        heads, scale = q.shape[2], plan.scale or q.shape[-1] ** -0.5
        with torch.autocast(q.device.type, enabled=False):  # fp32 math, whatever autocast is on
            qf = q.transpose(1, 2).float()
            out = torch.zeros_like(qf)
            lse = torch.full(qf.shape[:-1], float("-inf"), device=q.device)
            for step, kf, vf in plan.ring([k.contiguous(), v.contiguous()], heads):
                for rows, cols, causal in plan.pieces(step, q.shape[1], q.device):
                    if causal is None:
                        s = plan.scores(step, qf, rows, kf, scale)
                        lse_b = s.logsumexp(-1)
                        p = torch.where(lse_b[..., None] == float("-inf"), 0.0, (s - lse_b[..., None]).exp())
                        out_b = torch.matmul(p, vf)
                    else:
                        out_b, lse_b = FLASH(*(t.contiguous() for t in (qf[:, :, rows], kf[:, :, cols],
                                                                          vf[:, :, cols])), 0.0, causal, scale=scale)
                    _merge(out, lse, rows, out_b, lse_b)
            lse = lse.masked_fill(lse == float("-inf"), 0.0)  # rows that saw no key: p = 0 in the backward
        ctx.plan, ctx.scale = plan, scale
        ctx.save_for_backward(q, k, v, out, lse)
        return out.transpose(1, 2).to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        plan, scale, heads, kv_heads = ctx.plan, ctx.scale, q.shape[2], k.shape[2]
        with torch.autocast(q.device.type, enabled=False):
            qf, do = q.transpose(1, 2).float(), grad_out.transpose(1, 2).float()
            delta = (do * out).sum(-1, keepdim=True)
            dq = torch.zeros_like(qf)
            dkv = [torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32)]
            for step, kf, vf in plan.ring([k.contiguous(), v.contiguous()], heads):
                for rows, cols, causal in plan.pieces(step, q.shape[1], q.device):
                    if causal is None:
                        s = plan.scores(step, qf, rows, kf, scale)
                        p = (s - lse[..., rows, None]).exp()
                        ds = p * (torch.matmul(do[:, :, rows], vf.transpose(-1, -2)) - delta[:, :, rows])
                        plan.score_grad(step, rows, ds)
                        grads = (torch.matmul(ds, kf) * scale, torch.matmul(ds.transpose(-1, -2), qf[:, :, rows]) *
                                 scale, torch.matmul(p.transpose(-1, -2), do[:, :, rows]))
                    else:  # flash backward with this rank's final output and log-sum-exp: exact per piece
                        grads = FLASH_BACKWARD(*(t.contiguous() for t in (
                            do[:, :, rows], qf[:, :, rows], kf[:, :, cols], vf[:, :, cols], out[:, :, rows],
                            lse[..., rows])), 0.0, causal, scale=scale)
                    dq[:, :, rows] += grads[0]
                    dkv[0][:, cols] += _fold(grads[1], kv_heads)
                    dkv[1][:, cols] += _fold(grads[2], kv_heads)
                dkv, reqs = plan.shift(dkv)  # the accumulators travel with their block; the last hop takes them home
                for r in reqs:
                    r.wait()
        return dq.transpose(1, 2).to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None
