"""One attention function, three interchangeable backends.

Every model calls :func:`attention`; the backend is a config string so a run can move from CPU (``sdpa``) to
GPU (``flash_attn``) without touching model code, and tests can compare both against ``reference``.

Layout is flash-attn's: ``q`` ``[batch, q_len, q_heads, head_dim]``, ``k``/``v`` ``[batch, kv_len, kv_heads,
head_dim]``, output like ``q``. ``q_heads`` must be a multiple of ``kv_heads`` (grouped-query attention; query
head ``i`` reads kv head ``i // (q_heads // kv_heads)``).

Masks (all optional, combined with AND):

* ``causal``: query ``i`` sees keys ``<= i + kv_len - q_len`` (bottom-right aligned, so a KV-cache decode step
  with ``q_len < kv_len`` sees the whole past, as flash-attn does).
* ``document_ids`` ``[batch, seq]`` (self-attention only): tokens see only tokens of the same document.
* ``key_mask`` ``[batch, kv_len]`` (1/True = real token): padding keys are hidden.
* ``mask`` ``[batch or 1, 1, q_len, kv_len]`` (True = may attend): any other pattern, e.g. the tree of several
  continuations packed after one shared context that evaluation scores in one pass.
* ``bias`` ``[batch or 1, q_heads, q_len, kv_len]``: added to the scores (T5 relative position bias).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

try:  # flash-attn is optional (GPU only); import-safe without it
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = flash_attn_varlen_func = None

BACKENDS = ("sdpa", "flash_attn", "reference")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, backend: str = "sdpa",
              document_ids: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
              bias: torch.Tensor | None = None, scale: float | None = None,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention; see the module docstring for shapes and mask semantics."""
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} kv heads")
    if document_ids is not None and q.shape[1] != k.shape[1]:
        raise ValueError("document_ids need self-attention (q_len == kv_len); drop them for KV-cache decoding")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if backend == "sdpa":
        return _sdpa(q, k, v, causal, document_ids, key_mask, bias, scale, mask)
    if backend == "flash_attn":
        if mask is not None:
            raise ValueError("the flash_attn backend takes no explicit mask; use model.attention_backend=sdpa")
        return _flash(q, k, v, causal, document_ids, key_mask, bias, scale)
    if backend == "reference":
        return _reference(q, k, v, causal, document_ids, key_mask, bias, scale, mask)
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")


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
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         is_causal=plain_causal, scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def _reference(q, k, v, causal, document_ids, key_mask, bias, scale, mask=None):
    """Textbook softmax(q k^T * scale + bias) v in fp32; slow, for tests only."""
    groups = q.shape[2] // k.shape[2]
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))
    kf, vf = kf.repeat_interleave(groups, dim=1), vf.repeat_interleave(groups, dim=1)
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


def _flash(q, k, v, causal, document_ids, key_mask, bias, scale):
    if flash_attn_func is None:
        raise RuntimeError("attention backend 'flash_attn' needs the flash-attn package (GPU only); "
                           "install it or set model.attention_backend=sdpa")
    if bias is not None or key_mask is not None:
        raise ValueError("the flash_attn backend supports causal and document masking only; "
                         "use model.attention_backend=sdpa for attention bias or padding masks")
    if document_ids is None:
        return flash_attn_func(q, k, v, causal=causal, softmax_scale=scale)
    b, s = document_ids.shape
    cu, max_len = cu_seqlens_from_document_ids(document_ids)
    out = flash_attn_varlen_func(q.reshape(b * s, *q.shape[2:]), k.reshape(b * s, *k.shape[2:]),
                                 v.reshape(b * s, *v.shape[2:]), cu, cu, max_len, max_len,
                                 causal=causal, softmax_scale=scale)
    return out.view_as(q)
