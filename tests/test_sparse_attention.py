"""Sparse attention patterns (pretrain.models.patterns): each mask is the documented pattern (checked against a
loop over positions); the flex BlockMask and the SDPA boolean mask give the reference attention with the same
explicit mask (<= 1e-6), with and without document masking; GPT (causal window + global, BigBird) and the T5
encoder (bidirectional BigBird) equal dense attention with the explicit mask; a sliding-window GPT exports to
Mistral with transformers' logits; bad pattern configs are refused naming the key."""

from __future__ import annotations

import pytest
import torch

from pretrain.config import ConfigError, dataclass_from_dict, from_dict
from pretrain.hf import configs
from pretrain.hf.mapping import to_hf
from pretrain.models import build_model, config_class, patterns, registry
from pretrain.models.attention import attention
from pretrain.models.patterns import SparseConfig, attention_mask_for, pattern_mask

pytestmark = pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")

PATTERNS = {
    "window": dict(pattern="sliding_window", window=5),
    "window_global": dict(pattern="sliding_window", window=4, global_tokens=3),
    "bigbird": dict(pattern="bigbird", block_size=4, window_blocks=3, global_tokens=4, random_blocks=2, seed=7),
}
SEQ = 32
DOCS = torch.tensor([[0] * 13 + [1] * 19, [0] * 5 + [1] * 20 + [2] * 7])


