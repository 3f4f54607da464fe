"""The attention backends: sdpa agrees with the plain reference under every mask the models use and hands
SDPA K/V a fused kernel takes; flash-attn (a stand-in here) is chosen where it can run, fed its varlen metadata
once per forward, and every call it cannot take falls back to sdpa."""

import logging
import sys
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


# --- flash-attn: chosen automatically where it can run, fed once per forward, never a crash -------------------

class FakeFlashAttn(types.ModuleType):
    """Stand-in for the ``flash_attn`` package (GPU only): refuses what the real kernels refuse (fp32, head dims
    above 256), computes the reference attention and records every call."""

    def __init__(self):
        super().__init__("flash_attn")
        self.calls: list[dict] = []

    def _check(self, q):
        if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] > 256:
            raise RuntimeError("FlashAttention only supports fp16 and bf16 data type, head dim <= 256")

    def flash_attn_func(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        self._check(q)
        self.calls.append(dict(kind="func", q_heads=q.shape[2], kv_heads=k.shape[2], causal=causal))
        return attention(q, k, v, causal=causal, scale=softmax_scale, backend="reference")

    def flash_attn_varlen_func(self, q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None,
                               causal=False):
        self._check(q)
        assert cu_q.dtype == torch.int32 and type(max_q) is int and cu_q is cu_k and max_q == max_k
        self.calls.append(dict(kind="varlen", cu=cu_q, max=max_q, causal=causal))
        bounds = cu_q.tolist()
        return torch.cat([attention(q[None, a:z], k[None, a:z], v[None, a:z], causal=causal, scale=softmax_scale,
                                    backend="reference")[0] for a, z in zip(bounds, bounds[1:])])


@pytest.fixture
def fake_flash(monkeypatch):
    fake = FakeFlashAttn()
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    monkeypatch.setattr(attn_mod, "flash_attn_func", fake.flash_attn_func)
    monkeypatch.setattr(attn_mod, "flash_attn_varlen_func", fake.flash_attn_varlen_func)
    monkeypatch.setattr(attn_mod, "FLASH_DEVICES", ("cuda", "cpu"))  # the stand-in runs on CPU
    monkeypatch.setattr(attn_mod, "_logged_fallbacks", set())
    return fake


def _bf16(*tensors):
    return [t.bfloat16() for t in tensors]


def test_auto_is_the_default_and_uses_flash_attn_when_it_can(fake_flash):
    from pretrain.models.gpt.config import GPTConfig
    from pretrain.models.t5.config import T5Config

    assert GPTConfig().attention_backend == "auto" and T5Config().attention_backend == "auto"
    q, k, v = _bf16(*_qkv(6, kv_heads=2))
    out = attention(q, k, v, causal=True)
    assert fake_flash.calls == [dict(kind="func", q_heads=HQ, kv_heads=2, causal=True)]  # GQA K/V as they are
    torch.testing.assert_close(out, attention(q, k, v, causal=True, backend="sdpa"), atol=1e-2, rtol=1e-2)
    out = attention(q, k, v, causal=True, document_ids=_docs())
    assert fake_flash.calls[-1]["kind"] == "varlen" and fake_flash.calls[-1]["cu"].tolist() == [0, 5, 9, 12, 24]
    torch.testing.assert_close(out, attention(q, k, v, causal=True, document_ids=_docs(), backend="sdpa"),
                               atol=1e-2, rtol=1e-2)


def _tree_mask():
    from pretrain.evals.model import packed_mask

    return packed_mask(torch.tensor([[0] * 4 + [1] * 4 + [2] * 4] * B))


FLASH_CANNOT = {  # what flash-attn cannot take -> (dtype, attention() keywords)
    "fp32 tensors (evaluation without autocast)": (torch.float32, lambda: {}),
    "explicit mask (packed evaluation)": (torch.bfloat16, lambda: dict(mask=_tree_mask())),
    "padding mask": (torch.bfloat16, lambda: dict(key_mask=_key_mask())),
    "bias (T5)": (torch.bfloat16, lambda: dict(bias=torch.randn(1, HQ, S, S, generator=torch.Generator().manual_seed(1))
                                               .bfloat16())),
}


@pytest.mark.parametrize("backend", ["auto", "flash_attn"])
def test_calls_flash_attn_cannot_take_fall_back_to_sdpa_logging_once(fake_flash, caplog, backend):
    for name, (dtype, kwargs) in FLASH_CANNOT.items():
        q, k, v = (t.to(dtype) for t in _qkv(7))
        kw = kwargs()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pretrain.models.attention"):
            outs = [attention(q, k, v, causal=True, backend=backend, **kw) for _ in range(3)]
        assert fake_flash.calls == [], name
        torch.testing.assert_close(outs[-1], attention(q, k, v, causal=True, backend="sdpa", **kw), atol=0, rtol=0)
        warnings = [r.getMessage() for r in caplog.records]
        assert len(warnings) == (backend == "flash_attn"), (name, warnings)  # one line, not one per call
        assert all("such calls use sdpa" in w for w in warnings)


def test_flash_attn_config_evaluates_packed_and_fp32(fake_flash):
    """A flash_attn model scored like evaluation does (fp32, explicit packed mask) gives the sdpa numbers."""
    from pretrain.models import build_model

    cfg = dict(vocab_size=48, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=32)
    torch.manual_seed(0)
    flash = build_model("gpt", dict(cfg, attention_backend="flash_attn")).eval()
    torch.manual_seed(0)
    sdpa = build_model("gpt", dict(cfg, attention_backend="sdpa")).eval()
    ids = torch.randint(0, 48, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = _tree_mask()
    torch.testing.assert_close(flash.hidden(ids, mask=mask)[0], sdpa.hidden(ids, mask=mask)[0], atol=0, rtol=0)
    torch.testing.assert_close(flash.hidden(ids)[0], sdpa.hidden(ids)[0], atol=0, rtol=0)
    assert fake_flash.calls == []


def test_configs_that_could_never_use_flash_attn_are_refused():
    from pretrain.models.gpt.config import GPTConfig
    from pretrain.models.t5.config import T5Config

    with pytest.raises(ValueError, match=r"model.attention_backend=flash_attn: .*relative position bias.*auto"):
        T5Config(attention_backend="flash_attn").validate()
    with pytest.raises(ValueError, match=r"model.attention_backend=flash_attn: head dim 320.*auto"):
        GPTConfig(hidden_size=640, num_heads=2, attention_backend="flash_attn").validate()
    GPTConfig(hidden_size=512, num_heads=2, attention_backend="flash_attn").validate()  # head dim 256: fine


@pytest.mark.parametrize("num_layers", [2, 4])
def test_document_varlen_metadata_is_computed_once_per_forward(fake_flash, num_layers):
    """flash-attn with document masking: cu_seqlens and max length are derived once per forward (2 host syncs,
    whatever the depth) and every layer gets the same tensor."""
    from pretrain.models import build_model
    from tests.host_syncs import HostSyncCounter

    torch.manual_seed(0)
    model = build_model("gpt", dict(vocab_size=48, hidden_size=32, num_layers=num_layers, num_heads=4,
                                    num_kv_heads=2, max_seq_len=32, document_masking=True,
                                    attention_backend="flash_attn"))
    ids = torch.randint(0, 48, (2, 12), generator=torch.Generator().manual_seed(0))
    with HostSyncCounter() as syncs, torch.autocast("cpu", dtype=torch.bfloat16):
        model.hidden(ids, document_ids=_docs())[0].float().sum().backward()
    assert sorted(syncs.ops) == ["_local_scalar_dense", "nonzero"]  # 0 per layer
    assert [c["kind"] for c in fake_flash.calls] == ["varlen"] * num_layers
    assert all(c["cu"] is fake_flash.calls[0]["cu"] for c in fake_flash.calls)


# --- SDPA with a mask and grouped-query K/V: a fused kernel, never the math path --------------------------------

class _SdpaCalls(TorchDispatchMode):
    """Records (op, query heads, key heads, has mask) of each SDPA kernel dispatched."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name.startswith("_scaled_dot_product") and not name.endswith("backward"):
            self.calls.append((name, args[0].shape[1], args[1].shape[1], kwargs.get("attn_mask") is not None))
        return func(*args, **kwargs)


@pytest.mark.parametrize("name", ["documents_gqa", "mqa_padding", "tree_gqa"])
def test_sdpa_with_a_mask_gets_kv_per_query_head(name):
    """CUDA's mask-taking kernels (memory-efficient, cuDNN) refuse grouped-query K/V and SDPA would take its math
    path ([b, h, s, s] fp32 scores): with a mask the sdpa backend hands K/V expanded to the query heads. On CPU
    the fused kernel is dispatched either way; what it is handed is what decides on CUDA."""
    kw = {"documents_gqa": dict(document_ids=_docs()), "mqa_padding": dict(key_mask=_key_mask()),
          "tree_gqa": dict(mask=_tree_mask())}[name]
    q, k, v = _qkv(8, kv_heads=1 if "mqa" in name else 2, requires_grad=True)
    with _SdpaCalls() as rec:
        out = attention(q, k, v, causal="padding" not in name, backend="sdpa", **kw)
    assert rec.calls == [("_scaled_dot_product_flash_attention_for_cpu", HQ, HQ, True)]
    ref = attention(q, k, v, causal="padding" not in name, backend="reference", **kw)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    for a, b in zip(torch.autograd.grad((out * g).sum(), (q, k, v)), torch.autograd.grad((ref * g).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with _SdpaCalls() as rec:  # no mask: grouped-query K/V go to the kernel as they are (flash takes them)
        attention(q, k, v, causal=True, backend="sdpa")
    assert rec.calls == [("_scaled_dot_product_flash_attention_for_cpu", HQ, k.shape[2], False)]
