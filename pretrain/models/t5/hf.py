"""T5 <-> Hugging Face: T5 v1.1 <-> ``T5ForConditionalGeneration``, Switch-T5 ->
``SwitchTransformersForConditionalGeneration`` (see :mod:`pretrain.hf.configs`); the config translation and
the weight tables (:mod:`pretrain.hf.mapping`'s rules) that export and import both walk.
"""

from __future__ import annotations

from typing import Any

from pretrain.hf.configs import SWITCH, T5, need, warn_capacity
from pretrain.hf.mapping import Rule, gated, per_expert, per_head, same
from pretrain.hf.moe import SWITCH_ROUTER, check_router
from pretrain.models.spec import HFSpec
from pretrain.models.t5.config import T5Config

DROPLESS_CAPACITY = 1 << 20  # Switch Transformers' per-sequence expert capacity: effectively dropless


def architecture(cfg: T5Config) -> str:
    need(not cfg.sparse.enabled, f"model.sparse.pattern={cfg.sparse.pattern}: Hugging Face T5 has no sparse "
                                 "attention; export a model trained with model.sparse.pattern=dense")
    return SWITCH if cfg.moe.enabled else T5


def to_config(cfg: T5Config, arch: str, ids: dict[str, int | None]) -> dict[str, Any]:
    common = dict(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff,
                  num_layers=cfg.num_layers, num_decoder_layers=cfg.decoder_layers, num_heads=cfg.num_heads,
                  relative_attention_num_buckets=cfg.relative_attention_num_buckets,
                  relative_attention_max_distance=cfg.relative_attention_max_distance, dropout_rate=0.0,
                  layer_norm_epsilon=cfg.norm_eps, initializer_factor=cfg.init_factor,
                  tie_word_embeddings=cfg.tie_embeddings, is_encoder_decoder=True, use_cache=True,
                  decoder_start_token_id=cfg.decoder_start_token_id, **ids)
    if arch == T5:
        proj = {"geglu": "gated-gelu", "swiglu": "gated-silu", "relu": "relu"}.get(cfg.activation)
        need(proj is not None, f"model.activation={cfg.activation!r}: HF T5's 'gelu' is the exact erf GELU, ours "
                               "is the tanh approximation; use geglu, swiglu or relu")
        return dict(common, feed_forward_proj=proj)
    moe = cfg.moe
    act = {"relu": "relu", "gelu": "gelu_new"}.get(cfg.activation)
    need(act is not None, f"model.activation={cfg.activation!r}: Switch Transformers' feed-forward is not "
                          "gated; use relu or gelu for Switch-T5 export")
    need(moe.every in (1, 2), f"model.moe.every={moe.every}: Switch Transformers puts experts in layers "
                              "i % step == 1 (or all), which matches every=1 or 2 only")
    check_router(moe, SWITCH_ROUTER, cfg.d_ff)
    need(moe.first_dense == 0, f"model.moe.first_dense={moe.first_dense}: Switch Transformers places experts by "
                               "num_sparse_*_layers only")
    need(moe.expert_ffn_size in (None, cfg.d_ff), f"model.moe.expert_ffn_size={moe.expert_ffn_size}: Switch "
                                                  f"Transformers' experts have the width d_ff={cfg.d_ff}")
    warn_capacity(moe)
    return dict(common, dense_act_fn=act, num_experts=moe.num_experts, expert_capacity=DROPLESS_CAPACITY,
                num_sparse_encoder_layers=len([i for i in range(cfg.num_layers) if moe.is_moe_layer(i)]),
                num_sparse_decoder_layers=len([i for i in range(cfg.decoder_layers) if moe.is_moe_layer(i)]),
                router_bias=False, router_jitter_noise=moe.jitter, router_dtype="float32",
                router_ignore_padding_tokens=False, router_z_loss_coef=moe.z_loss_weight,
                router_aux_loss_coef=moe.aux_loss_weight, add_router_probs=False)


