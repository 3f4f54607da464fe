"""GPT / T5 / Switch models on tiny shapes: losses, masks, MoE formulas, KV cache, parameter and FLOP counts."""

import math

import pytest
import torch

from pretrain.models import build_model, config_class
from pretrain.models.flops import flops_per_token, gpt_batch_flops, gpt_param_count, t5_batch_flops, t5_flops_per_sample
from pretrain.models.registry import spec_for_config
from pretrain.models.layers import LayerFactory, LocalLayers, TiedHead
from pretrain.models.moe import MoEConfig, SwitchMLP, expert_capacity

V = 48
GPT_TINY = dict(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=32)
T5_TINY = dict(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)
MODELS = {
    "llama": ("gpt", dict(GPT_TINY, num_kv_heads=2)),
    "gpt2": ("gpt", dict(GPT_TINY, flavour="gpt2", tie_embeddings=True)),
    "switch_gpt": ("gpt", dict(GPT_TINY, moe=dict(num_experts=4, every=2))),
    "t5": ("t5", T5_TINY),
    "switch_t5": ("t5", dict(T5_TINY, moe=dict(num_experts=4, every=2))),
}


def _model(name: str, **overrides):
    torch.manual_seed(0)
    family, cfg = MODELS[name]
    return build_model(family, {**cfg, **overrides})


