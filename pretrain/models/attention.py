"""One attention function, interchangeable backends.

Every model calls :func:`attention`; the backend is a config string (``model.attention_backend``) so a run can
move from CPU to GPU without touching model code, and tests can compare each against ``reference``:

* ``auto`` (default): flash-attn where it is installed and supports the call, SDPA otherwise.
* ``flash_attn``: the same choice, but it is an error when flash-attn is not installed, and every kind of call
  flash-attn cannot take falls back to SDPA with one log line (once per kind, not per call): tensors off CUDA,
  fp32 tensors (evaluation runs without autocast), an explicit ``mask`` (packed evaluation), ``key_mask``,
  ``bias``, head dims above 256. Config validation refuses what could never use it (T5's relative biases).
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``.
* ``reference``: textbook fp32 math, for tests.

Layout is flash-attn's: ``q`` ``[batch, q_len, q_heads, head_dim]``, ``k``/``v`` ``[batch, kv_len, kv_heads,
head_dim]``, output like ``q``. ``q_heads`` must be a multiple of ``kv_heads`` (grouped-query attention; query
head ``i`` reads kv head ``i // (q_heads // kv_heads)``).

Masks (all optional, combined with AND):

* ``causal``: query ``i`` sees keys ``<= i + kv_len - q_len`` (bottom-right aligned, so a KV-cache decode step
  with ``q_len < kv_len`` sees the whole past, as flash-attn does).
* ``document_ids`` ``[batch, seq]`` (self-attention only): tokens see only tokens of the same document. Pass a
  :class:`DocumentMask` to share what is derived from the ids between the layers of one forward (flash-attn's
  varlen metadata needs two host syncs, done once per forward instead of once per layer).
* ``key_mask`` ``[batch, kv_len]`` (1/True = real token): padding keys are hidden.
* ``mask`` ``[batch or 1, 1, q_len, kv_len]`` (True = may attend): any other pattern, e.g. the tree of several
  continuations packed after one shared context that evaluation scores in one pass.
* ``bias`` ``[batch or 1, q_heads, q_len, kv_len]``: added to the scores (T5 relative position bias).
* ``mask`` may instead be a flex ``BlockMask`` (a sparse pattern of :mod:`pretrain.models.patterns` with
  ``kernel=flex``): it already holds the causal and document masks, and ``flex_attention`` runs it on any backend.

With an explicit mask or bias SDPA gets K/V expanded to the query heads: CUDA's mask-taking kernels (memory-
efficient, cuDNN) do not take grouped-query K/V, and SDPA would fall back to its math kernel (fp32
``[batch, heads, q_len, kv_len]`` scores).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from pretrain.models.patterns import BlockMask, flex_attend

try:  # flash-attn is optional (GPU only); import-safe without it
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = flash_attn_varlen_func = None

BACKENDS = ("auto", "sdpa", "flash_attn", "reference")
FLASH_DEVICES = ("cuda",)
FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MAX_HEAD_DIM = 256

log = logging.getLogger(__name__)
_logged_fallbacks: set[str] = set()


class DocumentMask:
    """The document ids ``[batch, seq]`` of one forward; flash-attn's varlen metadata is derived from them on
    first use and reused by every later layer (and by activation-checkpointing recomputation)."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids
        self._varlen: tuple[torch.Tensor, int] | None = None

    def varlen(self) -> tuple[torch.Tensor, int]:
        """``(cu_seqlens, max_seqlen)`` of :func:`cu_seqlens_from_document_ids`, computed once."""
        if self._varlen is None:
            self._varlen = cu_seqlens_from_document_ids(self.ids)
        return self._varlen


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, backend: str = "auto",
              document_ids: torch.Tensor | DocumentMask | None = None, key_mask: torch.Tensor | None = None,
              bias: torch.Tensor | None = None, scale: float | None = None,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention; see the module docstring for shapes, masks and backends."""
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} kv heads")
    if document_ids is not None and q.shape[1] != k.shape[1]:
        raise ValueError("document_ids need self-attention (q_len == kv_len); drop them for KV-cache decoding")
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    docs = DocumentMask(document_ids) if isinstance(document_ids, torch.Tensor) else document_ids
    if isinstance(mask, BlockMask):  # a sparse pattern (pretrain.models.patterns), causal and documents inside
        return flex_attend(q, k, v, mask, scale)
    if backend in ("auto", "flash_attn"):
        if backend == "flash_attn" and flash_attn_func is None:
            raise RuntimeError("model.attention_backend=flash_attn needs the flash-attn package (GPU only); "
                               "install it or set model.attention_backend=auto")
        reason = flash_unsupported(q, key_mask, bias, mask)
        if reason is None:
            return _flash(q, k, v, causal, docs, scale)
        if backend == "flash_attn" and reason not in _logged_fallbacks:
            _logged_fallbacks.add(reason)
            log.warning("model.attention_backend=flash_attn: flash-attn cannot take %s; such calls use sdpa "
                        "(logged once)", reason)
        backend = "sdpa"
    ids = None if docs is None else docs.ids
    if backend == "sdpa":
        return _sdpa(q, k, v, causal, ids, key_mask, bias, scale, mask)
    return _reference(q, k, v, causal, ids, key_mask, bias, scale, mask)


def flash_unsupported(q: torch.Tensor, key_mask: torch.Tensor | None, bias: torch.Tensor | None,
                      mask: torch.Tensor | None) -> str | None:
    """Why flash-attn cannot compute this call (a phrase for the log), or None when it can."""
    if flash_attn_func is None:
        return "any call (flash-attn is not installed)"
    if q.device.type not in FLASH_DEVICES:
        return f"{q.device.type} tensors"
    if q.dtype not in FLASH_DTYPES:
        return f"{q.dtype} tensors (it computes in fp16/bf16: train with train.precision=bf16)"
    if mask is not None:
        return "an explicit attention mask (packed evaluation)"
    if bias is not None:
        return "an attention bias"
    if key_mask is not None:
        return "a padding mask"
    if q.shape[-1] > FLASH_MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} (at most {FLASH_MAX_HEAD_DIM})"
    return None


def attention_mask(q_len: int, kv_len: int, *, causal: bool, document_ids: torch.Tensor | None = None,
                   key_mask: torch.Tensor | None = None, device: torch.device | None = None,
                   mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """Boolean mask ``[batch or 1, 1, q_len, kv_len]`` (True = may attend), or None when nothing is masked."""
    if causal:
        offset = kv_len - q_len
        causal_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(offset)[None, None]
        mask = causal_mask if mask is None else mask & causal_mask
    if document_ids is not None:
        same = (document_ids[:, :, None] == document_ids[:, None, :])[:, None]
        mask = same if mask is None else mask & same
    if key_mask is not None:
        keys = key_mask.bool()[:, None, None, :]
        mask = keys if mask is None else mask & keys
    return mask


def _sdpa(q, k, v, causal, document_ids, key_mask, bias, scale, mask=None):
    q_len, kv_len = q.shape[1], k.shape[1]
    # The fast path: no explicit mask, the kernel skips masked blocks itself.
    plain_causal = (causal and q_len == kv_len and document_ids is None and key_mask is None and bias is None
                    and mask is None)
    mask = None if plain_causal else attention_mask(q_len, kv_len, causal=causal and q_len > 1,
                                                    document_ids=document_ids, key_mask=key_mask, device=q.device,
                                                    mask=mask)
    if bias is not None:
        bias = bias.to(q.dtype)
        mask = bias if mask is None else torch.where(mask, bias, float("-inf"))
    if mask is not None:  # the mask-taking CUDA kernels want K/V per query head (see the module docstring)
        k, v = expand_kv(k, q.shape[2]), expand_kv(v, q.shape[2])
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         is_causal=plain_causal, scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[b, s, kv_heads, d]`` -> ``[b, s, heads, d]``, query head ``i`` reading kv head ``i // group``."""
    b, s, kv_heads, d = x.shape
    if kv_heads == heads:
        return x
    return x[:, :, :, None].expand(b, s, kv_heads, heads // kv_heads, d).reshape(b, s, heads, d)


def _reference(q, k, v, causal, document_ids, key_mask, bias, scale, mask=None):
    """Textbook softmax(q k^T * scale + bias) v in fp32; slow, for tests only."""
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, expand_kv(k, q.shape[2]), expand_kv(v, q.shape[2])))
    scores = qf @ kf.transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias.float()
    mask = attention_mask(q.shape[1], k.shape[1], causal=causal, document_ids=document_ids, key_mask=key_mask,
                          device=q.device, mask=mask)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ vf).transpose(1, 2).to(q.dtype)


def cu_seqlens_from_document_ids(document_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative sequence lengths (int32, flash-attn varlen format) of the documents in ``[batch, seq]``.

    A document is a maximal run of equal ids within one row; rows never share a document.
    """
    b, s = document_ids.shape
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    idx = starts.flatten().nonzero().flatten()
    cu = torch.cat([idx, idx.new_tensor([b * s])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def _flash(q, k, v, causal, docs: DocumentMask | None, scale):
    if docs is None:
        return flash_attn_func(q, k, v, causal=causal, softmax_scale=scale)
    b, s = docs.ids.shape
    cu, max_len = docs.varlen()
    out = flash_attn_varlen_func(q.reshape(b * s, *q.shape[2:]), k.reshape(b * s, *k.shape[2:]),
                                 v.reshape(b * s, *v.shape[2:]), cu, cu, max_len, max_len,
                                 causal=causal, softmax_scale=scale)
    return out.view_as(q)