def from_t5(hf) -> dict[str, Any]:
    acts = {("gelu_new", True): "geglu", ("silu", True): "swiglu", ("relu", False): "relu"}
    act = acts.get((hf.dense_act_fn, bool(hf.is_gated_act)))
    need(act is not None, f"feed_forward_proj={hf.feed_forward_proj!r}: supported are gated-gelu, gated-silu, relu")
    return dict(vocab_size=hf.vocab_size, d_model=hf.d_model, d_kv=hf.d_kv, d_ff=hf.d_ff,
                num_layers=hf.num_layers, num_decoder_layers=hf.num_decoder_layers, num_heads=hf.num_heads,
                relative_attention_num_buckets=hf.relative_attention_num_buckets,
                relative_attention_max_distance=hf.relative_attention_max_distance, activation=act,
                norm_eps=float(hf.layer_norm_epsilon), tie_embeddings=bool(hf.tie_word_embeddings),
                init_factor=float(hf.initializer_factor), decoder_start_token_id=int(hf.decoder_start_token_id or 0))


def t5_rules(cfg: T5Config) -> list[Rule]:
    """T5 v1.1 <-> ``T5ForConditionalGeneration``; with ``moe.num_experts``, Switch <-> ``SwitchTransformers...``."""
    heads, d_kv, switch = cfg.num_heads, cfg.d_kv, cfg.moe.enabled
    bias = "block.0.layer.0.SelfAttention.relative_attention_bias.weight"  # HF keeps the table in block 0
    rules = [same("embedding.weight", "shared.weight"),
             same("encoder.relative_bias.weight", "encoder." + bias),
             same("decoder.relative_bias.weight", "decoder." + bias),
             same("encoder.norm.weight", "encoder.final_layer_norm.weight"),
             same("decoder.norm.weight", "decoder.final_layer_norm.weight")]
    if not cfg.tie_embeddings:
        rules.append(same("head.weight", "lm_head.weight"))
    for stack, n in (("encoder", cfg.num_layers), ("decoder", cfg.decoder_layers)):
        for i in range(n):
            o, h = f"{stack}.blocks.{i}.", f"{stack}.block.{i}.layer."
            att = h + "0.SelfAttention."
            rules += [same(o + "norm1.weight", h + "0.layer_norm.weight"),
                      per_head(o + "attn.qkv.weight", (att + "q.weight", att + "k.weight", att + "v.weight"),
                               heads, d_kv),
                      same(o + "attn.o.weight", att + "o.weight")]
            ff = h + "1."
            if stack == "decoder":
                x = h + "1.EncDecAttention."
                rules += [same(o + "cross_norm.weight", h + "1.layer_norm.weight"),
                          same(o + "cross_attn.q.weight", x + "q.weight"),
                          per_head(o + "cross_attn.kv.weight", (x + "k.weight", x + "v.weight"), heads, d_kv),
                          same(o + "cross_attn.o.weight", x + "o.weight")]
                ff = h + "2."
            rules.append(same(o + "norm2.weight", ff + "layer_norm.weight"))
            mlp = ff + ("mlp." if switch else "DenseReluDense.")
            if switch and cfg.moe.is_moe_layer(i):
                rules += [same(o + "mlp.router", mlp + "router.classifier.weight"),
                          per_expert(o + "mlp.w_in", mlp + "experts.expert_{e}.wi.weight", cfg.moe.num_experts),
                          per_expert(o + "mlp.w_out", mlp + "experts.expert_{e}.wo.weight", cfg.moe.num_experts)]
            elif cfg.activation in ("geglu", "swiglu"):
                rules += [gated(o + "mlp.w_in.weight", mlp + "wi_0.weight", mlp + "wi_1.weight"),
                          same(o + "mlp.w_out.weight", mlp + "wo.weight")]
            else:
                rules += [same(o + "mlp.w_in.weight", mlp + "wi.weight"),
                          same(o + "mlp.w_out.weight", mlp + "wo.weight")]
    return rules


def rules(cfg: T5Config, arch: str) -> tuple[list[Rule], dict[str, str]]:
    """The weight table and its tied aliases (HF tensors that are the same parameter as another)."""
    alias = {"encoder.embed_tokens.weight": "shared.weight", "decoder.embed_tokens.weight": "shared.weight"}
    if cfg.tie_embeddings:
        alias["lm_head.weight"] = "shared.weight"
    return t5_rules(cfg), alias


HF = HFSpec(classes={T5: "T5Config", SWITCH: "SwitchTransformersConfig"}, architecture=architecture,
            to_config=to_config, from_config={T5: from_t5}, rules=rules,
            generation=lambda cfg: {"decoder_start_token_id": cfg.decoder_start_token_id})