def _batch(family: str, seed: int = 0, b: int = 2, s: int = 16) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (b, s + 1), generator=g)
    if family == "gpt":
        return dict(input_ids=ids[:, :-1], labels=ids[:, 1:], loss_mask=torch.ones(b, s))
    dec = torch.randint(0, V, (b, s // 2 + 1), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, -3:] = 0
    return dict(input_ids=ids[:, :-1], attention_mask=mask, decoder_input_ids=dec[:, :-1], labels=dec[:, 1:],
                loss_mask=torch.ones(b, s // 2))


@pytest.mark.parametrize("name", MODELS)
def test_loss_falls_and_shapes(name):
    family = MODELS[name][0]
    model, batch = _model(name), _batch(family)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        out = model(**batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.lm_loss_sum.item() / out.num_tokens.item())
    assert out.num_tokens.item() == batch["loss_mask"].sum()
    assert losses[-1] < 0.6 * losses[0], losses
    logits_args = {k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids") if k in batch}
    assert model.logits(**logits_args).shape == (*batch["labels"].shape, V)
    if "switch" in name:
        assert {"aux_loss", "z_loss", "moe_drop_frac"} <= out.metrics.keys()
        aux = out.metrics["aux_loss"].item()
        w = model.cfg.moe
        assert out.loss.item() == pytest.approx(losses[-1] + w.aux_loss_weight * aux
                                                + w.z_loss_weight * out.metrics["z_loss"].item(), rel=1e-5)


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_loss_mask_respected(name):
    family = MODELS[name][0]
    model, batch = _model(name), _batch(family)
    batch["loss_mask"][0, :5] = 0
    out = model(**batch)
    changed = dict(batch, labels=batch["labels"].clone())
    changed["labels"][0, :5] = (changed["labels"][0, :5] + 1) % V
    assert model(**changed).loss.item() == pytest.approx(out.loss.item(), abs=1e-6)
    assert out.num_tokens.item() == batch["loss_mask"].sum().item()
    logits = model.logits(**{k: v for k, v in batch.items() if k not in ("labels", "loss_mask")})
    tok = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
    assert out.lm_loss_sum.item() == pytest.approx((tok * batch["loss_mask"].flatten()).sum().item(), rel=1e-5)


def test_t5_padding_is_invisible():
    model, batch = _model("t5"), _batch("t5")
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][1, -3:] = (changed["input_ids"][1, -3:] + 1) % V  # padded positions
    assert model(**changed).loss.item() == pytest.approx(model(**batch).loss.item(), abs=1e-6)


@pytest.mark.parametrize("flavour", ["llama", "gpt2"])
def test_document_masking_equals_separate_documents(flavour):
    model = _model(flavour, document_masking=True)
    ids = torch.randint(0, V, (1, 14), generator=torch.Generator().manual_seed(1))
    lengths = [6, 5, 3]
    docs = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    packed = model.logits(ids, position_ids=pos, document_ids=docs)
    for doc, chunk in zip(range(3), ids.split(lengths, dim=1)):
        torch.testing.assert_close(packed[docs == doc], model.logits(chunk)[0], atol=1e-5, rtol=1e-5)
    unmasked = _model(flavour).logits(ids, position_ids=pos, document_ids=docs)  # document_masking off
    assert not torch.allclose(unmasked[0, 6:], packed[0, 6:], atol=1e-3)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_kv_cache_generation_equals_recompute(name):
    model = _model(name)
    prompt = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(2))
    cached = model.generate(prompt, max_new_tokens=6)
    assert cached.shape == (2, 11) and torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, model.generate(prompt, max_new_tokens=6, use_cache=False))
    cache = model.new_cache(2, 11)
    steps = torch.cat([model.logits(cached[:, :5], cache=cache)] +
                      [model.logits(cached[:, i:i + 1], cache=cache) for i in range(5, 10)], dim=1)
    torch.testing.assert_close(steps, model.logits(cached[:, :10]), atol=1e-5, rtol=1e-5)


def test_t5_generate():
    model, batch = _model("t5"), _batch("t5")
    out = model.generate(batch["input_ids"], 4, attention_mask=batch["attention_mask"])
    assert out.shape == (2, 5) and (out[:, 0] == 0).all()
    logits = model.logits(batch["input_ids"], out[:, :-1], batch["attention_mask"])
    assert torch.equal(logits.argmax(-1), out[:, 1:])  # each token is the argmax given the previous ones


def _switch(e=2, d=2, hidden=3, **cfg):
    torch.manual_seed(0)
    layer = SwitchMLP(MoEConfig(num_experts=e, **cfg), dim=d, hidden=hidden, activation="relu", bias=False,
                      in_std=0.5, out_std=0.5)
    with torch.no_grad():
        layer.router.copy_(torch.eye(e, d))  # router logits = the token's first e features
    return layer


def test_switch_capacity_and_dropping():
    assert expert_capacity(10, 4, 1.0) == 3 and expert_capacity(8, 4, 1.25) == 3 and expert_capacity(1, 8, 1.0) == 1
    layer = _switch(capacity_factor_train=1.0, capacity_factor_eval=1.0, jitter=0.0).eval()
    # Tokens 0-3 prefer expert 0, token 4 expert 1; capacity = ceil(5 * 1.0 / 2) = 3: tokens 3 is dropped.
    x = torch.tensor([[2.0, 0.0], [1.0, 0.5], [3.0, 1.0], [1.5, 0.0], [0.0, 2.0]])
    y, aux = layer(x)
    assert aux["drop_frac"].item() == pytest.approx(0.2)
    assert torch.equal(y[3], torch.zeros(2))
    probs = x.softmax(-1)
    for t, e in ((0, 0), (1, 0), (2, 0), (4, 1)):
        expert = torch.relu(x[t] @ layer.w_in[e]) @ layer.w_out[e]
        torch.testing.assert_close(y[t], probs[t, e] * expert)
    # Hand formulas: f = [4/5, 1/5]; P = mean router probability per expert.
    p = [[math.exp(a) / (math.exp(a) + math.exp(b)) for a, b in [r]] for r in x.tolist()]
    p0 = sum(row[0] for row in p) / 5
    assert aux["load_balance_loss"].item() == pytest.approx(2 * (0.8 * p0 + 0.2 * (1 - p0)), rel=1e-6)
    z = sum(math.log(math.exp(a) + math.exp(b)) ** 2 for a, b in x.tolist()) / 5
    assert aux["z_loss"].item() == pytest.approx(z, rel=1e-6)


def test_switch_train_eval_capacity_and_jitter():
    x = torch.tensor([[2.0, 0.0], [1.0, 0.5], [3.0, 1.0], [1.5, 0.0], [0.0, 2.0]])
    layer = _switch(capacity_factor_train=1.0, capacity_factor_eval=2.0, jitter=0.0)
    assert layer.train()(x)[1]["drop_frac"].item() == pytest.approx(0.2)
    assert layer.eval()(x)[1]["drop_frac"].item() == 0.0  # capacity 5 at eval
    noisy = _switch(jitter=0.3).train()
    torch.manual_seed(1)
    logits, _ = noisy.route(x)
    ratio = logits[x != 0] / x[x != 0]
    assert (ratio >= 0.7).all() and (ratio <= 1.3).all() and not torch.allclose(ratio, torch.ones_like(ratio))
    torch.testing.assert_close(noisy.eval().route(x)[0], x)  # no jitter at eval


def test_activation_checkpointing_same_grads():
    grads = []
    for mode in ("none", "full", "every_n"):
        model = _model("switch_gpt", activation_checkpointing=mode, checkpoint_every=2)
        torch.manual_seed(5)  # router jitter must replay identically in recomputation
        model(**_batch("gpt")).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert "forward" in vars(model.blocks[0]) and "forward" not in vars(model.blocks[1])  # every_n=2: block 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[2], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_fused_head_loss_matches_unfused(tied):
    """The chunked head + cross-entropy gives F.cross_entropy's per-token losses and gradients, including a
    partial last chunk and per-token upstream weights (a loss mask)."""
    torch.manual_seed(0)
    layers = LocalLayers()
    layers.loss_chunk = 16  # 45 tokens: 3 chunks, the last one partial
    head = TiedHead(torch.nn.Embedding(V, 32)) if tied else layers.lm_head(32, V, 0.5)
    h, labels, weights = torch.randn(3, 15, 32, requires_grad=True), torch.randint(0, V, (3, 15)), torch.rand(3, 15)
    results = []
    for fn in (LocalLayers.head_cross_entropy, LayerFactory.head_cross_entropy):
        loss = fn(layers, h, head, labels)
        (loss * weights).sum().backward()
        results.append((loss.detach(), h.grad, head.weight.grad))
        assert ("LinearCrossEntropy" in type(loss.grad_fn.next_functions[0][0]).__name__) == (len(results) == 1)
        h.grad = head.weight.grad = None
    for fused, plain in zip(*results):
        torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # nothing to prepare for backward: the plain path, same losses
        torch.testing.assert_close(layers.head_cross_entropy(h, head, labels), results[0][0], atol=1e-6, rtol=1e-5)


def test_compiled_model_matches_eager():
    """``train.compile`` compiles the model in place: same loss and grads, same state-dict keys (checkpoints)."""
    batch, results = _batch("gpt"), []
    for compiled in (False, True):
        model = _model("llama")
        if compiled:
            model.compile(backend="aot_eager")  # traces like inductor, without its minutes of C++ compilation
        out = model(**batch)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}, model.state_dict()))
    (loss, grads, state), (loss_c, grads_c, state_c) = results
    assert list(state_c) == list(state)
    torch.testing.assert_close(loss_c, loss)
    torch.testing.assert_close(grads_c, grads)


