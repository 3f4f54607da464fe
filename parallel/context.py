"""Context parallelism: each sequence split over the ``cp`` ranks of a context group, attention kept exact.

Contract (``parallel.cp = N``; the checks are :func:`validate_context_parallel`):

* **Load-balanced causal split.** A sequence of ``S`` tokens is cut into ``2N`` equal chunks; context rank ``r``
  holds chunk ``r`` and its mirror ``2N - 1 - r`` (:func:`chunk_index`), so every rank gets the same share of the
  causal triangle (Megatron-Core's and torchtitan's head-tail split). :func:`split_batch` applies it to every
  ``[batch, S]`` tensor of a micro-batch (tokens, labels, loss mask, position ids, document ids); the engine
  does this before the forward (:class:`pretrain.parallel.context_engine.ContextParallelEngine`). An
  encoder-decoder's decoder tensors (``[batch, S_dec]``, the length of ``decoder_input_ids``) are split the same
  way by their own length.
* **Positions and documents come from the global sequence.** Position ids are the data's (reset per document,
  sliced like the tokens) or, when the batch has none, the tokens' global indices; document ids are sliced
  and all-gathered once per forward. Documents may span chunk borders and are never padded: the attention
  mask is a function of global indices and document ids only (:func:`context_mask`); a sparse pattern
  (``model.sparse``) is ANDed onto it in global positions, and dynamic NTK RoPE reads the longest position over
  the group (:meth:`ContextParallel.longest`).
* **Attention** (``parallel.cp_comm``). ``all_gather``: each layer all-gathers the context group's keys and
  values (one collective for both) and attends its local queries to the whole sequence under the exact mask;
  the backward reduce-scatters ``dK``/``dV`` to their owners (:class:`_GatherSequence`). This is Llama 3's
  choice for document-masked context parallelism: the gathered K/V (``2 * S * kv_heads * head_dim`` per layer)
  is small next to the ``S / N x S`` scores; the local block runs on the configured backend with an explicit
  mask (SDPA). ``ring``: K/V blocks passed rank to rank, online-softmax merging
  (:mod:`pretrain.parallel.ring`); masks are built a tile at a time and tiles causality hides are skipped.
* **Bidirectional attention** (encoders): :meth:`ContextParallel.forward_state` takes ``causal=False`` (the
  layers pass the same to :meth:`ContextAttention.attention`): every query sees keys before and after it, so
  the ring skips no tile for causality. ``key_mask`` (the batch's padding mask, this rank's chunks) is
  all-gathered once per forward and hides padding keys from every query; a layer's own pattern in global
  positions (a local window) shares the gathered ids through :meth:`ContextAttention.with_pattern`, whose
  ``reach`` (the window's half width) lets the ring skip the tiles beyond it. A query may then see no key at all
  (a padding token among padding in its window): its output is 0 on both paths, its gradient 0.
  :meth:`ContextParallel.first` hands every rank the sequence's first token (BERT's [CLS], on rank 0).
* **Where it is active.** The model's layer factory carries a :class:`ContextParallel` (``factory.cp``); it
  splits attention only inside :meth:`ContextParallel.sharding` (the engine's train and eval steps). Anything
  else that runs the model (scoring evaluation tasks, generation) sees full sequences, replicated over the
  context ranks like over data ranks.
* **T5** (:mod:`pretrain.models.t5.model`): self- and cross-attention take the group's K/V through
  :meth:`ContextParallel.whole` (``all_gather``, global order) or the ring with the relative position bias added
  per tile (:mod:`pretrain.parallel.context_t5`); the bias, the decoder's causal mask, the encoder's padding
  mask and sparse pattern are computed by the model in global positions.
* **Loss and gradients.** Each rank's loss is its tokens' sum; the engines divide by the global token count
  summed over the whole data group (context ranks included) and sum gradients over it, which equals one
  process on the whole sequence.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from pretrain.config import Config
from pretrain.configlib import need
from pretrain.models.attention import attention
from pretrain.parallel.ring import RingAttention, RingPlan

# T5: its relative position bias over global positions (pretrain.models.t5.model); encoder: bidirectional masks
FAMILIES = ("gpt", "t5", "encoder")


def validate_context_parallel(cfg: Config) -> None:
    """The checks of ``parallel.cp > 1`` that need no world size (run by the layout validator)."""
    p, seq = cfg.parallel, cfg.data.seq_length
    need(cfg.family in FAMILIES, f"parallel.cp={p.cp}: context parallelism supports the families {FAMILIES}, not "
                                 f"model.family={cfg.family}; use parallel.cp=1 (tensor parallelism with "
                                 f"parallel.sp=true also shards the sequence)")
    need(seq % (2 * p.cp) == 0, f"parallel.cp={p.cp} needs data.seq_length ({seq}) divisible by 2 x cp = "
                                f"{2 * p.cp} (each rank holds a chunk from the front and its mirror from the "
                                f"back); pick parallel.cp so that 2 x cp divides {seq}, or change data.seq_length")
    need(not p.sp or (seq // p.cp) % p.tp == 0,
         f"parallel.cp={p.cp} with parallel.sp and tp={p.tp} needs data.seq_length / cp = {seq / p.cp:g} "
         f"divisible by tp (sequence parallelism splits each rank's part further); change data.seq_length or tp")
    if cfg.family == "t5":  # the decoder's sequence is split by its own length
        dec = cfg.data.decoder_seq_length
        need(dec % (2 * p.cp) == 0 and (not p.sp or (dec // p.cp) % p.tp == 0),
             f"parallel.cp={p.cp} needs data.decoder_seq_length ({dec}) divisible by 2 x cp = {2 * p.cp}"
             f"{f' and by 2 x cp x tp = {2 * p.cp * p.tp} (parallel.sp)' if p.sp else ''}; pad the targets to a "
             f"multiple of it with data.decoder_seq_length, or change parallel.cp")
    need(cfg.model.attention_backend != "flash_attn",
         f"parallel.cp={p.cp} with model.attention_backend=flash_attn: each rank's attention block takes an "
         f"explicit mask from global positions and document ids, which flash-attn cannot; use "
         f"model.attention_backend=auto (SDPA for these blocks) or sdpa")


def chunk_index(rank: int, size: int, local_len: int, device: torch.device | None = None) -> torch.Tensor:
    """Global token indices ``[local_len]`` held by context rank ``rank`` of ``size``: chunk ``rank`` then chunk
    ``2 * size - 1 - rank`` of the ``2 * size`` equal chunks."""
    half = local_len // 2
    front = torch.arange(rank * half, (rank + 1) * half, device=device)
    return torch.cat([front, front + (2 * size - 1 - 2 * rank) * half])


def split_batch(batch: dict[str, torch.Tensor], rank: int, size: int) -> dict[str, torch.Tensor]:
    """Context rank ``rank``'s part of every ``[batch, seq]`` tensor of ``batch`` (others are kept whole); ``seq``
    is the length of ``input_ids`` or, for an encoder-decoder's decoder side, of ``decoder_input_ids``."""
    lengths = {batch[k].shape[1] for k in ("input_ids", "decoder_input_ids") if k in batch}
    for seq in lengths:
        if seq % (2 * size):
            raise ValueError(f"sequence length {seq} is not divisible by 2 x parallel.cp = {2 * size}")
    return {k: v.index_select(1, chunk_index(rank, size, v.shape[1] // size, v.device))
            if v.dim() >= 2 and v.shape[1] in lengths else v for k, v in batch.items()}


def context_mask(q_index: torch.Tensor, k_index: torch.Tensor, *, causal: bool, q_docs: torch.Tensor | None = None,
                 k_docs: torch.Tensor | None = None) -> torch.Tensor | None:
    """Boolean mask ``[batch or 1, 1, q, k]`` (True = may attend) from global token indices ``[q]`` / ``[k]`` and
    optional document ids ``[batch, q]`` / ``[batch, k]``; None when nothing is masked."""
    mask = (k_index[None, :] <= q_index[:, None])[None, None] if causal else None
    if q_docs is not None:
        same = (q_docs[:, :, None] == k_docs[:, None, :])[:, None]
        mask = same if mask is None else mask & same
    return mask


def _nearest(q: torch.Tensor, k: torch.Tensor) -> int:
    """The smallest ``|i - j|`` over ``i`` in ``q`` and ``j`` in ``k`` (host index tensors)."""
    k = k.sort().values
    at = torch.searchsorted(k, q)
    after, before = k[at.clamp(max=len(k) - 1)], k[(at - 1).clamp(min=0)]
    return int(torch.minimum((after - q).abs(), (before - q).abs()).min())


def _gather(x: torch.Tensor, dim: int, group: ProcessGroup) -> torch.Tensor:
    """Concatenate ``x`` over ``group`` along ``dim``, in rank order."""
    local = x.movedim(dim, 0).contiguous()
    out = local.new_empty((dist.get_world_size(group) * local.shape[0], *local.shape[1:]))
    dist.all_gather_into_tensor(out, local, group=group)
    return out.movedim(0, dim)


class _GatherSequence(torch.autograd.Function):
    """All-gather along ``dim``; backward sums each rank's slice of the gradient over the group (reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        full = grad.movedim(ctx.dim, 0).contiguous()
        out = full.new_empty((full.shape[0] // dist.get_world_size(ctx.group), *full.shape[1:]))
        dist.reduce_scatter_tensor(out, full, group=ctx.group)
        return out.movedim(0, ctx.dim), None, None


class ContextAttention:
    """One forward's context-parallel attention: the global indices and document ids of the local queries and of
    all keys (in gathered order), from which any tile of the mask is computed; shared by the layers."""

    def __init__(self, group: ProcessGroup, comm: str, q_index: torch.Tensor, k_index: torch.Tensor,
                 q_docs: torch.Tensor | None, k_docs: torch.Tensor | None, pattern=None,
                 device: torch.device | None = None, k_keep: torch.Tensor | None = None):
        """``q_index``/``k_index``: CPU tensors (the ring decides on the host which tiles to skip); the masks are
        built on ``device``. ``k_keep``: bool ``[batch, S]`` in gathered order, False on padding keys."""
        self.group, self.comm, self._host = group, comm, (q_index, k_index)
        self.q_index, self.k_index, self.q_docs, self.k_docs = q_index.to(device), k_index.to(device), q_docs, k_docs
        self.pattern = pattern  # (q [q, 1], k [1, k]) -> bool [q, k] in global positions (a sparse pattern), or None
        self.k_keep = k_keep
        self.reach: int | None = None  # with_pattern's window: the largest |i - j| it lets through (None: any)
        self._full: dict[bool, torch.Tensor | None] = {}

    def mask(self, causal: bool, rows: slice = slice(None), cols: slice = slice(None)) -> torch.Tensor | None:
        """Mask ``[batch or 1, 1, rows, cols]`` of local query ``rows`` x gathered key ``cols``."""
        q, k = self.q_index[rows], self.k_index[cols]
        docs = self.q_docs is not None
        mask = context_mask(q, k, causal=causal, q_docs=self.q_docs[:, rows] if docs else None,
                            k_docs=self.k_docs[:, cols] if docs else None)
        if self.pattern is not None:  # evaluated on the host indices, then moved (no device sync)
            q_host, k_host = self._host
            keep = self.pattern(q_host[rows][:, None], k_host[cols][None, :]).to(q.device)[None, None]
            mask = keep if mask is None else mask & keep
        if self.k_keep is not None:
            keys = self.k_keep[:, None, None, cols]
            mask = keys if mask is None else mask & keys
        return mask

    def with_pattern(self, pattern, reach: int | None = None) -> ContextAttention:
        """This forward's attention with ``pattern`` (global positions) in place of its own, sharing the gathered
        document ids and padding (e.g. an encoder's local layers: a window). ``reach``: the largest ``|i - j|``
        the pattern lets through (a window's half width); the ring skips the tiles beyond it."""
        att = ContextAttention(self.group, self.comm, *self._host, self.q_docs, self.k_docs, pattern,
                               self.q_index.device, self.k_keep)
        att.reach = reach
        return att

    def visible(self, causal: bool, rows: slice, cols: slice) -> bool:
        """False when causality or the window :attr:`reach` alone hides every key of ``cols`` from the query
        ``rows`` (decided on the host indices, no device sync)."""
        q, k = self._host[0][rows], self._host[1][cols]
        if causal and int(q.max()) < int(k.min()):
            return False
        return self.reach is None or _nearest(q, k) <= self.reach

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, backend: str = "auto",
                  document_ids=None, mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
        """:func:`pretrain.models.attention.attention` over the whole sequence for this rank's queries
        (``document_ids`` are this forward's, already in the mask). ``all_gather``: the gathered K/V on
        ``backend`` with the whole mask (built once per forward); ``ring``:
        :class:`pretrain.parallel.ring.RingAttention` (fp32 math, masks built a tile at a time)."""
        if mask is not None:
            raise ValueError("an explicit attention mask is not split over context-parallel ranks; evaluate "
                             "without context parallelism")
        if self.comm == "ring":
            local = q.shape[1]
            block = lambda src: slice(src * local, (src + 1) * local)  # noqa: E731
            plan = RingPlan(self.group, lambda src, rows: self.mask(causal, rows, block(src)),
                            lambda src, rows: self.visible(causal, rows, block(src)), scale,
                            causal_only=causal and self.q_docs is None and self.pattern is None and
                            self.k_keep is None)
            return RingAttention.apply(q, k, v, plan)
        if causal not in self._full:
            self._full[causal] = self.mask(causal)
        kv = _GatherSequence.apply(torch.stack([k, v]), 2, self.group)
        return attention(q, kv[0], kv[1], causal=False, backend=backend, mask=self._full[causal], scale=scale)


class ContextParallel:
    """This rank's place in its context group; the layer factory carries it (``factory.cp``)."""

    def __init__(self, group: ProcessGroup, comm: str = "all_gather"):
        self.group, self.size, self.rank = group, dist.get_world_size(group), dist.get_rank(group)
        self.comm, self.enabled = comm, False
        self._orders: dict[tuple[int, torch.device], torch.Tensor] = {}  # whole()'s gathered -> global order

    @contextlib.contextmanager
    def sharding(self):
        """Within this block, model forwards take context-parallel micro-batches (see the module docstring)."""
        self.enabled = True
        try:
            yield
        finally:
            self.enabled = False

    def split(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return split_batch(batch, self.rank, self.size)

    def positions(self, local_len: int, device: torch.device) -> torch.Tensor:
        """Global indices ``[1, local_len]`` of this rank's tokens (positions when the batch brings none)."""
        return chunk_index(self.rank, self.size, local_len, device)[None]

    def whole(self, x: torch.Tensor) -> torch.Tensor:
        """Every context rank's ``x`` ``[batch, local, ...]`` as ``[batch, S, ...]`` in global token order (layers
        that decide over the whole sequence: MoE capacity, dropping, aux losses); backward: reduce-scatter."""
        if not self.enabled:
            return x
        key = (x.shape[1], x.device)
        if key not in self._orders:  # built on the host and moved once per length and device
            self._orders[key] = self.gathered_index(x.shape[1]).argsort().to(x.device)
        return _GatherSequence.apply(x, 1, self.group).index_select(1, self._orders[key])

    def gathered_index(self, local_len: int, device: torch.device | None = None) -> torch.Tensor:
        """Global indices of the context group's tokens in gathered order (rank 0's chunks, then rank 1's, ...:
        the order of an all-gather and of the ring's blocks)."""
        return torch.cat([chunk_index(r, self.size, local_len, device) for r in range(self.size)])

    def gathered(self, x: torch.Tensor) -> torch.Tensor:
        """Every context rank's ``x`` ``[batch, local, ...]`` in gathered order (no gradient: ids and masks)."""
        return _gather(x, 1, self.group)

    def first(self, x: torch.Tensor) -> torch.Tensor:
        """The sequence's first token ``x[:, 0]`` (held by context rank 0) on every context rank, e.g. BERT's [CLS]
        for its next-sentence head; backward: the ranks' gradients summed into rank 0's token."""
        if not self.enabled:
            return x[:, 0]
        return _GatherSequence.apply(x[:, :1], 1, self.group)[:, 0]

    def mine(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's tokens ``[batch, local, ...]`` of a whole-sequence ``x`` (the inverse of :meth:`whole`)."""
        if not self.enabled:
            return x
        return x.index_select(1, chunk_index(self.rank, self.size, x.shape[1] // self.size, x.device))

    def longest(self, pos: torch.Tensor) -> int:
        """The largest of ``pos`` over the context group (dynamic NTK RoPE reads the whole sequence's)."""
        top = pos.max().reshape(1)
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.group)
        return int(top)

    def forward_state(self, local_len: int, document_ids: torch.Tensor | None, device: torch.device,
                      sparse=None, causal: bool = True,
                      key_mask: torch.Tensor | None = None) -> ContextAttention | None:
        """The attention of one forward over ``local_len`` local tokens; None outside :meth:`sharding`.
        ``sparse``: a :class:`pretrain.models.patterns.SparseConfig`; its pattern is ANDed on in global positions.
        ``causal``: the pattern's (the layers pass their own to :meth:`ContextAttention.attention`); ``key_mask``:
        this rank's ``[batch, local_len]`` padding mask (1 = token), gathered once and ANDed on."""
        if not self.enabled:
            return None
        q_index = chunk_index(self.rank, self.size, local_len)  # on the host; ContextAttention moves them
        k_index = self.gathered_index(local_len)
        k_docs = None if document_ids is None else self.gathered(document_ids)
        k_keep = None if key_mask is None else self.gathered(key_mask).bool()
        pattern = None
        if sparse is not None and sparse.enabled:
            from pretrain.models.patterns import mask_mod

            mod = mask_mod(sparse, local_len * self.size, causal)
            pattern = lambda q, k: mod(0, 0, q, k)  # noqa: E731
        return ContextAttention(self.group, self.comm, q_index, k_index, document_ids, k_docs, pattern, device, k_keep)
