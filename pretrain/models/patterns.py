"""Sparse attention patterns (``model.sparse.*``): sliding window, global tokens and BigBird, as masks the
attention backends understand.

Patterns (``pattern``; indices are positions in the row, ``S`` its length):

* ``dense``: no pattern (the default).
* ``sliding_window``: query ``q`` sees key ``k`` when ``|q - k| < window``; causal models see the ``window``
  keys ending at ``q`` (Hugging Face Mistral/Qwen2 ``sliding_window = window``), bidirectional ones ``2 window - 1``.
* ``global_tokens = G`` (with either sparse pattern): the first ``G`` tokens see and are seen by every token
  (causal models: every later token; the causal mask still applies).
* ``bigbird`` (Zaheer et al. 2020, the block layout of its code): the row is cut into blocks of ``block_size``
  (which must divide ``S``); query block ``i`` sees key blocks ``|i - j| <= window_blocks // 2`` (causal: only
  ``j <= i``), the global blocks (the first ``global_tokens / block_size`` blocks; bidirectional: as many at the end
  too, as in the paper's ITC layout), and ``random_blocks`` other blocks drawn without replacement from those
  neither in its window nor global (causal: from the past), the same in every layer and head and a function of
  ``seed`` only.

The causal mask and document masking (``document_ids``) are ANDed on top, so patterns compose with packed
batches. Two kernels (``kernel``): ``mask`` gives :func:`pretrain.models.attention.attention` a boolean mask
(``[1, 1, q_len, kv_len]``, SDPA/reference; memory ``O(S^2)`` bits, compute dense); ``flex`` gives it a
``torch.nn.attention.flex_attention.BlockMask`` that ``flex_attention`` (compiled) runs on, skipping blocks that
are entirely masked, so time and memory grow with the pattern's nonzeros (CUDA: training and evaluation; CPU:
forward only, torch has no CPU backward for it).

API (for every family):

* :class:`SparseConfig`: the config section; ``validate(prefix)`` and ``length_problem(seq_len, key)``.
* :func:`mask_mod` ``(cfg, seq_len, causal, document_ids=None)``: flex's ``mask_mod(b, h, q, kv) -> bool``.
* :func:`pattern_mask` ``(cfg, q_len, kv_len, causal, device)``: boolean ``[q_len, kv_len]`` (True = may attend;
  ``q_len < kv_len`` aligns the queries to the end, as a KV-cache decode step needs).
* :func:`block_mask` ``(cfg, seq_len, causal, document_ids, device)``: the ``BlockMask`` (cached without
  documents); :func:`build_block_mask`: the same, always built.
* :func:`attention_mask_for` ``(cfg, q_len, kv_len, causal, document_ids, device, mask)``: what a model passes
  to ``attention(mask=...)``: None, a boolean mask ANDed with ``mask``, or a ``BlockMask`` (kernel ``flex``,
  self-attention without an explicit mask).
* :func:`flex_attend`: ``flex_attention`` in the ``[batch, seq, heads, dim]`` layout of
  :mod:`pretrain.models.attention`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

PATTERNS = ("dense", "sliding_window", "bigbird")
KERNELS = ("mask", "flex")
FLEX_BLOCK = 128  # flex_attention's tile (BlockMask granularity)
COMPILE_FLEX = True  # compile flex_attention and the BlockMask construction (fused, O(nonzeros)); tests switch
# it off to save compile time (eager flex computes densely)

_compiled_flex: Callable | None = None
_block_masks: dict[tuple, BlockMask] = {}  # document-free BlockMasks by (pattern, length, causal, device)


@dataclass
class SparseConfig:
    pattern: str = "dense"  # dense | sliding_window | bigbird (pretrain.models.patterns)
    window: int = 256  # sliding_window: a query sees keys fewer than `window` positions away (causal: window keys)
    global_tokens: int = 0  # the first N tokens see and are seen by all (bigbird: a multiple of block_size)
    block_size: int = 64  # bigbird: tokens per block (must divide the sequence length)
    window_blocks: int = 3  # bigbird: query block i sees key blocks i - w//2 .. i + w//2 (odd)
    random_blocks: int = 3  # bigbird: random key blocks per query block
    seed: int = 0  # bigbird: seed of the random blocks (identical in every layer and head)
    kernel: str = "mask"  # mask: SDPA with a boolean mask | flex: compiled flex_attention on a BlockMask

    @property
    def enabled(self) -> bool:
        return self.pattern != "dense"

    def validate(self, prefix: str = "model.sparse") -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"{prefix}.pattern={self.pattern!r}: expected one of {PATTERNS}")
        if self.kernel not in KERNELS:
            raise ValueError(f"{prefix}.kernel={self.kernel!r}: expected one of {KERNELS}")
        for key in ("window", "block_size", "window_blocks"):
            if getattr(self, key) < 1:
                raise ValueError(f"{prefix}.{key}={getattr(self, key)}: must be >= 1")
        for key in ("global_tokens", "random_blocks"):
            if getattr(self, key) < 0:
                raise ValueError(f"{prefix}.{key}={getattr(self, key)}: must be >= 0")
        if self.pattern == "bigbird":
            if self.window_blocks % 2 == 0:
                raise ValueError(f"{prefix}.window_blocks={self.window_blocks}: must be odd (the query block and "
                                 "as many blocks on each side)")
            if self.global_tokens % self.block_size:
                raise ValueError(f"{prefix}.global_tokens={self.global_tokens} is not a multiple of {prefix}."
                                 f"block_size={self.block_size}: bigbird's global tokens are whole blocks")

    def length_problem(self, seq_len: int, key: str = "data.seq_length", prefix: str = "model.sparse") -> str | None:
        """Why this pattern cannot run on sequences of ``seq_len`` (a message naming the keys), or None."""
        if not self.enabled:
            return None
        if self.global_tokens >= seq_len:
            return f"{prefix}.global_tokens={self.global_tokens} must be below {key}={seq_len}"
        if self.pattern == "bigbird" and seq_len % self.block_size:
            return (f"{prefix}.block_size={self.block_size} does not divide {key}={seq_len}: pick a block size "
                    f"dividing it (e.g. {_divisor_near(seq_len, self.block_size)})")
        return None


def _divisor_near(n: int, want: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - want), d))


def random_blocks(cfg: SparseConfig, num_blocks: int, causal: bool) -> torch.Tensor:
    """BigBird's random key blocks: boolean ``[num_blocks, num_blocks]`` (query block, key block)."""
    table = torch.zeros(num_blocks, num_blocks, dtype=torch.bool)
    gen = torch.Generator().manual_seed(cfg.seed)
    radius, glob = cfg.window_blocks // 2, cfg.global_tokens // cfg.block_size
    blocks = torch.arange(num_blocks)
    is_global = blocks < glob
    if not causal:
        is_global |= blocks >= num_blocks - glob
    for i in range(num_blocks):
        if is_global[i]:
            continue
        allowed = ~is_global & ((blocks - i).abs() > radius)
        if causal:
            allowed &= blocks < i
        candidates = blocks[allowed]
        pick = torch.randperm(len(candidates), generator=gen)[:cfg.random_blocks]
        table[i, candidates[pick]] = True
    return table