def test_bf16_autocast_smoke():
    for name in ("llama", "switch_t5"):
        model, batch = _model(name).eval(), _batch(MODELS[name][0])  # eval: no router jitter
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**batch)
        out.loss.backward()
        assert out.loss.item() == pytest.approx(model(**batch).loss.item(), rel=2e-2)


@pytest.mark.parametrize("name", MODELS)
def test_param_count_matches_numel(name):
    model = _model(name)
    param_count = spec_for_config(model.cfg).param_count
    assert param_count(model.cfg, False) == sum(p.numel() for p in model.parameters())
    if "switch" in name:
        expert = sum(p[0].numel() for n, p in model.named_parameters() if n.endswith((".mlp.w_in", ".mlp.w_out")))
        assert param_count(model.cfg, True) == param_count(model.cfg, False) - 3 * expert  # 4 experts -> 1


def test_flops_formulas():
    cfg = config_class("gpt")(**dict(GPT_TINY, moe=MoEConfig()))
    n = gpt_param_count(cfg) - V * 32  # input embedding is a lookup; the untied head is a matmul
    assert flops_per_token(cfg, 16) == 6 * n + 12 * 2 * 16 * 32
    assert gpt_batch_flops(cfg, _batch("gpt", b=2, s=16)) == 2 * 16 * flops_per_token(cfg, 16)
    tied = config_class("gpt")(**dict(GPT_TINY, tie_embeddings=True))
    assert flops_per_token(tied, 16) == flops_per_token(cfg, 16)  # same matmuls, fewer parameters
    t5 = config_class("t5")(**T5_TINY)
    assert t5_flops_per_sample(t5, 16, 16) > t5_flops_per_sample(t5, 16, 8) > t5_flops_per_sample(t5, 8, 8)
    assert t5_batch_flops(t5, _batch("t5", b=3)) == 3 * t5_flops_per_sample(t5, 16, 8)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"unknown key 'model.num_layer'; did you mean 'num_layers'"):
        build_model("gpt", dict(GPT_TINY, num_layer=3))
    with pytest.raises(ValueError, match=r"model.moe.capacity_factor_train=0"):
        build_model("gpt", dict(GPT_TINY, moe=dict(num_experts=2, capacity_factor_train=0)))
    with pytest.raises(ValueError, match=r"model.hidden_size must be int, got '32 units'"):
        build_model("gpt", dict(GPT_TINY, hidden_size="32 units"))
    with pytest.raises(ValueError, match="num_kv_heads=3 must divide"):
        build_model("gpt", dict(GPT_TINY, num_kv_heads=3))
    with pytest.raises(ValueError, match="unknown model family 'bert'"):
        build_model("bert", {})


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    assert dst.shape == src.shape, (dst.shape, src.shape)
    with torch.no_grad():
        dst.copy_(src)


