"""Dropless expert execution: every routed token is computed, by one grouped GEMM over tokens sorted by expert.

:func:`grouped_mm` ``(x [N, K], w [G, K, M], offs [G]) -> [N, M]`` multiplies rows ``offs[g-1]:offs[g]`` of ``x`` by
``w[g]`` (``offs`` are the cumulative group sizes, ``offs[-1] == N``). It is a torch custom op with a shape-only
fake implementation and its own backward, so a layer using it compiles with ``torch.compile(fullgraph=True)``
(``torch._grouped_mm``'s meta function accepts bf16 only). The eager kernel (:func:`kernel`) is
``torch._grouped_mm`` on CUDA (bf16); on CPU one ``bmm`` over the groups zero-padded to the largest (this
build's CPU ``torch._grouped_mm`` runs fp32/bf16 with 16-byte aligned strides, but its bare GEMM measured
2.5-12x slower than ``bmm`` here; inside the whole layer the three kernels are within noise of each other);
otherwise a loop over the groups (which reads the group sizes on the host). ``benchmarks/bench_moe.py`` compares
them with the capacity-padded ``bmm`` of the Switch path and a per-expert loop.

:class:`SortedDispatcher` orders a layer's ``[k * tokens]`` assignments by expert with static shapes: a stable
``argsort`` of the expert ids, group sizes counted by a one-hot sum (no ``bincount``, whose output size is
data-dependent), so the single-process layer has no host sync. Expert parallelism swaps in
:class:`pretrain.parallel.expert.AllToAllSortedDispatcher`.
"""

from __future__ import annotations

import torch


def _fits(t: torch.Tensor) -> bool:
    """``torch._grouped_mm``'s layout rule: every non-unit stride and the start a multiple of 16 bytes."""
    size = t.element_size()
    return t.storage_offset() * size % 16 == 0 and all(s * size % 16 == 0 for s in t.stride() if s != 1)


def kernel(a: torch.Tensor, b: torch.Tensor) -> str:
    """Which eager kernel runs a grouped product: ``torch._grouped_mm`` on CUDA (bf16, aligned), on CPU one
    ``bmm`` over the groups padded to the largest (reading the largest size costs no device sync on CPU), else a
    loop over the groups."""
    if a.device.type == "cpu":
        return "padded"
    if a.dtype == torch.bfloat16 and _fits(a) and _fits(b):
        return "grouped_mm"
    return "loop"


def _sizes(offs: torch.Tensor) -> torch.Tensor:
    return torch.diff(offs, prepend=offs.new_zeros(1))


def _looped(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, weight_grad: bool) -> torch.Tensor:
    """The grouped product group by group (reads the group sizes: one host sync)."""
    sizes = _sizes(offs).tolist()
    if weight_grad:  # a [K, N], b [N, M] -> [G, K, M]
        return torch.stack([x @ y for x, y in zip(a.split(sizes, dim=1), b.split(sizes))])
    return torch.cat([x @ w for x, w in zip(a.split(sizes), b.unbind(0))])


def _padded_rows(rows: torch.Tensor, offs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows [N, K]`` -> ``[G, largest group, K]`` zero-padded, and each row's flat slot in it."""
    sizes = _sizes(offs)
    group = row_groups(offs, rows.shape[0])
    largest = int(sizes.max()) if rows.shape[0] else 0
    slot = group * largest + torch.arange(rows.shape[0], device=rows.device) - (offs - sizes)[group]
    buf = rows.new_zeros(offs.shape[0] * largest, rows.shape[1]).index_copy_(0, slot, rows)
    return buf.view(offs.shape[0], largest, -1), slot


def _grouped(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, weight_grad: bool) -> torch.Tensor:
    how = kernel(a, b)
    if how == "grouped_mm":
        return torch._grouped_mm(a.t() if weight_grad else a, b, offs=offs)
    if how == "loop":
        return _looped(a.t() if weight_grad else a, b, offs, weight_grad)
    x, slot = _padded_rows(a, offs)
    if weight_grad:  # a [N, K], b [N, M] -> [G, K, M]
        return torch.bmm(x.transpose(1, 2), _padded_rows(b, offs)[0])
    return torch.bmm(x, b).flatten(0, 1).index_select(0, slot)


@torch.library.custom_op("pretrain::grouped_mm", mutates_args=())
def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``[N, K] x [G, K, M] -> [N, M]``: rows of group ``g`` times ``w[g]``."""
    return _grouped(x, w, offs, weight_grad=False)


@grouped_mm.register_fake
def _(x, w, offs):
    return x.new_empty(x.shape[0], w.shape[-1])


@torch.library.custom_op("pretrain::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(x: torch.Tensor, grad: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``[N, K], [N, M] -> [G, K, M]``: per group ``x_g^T @ grad_g`` (zero for empty groups)."""
    return _grouped(x, grad, offs, weight_grad=True)


@grouped_mm_weight_grad.register_fake
def _(x, grad, offs):
    return x.new_empty(offs.shape[0], x.shape[1], grad.shape[1])


def _setup(ctx, inputs, output):
    x, w, offs = inputs
    ctx.save_for_backward(x, w, offs)


def _backward(ctx, grad):
    x, w, offs = ctx.saved_tensors
    grad = grad.contiguous()
    dx = grouped_mm(grad, w.transpose(-2, -1).contiguous(), offs) if ctx.needs_input_grad[0] else None
    dw = grouped_mm_weight_grad(x, grad, offs) if ctx.needs_input_grad[1] else None
    return dx, dw, None


grouped_mm.register_autograd(_backward, setup_context=_setup)


def group_offsets(expert: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Cumulative assignment counts per expert (int32, ``[num_experts]``), without a host sync."""
    counts = (expert[:, None] == torch.arange(num_experts, device=expert.device)).sum(0)
    return counts.cumsum(0).to(torch.int32)


def row_groups(offs: torch.Tensor, rows: int) -> torch.Tensor:
    """The group of each of ``rows`` sorted rows."""
    return torch.searchsorted(offs, torch.arange(rows, device=offs.device, dtype=offs.dtype), right=True)


class SortedDispatcher:
    """Single process: assignments sorted by expert for :func:`grouped_mm`, and back."""

    def dispatch(self, x: torch.Tensor, expert: torch.Tensor, num_experts: int):
        """``x [A, d]`` (one row per assignment), ``expert [A]`` -> (sorted rows, group offsets, state)."""
        order = torch.argsort(expert, stable=True)
        return x.index_select(0, order), group_offsets(expert, num_experts), order

    def combine(self, y: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Expert outputs in sorted order -> in assignment order."""
        return torch.empty_like(y).index_copy(0, order, y)