def loop_mask(cfg: SparseConfig, s: int, causal: bool) -> torch.Tensor:
    """The pattern written out position by position from the module docstring."""
    out = torch.zeros(s, s, dtype=torch.bool)
    g, bs = cfg.global_tokens, cfg.block_size
    nb = s // bs
    rand = patterns.random_blocks(cfg, nb, causal) if cfg.pattern == "bigbird" else None
    for q in range(s):
        for k in range(s):
            if cfg.pattern == "sliding_window":
                ok = abs(q - k) < cfg.window or q < g or k < g
            else:
                gb = g // bs
                glob = {*range(gb)} | (set() if causal else {*range(nb - gb, nb)})
                ok = (abs(q // bs - k // bs) <= cfg.window_blocks // 2 or q // bs in glob or k // bs in glob
                      or bool(rand[q // bs, k // bs]))
            out[q, k] = ok and (k <= q or not causal)
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_masks_are_the_documented_patterns(name, causal):
    cfg = SparseConfig(**PATTERNS[name])
    mask = pattern_mask(cfg, SEQ, SEQ, causal=causal)
    assert torch.equal(mask, loop_mask(cfg, SEQ, causal))
    assert torch.equal(pattern_mask(cfg, 4, SEQ, causal=causal), mask[-4:])  # decode steps: the last rows
    if cfg.pattern == "bigbird":  # BigBird's random blocks: the asked-for number per row, a function of the seed
        table = patterns.random_blocks(cfg, SEQ // 4, causal)
        # rows of global blocks draw none; causal row 3 has one candidate (block 1: not global, not in its window)
        want = [0, 2, 2, 2, 2, 2, 2, 0] if not causal else [0, 0, 0, 1, 2, 2, 2, 2]
        assert table.sum(1).tolist() == want
        assert torch.equal(table, patterns.random_blocks(cfg, SEQ // 4, causal))
        other = patterns.random_blocks(SparseConfig(**dict(PATTERNS[name], seed=8)), SEQ // 4, causal)
        assert not torch.equal(table, other)
    assert 0.1 < mask.float().mean() < (0.5 if causal else 0.9)  # it is sparse, and not empty


@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_block_mask_and_sdpa_mask_equal_dense_attention(monkeypatch, name, causal, docs):
    monkeypatch.setattr(patterns, "COMPILE_FLEX", False)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, SEQ, 4, 8, generator=gen)
    k, v = torch.randn(2, 2, SEQ, 2, 8, generator=gen)
    ids = DOCS if docs else None
    cfg = SparseConfig(**PATTERNS[name])
    dense = pattern_mask(cfg, SEQ, SEQ, causal=causal)[None, None]
    want = attention(q, k, v, causal=causal, backend="reference", document_ids=ids, mask=dense)
    flex = attention_mask_for(SparseConfig(**PATTERNS[name], kernel="flex"), SEQ, SEQ, causal=causal,
                              document_ids=ids)
    assert isinstance(flex, patterns.BlockMask)
    with torch.no_grad():
        got = attention(q, k, v, causal=causal, backend="sdpa", mask=flex)
    assert (got - want).abs().max() <= 1e-6
    sdpa = attention(q, k, v, causal=causal, backend="sdpa", document_ids=ids,
                     mask=attention_mask_for(cfg, SEQ, SEQ, causal=causal))
    assert (sdpa - want).abs().max() <= 1e-6
    full = attention(q, k, v, causal=causal, backend="reference", document_ids=ids)
    assert (full - want).abs().max() > 1e-2  # the pattern matters


GPT = dict(flavour="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
           ffn_hidden_size=48, max_seq_len=64, document_masking=True, init_std=0.2)


@pytest.mark.parametrize("kernel", ["mask", "flex"])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_gpt_pattern_equals_dense_attention_with_the_explicit_mask(monkeypatch, name, kernel):
    monkeypatch.setattr(patterns, "COMPILE_FLEX", False)
    sparse_cfg = dataclass_from_dict(config_class("gpt"), dict(GPT, sparse=dict(PATTERNS[name], kernel=kernel)),
                                     "model")
    dense_cfg = dataclass_from_dict(config_class("gpt"), GPT, "model")
    torch.manual_seed(0)
    sparse = build_model("gpt", sparse_cfg).eval()
    dense = build_model("gpt", dense_cfg).eval()
    dense.load_state_dict(sparse.state_dict())
    ids = torch.randint(0, 64, (2, SEQ), generator=torch.Generator().manual_seed(1))
    explicit = pattern_mask(sparse_cfg.sparse, SEQ, SEQ, causal=True)[None, None]
    with torch.no_grad():
        got, _ = sparse.hidden(ids, document_ids=DOCS)
        want, _ = dense.hidden(ids, document_ids=DOCS, mask=explicit)
        plain, _ = dense.hidden(ids, document_ids=DOCS)
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()  # fp32 rounding of hidden states ~ 1
    assert (got - plain).abs().max() > 1e-3
    with torch.no_grad():  # KV-cache decoding sees the same pattern (decode steps take the boolean mask)
        cache = sparse.new_cache(2, SEQ)
        sparse.logits(ids[:, :20], cache=cache)
        step = sparse.logits(ids[:, 20:24], cache=cache)
        full = sparse.logits(ids[:, :24])
    assert (step - full[:, 20:]).abs().max() <= 1e-5


def test_gpt_pattern_trains(monkeypatch):
    """The boolean-mask kernel has a backward; gradients equal those of dense attention with the mask."""
    cfg = dataclass_from_dict(config_class("gpt"), dict(GPT, sparse=PATTERNS["bigbird"]), "model")
    torch.manual_seed(0)
    model = build_model("gpt", cfg)
    ids = torch.randint(0, 64, (2, SEQ), generator=torch.Generator().manual_seed(1))
    model(ids, ids, document_ids=DOCS).loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    explicit = pattern_mask(cfg.sparse, SEQ, SEQ, causal=True)[None, None]
    monkeypatch.setattr(cfg.sparse, "pattern", "dense")
    h, ctx = model.hidden(ids, document_ids=DOCS, mask=explicit)
    model.head_loss(h, ctx, ids).loss.backward()
    assert max((a - p.grad).abs().max().item() for a, p in zip(grads, model.parameters())) <= 1e-6


T5 = dict(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, vocab_size=64, init_factor=4.0)


def test_t5_encoder_bigbird_equals_dense_attention_with_the_explicit_mask(monkeypatch):
    from pretrain.models.t5 import model as t5_model

    cfg = dataclass_from_dict(config_class("t5"), dict(T5, sparse=PATTERNS["bigbird"], attention_backend="reference"),
                              "model")
    torch.manual_seed(0)
    model = build_model("t5", cfg).eval()
    ids = torch.randint(0, 64, (2, SEQ), generator=torch.Generator().manual_seed(1))
    pad = torch.ones(2, SEQ, dtype=torch.long)
    pad[1, -3:] = 0
    with torch.no_grad():
        got = model.encode(ids, pad)
    explicit = pattern_mask(cfg.sparse, SEQ, SEQ, causal=False)[None, None]
    calls = []

    def dense_with_mask(q, k, v, *, mask=None, **kw):
        calls.append(mask is not None)
        return attention(q, k, v, mask=explicit, **{**kw, "backend": "reference"})

    monkeypatch.setattr(cfg.sparse, "pattern", "dense")
    monkeypatch.setattr(t5_model, "attention", dense_with_mask)
    with torch.no_grad():
        want = model.encode(ids, pad)
    monkeypatch.undo()
    monkeypatch.setattr(cfg.sparse, "pattern", "dense")
    with torch.no_grad():
        plain = model.encode(ids, pad)
    assert calls == [False, False]  # the dense run got no pattern of its own
    assert (got - want).abs().max() <= 1e-6
    assert (got - plain).abs().max() > 1e-3


def test_sliding_window_gpt_exports_to_mistral_with_equal_logits(tmp_path):
    import transformers

    cfg = dataclass_from_dict(config_class("gpt"), dict(GPT, document_masking=False,
                                                        sparse=dict(pattern="sliding_window", window=8)), "model")
    torch.manual_seed(0)
    model = build_model("gpt", cfg).eval()
    spec = registry.family_spec("gpt").hf
    arch = spec.architecture(cfg)
    assert arch == configs.MISTRAL
    config = transformers.MistralConfig(**spec.to_config(cfg, arch, {}), architectures=[arch])
    hf = transformers.MistralForCausalLM(config).eval()
    hf.load_state_dict(to_hf(model.state_dict(), *spec.rules(cfg, arch)), strict=True)
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model.logits(ids) - hf(input_ids=ids).logits).abs().max() <= 1e-4
    config.save_pretrained(tmp_path)
    back = spec.from_config[arch](transformers.AutoConfig.from_pretrained(tmp_path))
    assert back["sparse"] == dict(pattern="sliding_window", window=8)
    with pytest.raises(configs.UnsupportedConfig, match="sliding_window: LlamaForCausalLM has no sparse attention"):
        spec.to_config(cfg, configs.LLAMA, {})  # e.g. an imported Llama, continued with a window
    dense = dataclass_from_dict(config_class("gpt"), GPT, "model")
    assert spec.to_config(dense, configs.MISTRAL, {})["sliding_window"] is None


@pytest.mark.parametrize("family,values,field", [
    ("gpt", dict(GPT, sparse=PATTERNS["window_global"]), "global_tokens=3"),
    ("gpt", dict(GPT, sparse=PATTERNS["bigbird"]), "pattern=bigbird"),
    ("t5", dict(T5, sparse=PATTERNS["bigbird"]), "model.sparse.pattern=bigbird"),
])
def test_export_refuses_patterns_without_a_counterpart(family, values, field):
    cfg = dataclass_from_dict(config_class(family), values, "model")
    with pytest.raises(configs.UnsupportedConfig, match=field):
        registry.family_spec(family).hf.architecture(cfg)


@pytest.mark.parametrize("family,sparse,seq,message", [
    ("gpt", dict(pattern="bigbird", block_size=24), 64, "model.sparse.block_size=24 does not divide "
                                                         "data.seq_length=64"),
    ("t5", dict(pattern="bigbird", block_size=48), 64, "model.sparse.block_size=48 does not divide"),
    ("gpt", dict(pattern="sliding_window", window=0), 64, "model.sparse.window=0: must be >= 1"),
    ("gpt", dict(pattern="sliding_window", global_tokens=64), 64, "model.sparse.global_tokens=64 must be below"),
    ("gpt", dict(pattern="bigbird", block_size=8, global_tokens=4), 64, "global_tokens=4 is not a multiple"),
    ("gpt", dict(pattern="bigbird", block_size=8, window_blocks=2), 64, "window_blocks=2: must be odd"),
    ("gpt", dict(pattern="longformer"), 64, "model.sparse.pattern='longformer'"),
    ("gpt", dict(pattern="sliding_window", kernel="triton"), 64, "model.sparse.kernel='triton'"),
    ("t5", dict(pattern="bigbird", block_size=8, kernel="flex"), 64, "model.sparse.kernel=flex: T5"),
])
def test_bad_pattern_configs_are_refused_by_name(family, sparse, seq, message):
    model = dict(GPT if family == "gpt" else T5, family=family, sparse=sparse)
    with pytest.raises(ConfigError, match=message):
        from_dict({"model": model, "data": {"seq_length": seq}})


def test_patterns_and_dynamic_rope_compose_with_context_parallelism():
    """Accepted under parallel.cp: the pattern is applied in global positions and dynamic NTK reads the longest
    position over the context group (parity rows ``cp2 llama_window``, ``cp2 ring gpt2_bigbird``)."""
    model = dict(GPT, family="gpt", sparse=dict(pattern="sliding_window", window=8),
                 rope_scaling=dict(type="dynamic", factor=2.0, original_max_seq_len=32))
    cfg = from_dict({"model": model, "data": {"seq_length": 64}, "parallel": {"cp": 2}})
    assert cfg.parallel.cp == 2 and cfg.model.sparse.window == 8 and cfg.model.rope_scaling.dynamic