def test_llama_matches_transformers():
    """Same weights as HF LlamaForCausalLM give the same logits: RoPE, RMSNorm, SwiGLU and GQA layouts agree."""
    from transformers import LlamaConfig, LlamaForCausalLM

    ours = _model("llama")
    c = ours.cfg
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=c.ffn_size, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=c.norm_eps,
                                      max_position_embeddings=32, tie_word_embeddings=False)).eval()
    _copy(ours.tok_emb.weight, hf.model.embed_tokens.weight)
    _copy(ours.norm.weight, hf.model.norm.weight)
    _copy(ours.head.weight, hf.lm_head.weight)
    g, hd = c.num_heads // c.kv_heads, c.head_dim
    for block, layer in zip(ours.blocks, hf.model.layers):
        a = layer.self_attn
        q = a.q_proj.weight.view(c.kv_heads, g * hd, -1)
        qkv = torch.cat([q, a.k_proj.weight.view(c.kv_heads, hd, -1), a.v_proj.weight.view(c.kv_heads, hd, -1)], 1)
        _copy(block.attn.qkv.weight, qkv.flatten(0, 1))
        _copy(block.attn.proj.weight, a.o_proj.weight)
        _copy(block.mlp.w_in.weight, torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]))
        _copy(block.mlp.w_out.weight, layer.mlp.down_proj.weight)
        _copy(block.norm1.weight, layer.input_layernorm.weight)
        _copy(block.norm2.weight, layer.post_attention_layernorm.weight)
    ids = _batch("gpt")["input_ids"]
    torch.testing.assert_close(ours.logits(ids), hf(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_gpt2_matches_transformers():
    from transformers import GPT2Config, GPT2LMHeadModel

    ours = _model("gpt2")
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                    layer_norm_epsilon=ours.cfg.norm_eps)).eval()
    t = hf.transformer
    _copy(ours.tok_emb.weight, t.wte.weight)
    _copy(ours.pos_emb.weight, t.wpe.weight)
    for mod, ref in [(ours.norm, t.ln_f)] + [(b.norm1, h.ln_1) for b, h in zip(ours.blocks, t.h)] + \
            [(b.norm2, h.ln_2) for b, h in zip(ours.blocks, t.h)]:
        _copy(mod.weight, ref.weight)
        _copy(mod.bias, ref.bias)
    for block, h in zip(ours.blocks, t.h):  # HF Conv1D stores [in, out]; c_attn's out is [q; k; v]
        w = h.attn.c_attn.weight.T.reshape(3, 4, 8, 32).transpose(0, 1)  # -> [head][q, k, v][head_dim]
        _copy(block.attn.qkv.weight, w.reshape(96, 32))
        _copy(block.attn.qkv.bias, h.attn.c_attn.bias.view(3, 4, 8).transpose(0, 1).reshape(96))
        pairs = (block.attn.proj, h.attn.c_proj), (block.mlp.w_in, h.mlp.c_fc), (block.mlp.w_out, h.mlp.c_proj)
        for mine, ref in pairs:
            _copy(mine.weight, ref.weight.T)
            _copy(mine.bias, ref.bias)
    ids = _batch("gpt")["input_ids"]
    torch.testing.assert_close(ours.logits(ids), hf(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_t5_matches_transformers():
    """T5 v1.1 conventions (buckets, unscaled attention, gated-GELU, padding) agree with HF T5."""
    from transformers import T5Config, T5ForConditionalGeneration

    ours = _model("t5")
    hf = T5ForConditionalGeneration(T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                             feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                             dropout_rate=0.0)).eval()
    _copy(ours.embedding.weight, hf.shared.weight)
    _copy(ours.head.weight, hf.lm_head.weight)
    for stack, ref in ((ours.encoder, hf.encoder), (ours.decoder, hf.decoder)):
        _copy(stack.norm.weight, ref.final_layer_norm.weight)
        _copy(stack.relative_bias.weight, ref.block[0].layer[0].SelfAttention.relative_attention_bias.weight)
        for block, hb in zip(stack.blocks, ref.block):
            sa, ff = hb.layer[0], hb.layer[-1]
            qkv = torch.stack([sa.SelfAttention.q.weight, sa.SelfAttention.k.weight, sa.SelfAttention.v.weight])
            _copy(block.attn.qkv.weight, qkv.view(3, 4, 8, 32).transpose(0, 1).reshape(96, 32))
            _copy(block.attn.o.weight, sa.SelfAttention.o.weight)
            _copy(block.norm1.weight, sa.layer_norm.weight)
            _copy(block.mlp.w_in.weight, torch.cat([ff.DenseReluDense.wi_0.weight, ff.DenseReluDense.wi_1.weight]))
            _copy(block.mlp.w_out.weight, ff.DenseReluDense.wo.weight)
            _copy(block.norm2.weight, ff.layer_norm.weight)
            if block.cross_attn is not None:
                ca = hb.layer[1]
                _copy(block.cross_attn.q.weight, ca.EncDecAttention.q.weight)
                kv = torch.stack([ca.EncDecAttention.k.weight, ca.EncDecAttention.v.weight])
                _copy(block.cross_attn.kv.weight, kv.view(2, 4, 8, 32).transpose(0, 1).reshape(64, 32))
                _copy(block.cross_attn.o.weight, ca.EncDecAttention.o.weight)
                _copy(block.cross_norm.weight, ca.layer_norm.weight)
    b = _batch("t5")
    ref = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], decoder_input_ids=b["decoder_input_ids"])
    mine = ours.logits(b["input_ids"], b["decoder_input_ids"], b["attention_mask"])
    torch.testing.assert_close(mine, ref.logits, atol=1e-4, rtol=1e-5)
