"""The sdpa backend must agree with the plain reference under every mask the models use."""

import pytest
import torch

from pretrain.models import attention as attn_mod
from pretrain.models.attention import attention, cu_seqlens_from_document_ids

B, S, HQ, D = 2, 12, 4, 8


def _qkv(seed: int, q_len: int = S, kv_len: int = S, kv_heads: int = HQ, requires_grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, q_len, HQ, D, generator=g)
    k, v = (torch.randn(B, kv_len, kv_heads, D, generator=g) for _ in range(2))
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def _docs() -> torch.Tensor:
    return torch.tensor([[0] * 5 + [1] * 4 + [2] * 3, [0] * 12])


def _key_mask() -> torch.Tensor:
    m = torch.ones(B, S, dtype=torch.long)
    m[1, 7:] = 0
    return m


CASES = {
    "full": dict(causal=False),
    "causal": dict(causal=True),
    "gqa_causal": dict(causal=True, kv_heads=2),
    "mqa": dict(causal=False, kv_heads=1),
    "documents": dict(causal=True, document_ids=_docs()),
    "documents_gqa": dict(causal=True, kv_heads=2, document_ids=_docs()),
    "padding": dict(causal=False, key_mask=_key_mask()),
    "bias_padding": dict(causal=False, key_mask=_key_mask(), bias=True, scale=1.0),
    "bias_causal": dict(causal=True, bias=True),
}


@pytest.mark.parametrize("name", CASES)
def test_sdpa_matches_reference(name):
    case = dict(CASES[name])
    q, k, v = _qkv(0, kv_heads=case.pop("kv_heads", HQ), requires_grad=True)
    if case.pop("bias", False):
        case["bias"] = torch.randn(1, HQ, S, S, generator=torch.Generator().manual_seed(1)).requires_grad_()
    outs, grads = [], []
    for backend in ("sdpa", "reference"):
        out = attention(q, k, v, backend=backend, **case)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
        tensors = [q, k, v] + ([case["bias"]] if "bias" in case else [])
        grads.append(torch.autograd.grad((out * weights).sum(), tensors))
        outs.append(out.detach())
    assert outs[0].shape == (B, S, HQ, D)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for g_sdpa, g_ref in zip(*grads):
        torch.testing.assert_close(g_sdpa, g_ref, atol=1e-5, rtol=1e-5)


def test_document_mask_equals_separate_documents():
    q, k, v = _qkv(3)
    docs = _docs()
    out = attention(q, k, v, causal=True, document_ids=docs)
    for start, end in ((0, 5), (5, 9), (9, 12)):
        alone = attention(q[:1, start:end], k[:1, start:end], v[:1, start:end], causal=True, backend="reference")
        torch.testing.assert_close(out[:1, start:end], alone, atol=1e-5, rtol=1e-5)
    # Row 1 is a single document: plain causal attention.
    torch.testing.assert_close(out[1:], attention(q[1:], k[1:], v[1:], causal=True), atol=1e-6, rtol=1e-6)


def test_explicit_mask_packs_continuations_after_a_shared_context():
    """A tree mask (context 0-3, then branches 4-7 and 8-11 seeing the context and themselves) gives each
    branch what it gets right after the context alone, with the positions of its own sequence."""
    from pretrain.evals.model import packed_mask

    q, k, v = _qkv(4)
    seg = torch.tensor([[0] * 4 + [1] * 4 + [2] * 4] * B)
    out = attention(q, k, v, causal=True, mask=packed_mask(seg))
    ref = attention(q, k, v, causal=True, mask=packed_mask(seg), backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for branch in (slice(4, 8), slice(8, 12)):
        idx = torch.cat([torch.arange(4), torch.arange(S)[branch]])
        alone = attention(q[:, idx], k[:, idx], v[:, idx], causal=True, backend="reference")
        torch.testing.assert_close(out[:, branch], alone[:, 4:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, :4], attention(q[:, :4], k[:, :4], v[:, :4], causal=True), atol=1e-6, rtol=1e-6)


def test_decode_step_sees_whole_past():
    """Causal masks are bottom-right aligned: the last query of a KV-cache step attends to every key."""
    q, k, v = _qkv(4)
    full = attention(q, k, v, causal=True)
    for backend in ("sdpa", "reference"):
        last = attention(q[:, -3:], k, v, causal=True, backend=backend)
        torch.testing.assert_close(last, full[:, -3:], atol=1e-5, rtol=1e-5)


def test_cu_seqlens():
    cu, max_len = cu_seqlens_from_document_ids(_docs())
    assert cu.tolist() == [0, 5, 9, 12, 24] and cu.dtype == torch.int32 and max_len == 12


def test_bad_backends_are_named():
    q, k, v = _qkv(5)
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'"):
        attention(q, k, v, causal=True, backend="xformers")
    if attn_mod.flash_attn_func is None:
        with pytest.raises(RuntimeError, match="flash-attn package"):
            attention(q, k, v, causal=True, backend="flash_attn")
    with pytest.raises(ValueError, match="not a multiple"):
        attention(q, k[:, :, :3], v[:, :, :3], causal=True)