def mask_mod(cfg: SparseConfig, seq_len: int, causal: bool,
             document_ids: torch.Tensor | None = None) -> Callable:
    """``mask_mod(b, h, q, kv) -> bool`` of the pattern (causal and documents included) on a row of ``seq_len``;
    works on scalars (flex) and on broadcast index tensors (dense masks)."""
    g = cfg.global_tokens
    if cfg.pattern == "bigbird":
        bs, radius = cfg.block_size, cfg.window_blocks // 2
        table = random_blocks(cfg, -(-seq_len // bs), causal)  # a short last block (evaluation) is a block too
        if document_ids is not None:
            table = table.to(document_ids.device)
        tail = seq_len - (0 if causal else g)

        def sparse(q, kv):
            qb, kb = q // bs, kv // bs
            near = (qb - kb).abs() <= radius
            return near | table[qb, kb] | (q < g) | (kv < g) | (q >= tail) | (kv >= tail)
    else:
        window = cfg.window

        def sparse(q, kv):
            return ((q - kv).abs() < window) | (q < g) | (kv < g)

    def mod(b, h, q, kv):
        keep = sparse(q, kv)
        if causal:
            keep = keep & (q >= kv)
        if document_ids is not None:
            keep = keep & (document_ids[b, q] == document_ids[b, kv])
        return keep

    return mod


def pattern_mask(cfg: SparseConfig, q_len: int, kv_len: int, *, causal: bool,
                 device: torch.device | None = None) -> torch.Tensor:
    """Boolean ``[q_len, kv_len]`` (True = may attend) of the pattern, causal included; queries are the last
    ``q_len`` positions of the ``kv_len`` row."""
    mod = mask_mod(cfg, kv_len, causal)
    q = torch.arange(kv_len - q_len, kv_len)[:, None]
    kv = torch.arange(kv_len)[None, :]
    return mod(0, 0, q, kv).to(device)


def block_mask(cfg: SparseConfig, seq_len: int, *, causal: bool, document_ids: torch.Tensor | None = None,
               device: torch.device | None = None) -> BlockMask:
    """The pattern (causal and documents included) as a flex ``BlockMask`` over ``[batch or 1, seq, seq]``;
    without documents it is built once per (pattern, length, device) and reused (its construction costs about
    twice a compiled attention call on CPU)."""
    if document_ids is None:
        key = (repr(cfg), seq_len, causal, str(device))
        if key not in _block_masks:
            if len(_block_masks) >= 8:  # a handful of lengths (training, evaluation) at a time
                _block_masks.clear()
            _block_masks[key] = build_block_mask(cfg, seq_len, causal, None, device)
        return _block_masks[key]
    return build_block_mask(cfg, seq_len, causal, document_ids, device)


def build_block_mask(cfg: SparseConfig, seq_len: int, causal: bool, document_ids: torch.Tensor | None,
                      device: torch.device | None) -> BlockMask:
    """:func:`block_mask` without the cache."""
    batch = None if document_ids is None else document_ids.shape[0]
    return create_block_mask(mask_mod(cfg, seq_len, causal, document_ids), batch, None, seq_len, seq_len,
                             device=device, BLOCK_SIZE=FLEX_BLOCK, _compile=COMPILE_FLEX)


def attention_mask_for(cfg: SparseConfig, q_len: int, kv_len: int, *, causal: bool,
                       document_ids: torch.Tensor | None = None, device: torch.device | None = None,
                       mask: torch.Tensor | None = None) -> torch.Tensor | BlockMask | None:
    """The ``mask`` argument of :func:`pretrain.models.attention.attention` for this pattern (see the module
    docstring); ``document_ids`` are folded in only for a ``BlockMask`` (attention applies them otherwise)."""
    if not cfg.enabled:
        return mask
    if cfg.kernel == "flex" and q_len == kv_len and mask is None:
        return block_mask(cfg, kv_len, causal=causal, document_ids=document_ids, device=device)
    pattern = pattern_mask(cfg, q_len, kv_len, causal=causal, device=device)[None, None]
    return pattern if mask is None else mask & pattern


def flex_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask, scale: float) -> torch.Tensor:
    """``flex_attention`` on ``[batch, seq, heads, dim]`` tensors (grouped-query K/V allowed)."""
    global _compiled_flex
    if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
        raise RuntimeError("model.sparse.kernel=flex: flex_attention has no backward on CPU (torch "
                           f"{torch.__version__}); train on CPU with model.sparse.kernel=mask")
    fn = flex_attention
    if COMPILE_FLEX:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        fn = _compiled_flex
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask, scale=scale,
             enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)
