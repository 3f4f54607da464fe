"""GPT <-> Hugging Face: Llama flavour <-> ``LlamaForCausalLM``, GPT-2 flavour <-> ``GPT2LMHeadModel``,
Switch-GPT -> ``Qwen2MoeForCausalLM`` (see :mod:`pretrain.hf.configs` for why); the config translation and the
weight tables (:mod:`pretrain.hf.mapping`'s rules) that export and import both walk.
"""

from __future__ import annotations

from typing import Any

import torch

from pretrain.hf.configs import GPT2, LLAMA, QWEN2_MOE, UnsupportedConfig, get, need, warn_capacity
from pretrain.hf.mapping import Rule, experts, gated, gpt2_qkv, grouped_qkv, constant, same, transposed
from pretrain.models.gpt.config import GPTConfig
from pretrain.models.spec import HFSpec


def architecture(cfg: GPTConfig) -> str:
    if cfg.moe.enabled:
        need(cfg.llama, "model.flavour=gpt2 with model.moe.num_experts>0: no Hugging Face decoder-only MoE has "
                        "LayerNorm, learned positions and biases; use flavour=llama for Switch-GPT")
        return QWEN2_MOE
    return LLAMA if cfg.llama else GPT2


def to_config(cfg: GPTConfig, arch: str, ids: dict[str, int | None]) -> dict[str, Any]:
    common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings,
                  initializer_range=cfg.init_std, use_cache=True, **ids)
    if arch == GPT2:
        need(cfg.kv_heads == cfg.num_heads, f"model.num_kv_heads={cfg.num_kv_heads}: GPT-2 has no grouped-query "
                                            "attention (set it to null or num_heads)")
        return dict(common, n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
                    n_inner=cfg.ffn_size, n_positions=cfg.max_seq_len, activation_function="gelu_new",
                    layer_norm_epsilon=cfg.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                    scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False)
    llama = dict(common, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                 num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
                 intermediate_size=cfg.ffn_size, hidden_act="silu", max_position_embeddings=cfg.max_seq_len,
                 rms_norm_eps=cfg.norm_eps, attention_dropout=0.0,
                 rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)})
    if arch == LLAMA:
        return dict(llama, head_dim=cfg.head_dim, attention_bias=False, mlp_bias=False, pretraining_tp=1)
    need(cfg.head_dim * cfg.num_heads == cfg.hidden_size, "head_dim must be hidden_size / num_heads")
    warn_capacity(cfg.moe)
    return dict(llama, moe_intermediate_size=cfg.ffn_size, shared_expert_intermediate_size=0,
                num_experts=cfg.moe.num_experts, num_experts_per_tok=1, norm_topk_prob=False,
                decoder_sparse_step=cfg.moe.every, mlp_only_layers=[], qkv_bias=False, use_sliding_window=False,
                output_router_logits=False, router_aux_loss_coef=cfg.moe.aux_loss_weight)


def from_llama(hf) -> dict[str, Any]:
    need(hf.hidden_act == "silu", f"hidden_act={hf.hidden_act!r}: only silu (SwiGLU) is supported")
    need(not get(hf, "attention_bias") and not get(hf, "mlp_bias"), "attention_bias/mlp_bias=true: our Llama "
                                                                     "flavour has no biases")
    rope = get(hf, "rope_parameters") or {"rope_type": "default", "rope_theta": get(hf, "rope_theta", 1e4)}
    need(rope.get("rope_type", "default") == "default",
         f"rope_parameters.rope_type={rope.get('rope_type')!r}: only plain RoPE is supported")
    head_dim = get(hf, "head_dim") or hf.hidden_size // hf.num_attention_heads
    need(head_dim * hf.num_attention_heads == hf.hidden_size,
         f"head_dim={head_dim}: must equal hidden_size / num_attention_heads")
    return dict(flavour="llama", vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
                num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
                num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
                ffn_hidden_size=hf.intermediate_size, max_seq_len=hf.max_position_embeddings,
                tie_embeddings=bool(hf.tie_word_embeddings), norm_eps=float(hf.rms_norm_eps),
                rope_theta=float(rope["rope_theta"]), init_std=float(hf.initializer_range))


def from_gpt2(hf) -> dict[str, Any]:
    need(hf.activation_function == "gelu_new",
         f"activation_function={hf.activation_function!r}: only gelu_new (tanh GELU) is supported")
    for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("reorder_and_upcast_attn", False)):
        need(bool(get(hf, key, want)) == want, f"{key}={get(hf, key)}: only {want} is supported")
    return dict(flavour="gpt2", vocab_size=hf.vocab_size, hidden_size=hf.n_embd, num_layers=hf.n_layer,
                num_heads=hf.n_head, ffn_hidden_size=hf.n_inner or 4 * hf.n_embd, max_seq_len=hf.n_positions,
                tie_embeddings=bool(hf.tie_word_embeddings), norm_eps=float(hf.layer_norm_epsilon),
                init_std=float(hf.initializer_range))


def llama_rules(cfg: GPTConfig) -> list[Rule]:
    """GPT Llama flavour <-> ``LlamaForCausalLM``; with ``moe``, Switch-GPT <-> ``Qwen2MoeForCausalLM``."""
    rules = [same("tok_emb.weight", "model.embed_tokens.weight"), same("norm.weight", "model.norm.weight")]
    if not cfg.tie_embeddings:
        rules.append(same("head.weight", "lm_head.weight"))
    for i in range(cfg.num_layers):
        o, h = f"blocks.{i}.", f"model.layers.{i}."
        rules += [
            same(o + "norm1.weight", h + "input_layernorm.weight"),
            same(o + "norm2.weight", h + "post_attention_layernorm.weight"),
            grouped_qkv(o + "attn.qkv.weight", h + "self_attn.q_proj.weight", h + "self_attn.k_proj.weight",
                        h + "self_attn.v_proj.weight", cfg.num_heads, cfg.kv_heads, cfg.head_dim),
            same(o + "attn.proj.weight", h + "self_attn.o_proj.weight"),
        ]
        if cfg.moe.is_moe_layer(i):
            d = cfg.hidden_size
            rules += [
                same(o + "mlp.router", h + "mlp.gate.weight"),
                experts(o + "mlp.w_in", h + "mlp.experts.gate_up_proj"),
                experts(o + "mlp.w_out", h + "mlp.experts.down_proj"),
                constant(h + "mlp.shared_expert.gate_proj.weight", lambda: torch.zeros(0, d)),
                constant(h + "mlp.shared_expert.up_proj.weight", lambda: torch.zeros(0, d)),
                constant(h + "mlp.shared_expert.down_proj.weight", lambda: torch.zeros(d, 0)),
                constant(h + "mlp.shared_expert_gate.weight", lambda: torch.zeros(1, d)),
            ]
        else:
            rules += [gated(o + "mlp.w_in.weight", h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"),
                      same(o + "mlp.w_out.weight", h + "mlp.down_proj.weight")]
    return rules


def gpt2_rules(cfg: GPTConfig) -> list[Rule]:
    """GPT GPT-2 flavour <-> ``GPT2LMHeadModel``."""
    t = "transformer."
    rules = [same("tok_emb.weight", t + "wte.weight"), same("pos_emb.weight", t + "wpe.weight"),
             same("norm.weight", t + "ln_f.weight"), same("norm.bias", t + "ln_f.bias")]
    if not cfg.tie_embeddings:
        rules.append(same("head.weight", "lm_head.weight"))
    for i in range(cfg.num_layers):
        o, h = f"blocks.{i}.", f"{t}h.{i}."
        rules += [
            same(o + "norm1.weight", h + "ln_1.weight"), same(o + "norm1.bias", h + "ln_1.bias"),
            same(o + "norm2.weight", h + "ln_2.weight"), same(o + "norm2.bias", h + "ln_2.bias"),
            gpt2_qkv(o + "attn.qkv.weight", h + "attn.c_attn.weight", cfg.num_heads, cfg.head_dim, weight=True),
            gpt2_qkv(o + "attn.qkv.bias", h + "attn.c_attn.bias", cfg.num_heads, cfg.head_dim, weight=False),
            transposed(o + "attn.proj.weight", h + "attn.c_proj.weight"),
            same(o + "attn.proj.bias", h + "attn.c_proj.bias"),
            transposed(o + "mlp.w_in.weight", h + "mlp.c_fc.weight"), same(o + "mlp.w_in.bias", h + "mlp.c_fc.bias"),
            transposed(o + "mlp.w_out.weight", h + "mlp.c_proj.weight"),
            same(o + "mlp.w_out.bias", h + "mlp.c_proj.bias"),
        ]
    return rules


def rules(cfg: GPTConfig, arch: str) -> tuple[list[Rule], dict[str, str]]:
    """The weight table of ``arch`` and its tied aliases (HF tensors that are the same parameter as another)."""
    table = gpt2_rules(cfg) if arch == GPT2 else llama_rules(cfg)
    if not cfg.tie_embeddings:
        return table, {}
    return table, {"lm_head.weight": "transformer.wte.weight" if arch == GPT2 else "model.embed_tokens.weight"}


HF = HFSpec(classes={LLAMA: "LlamaConfig", GPT2: "GPT2Config", QWEN2_MOE: "Qwen2MoeConfig"},
            architecture=architecture, to_config=to_config, from_config={LLAMA: from_llama, GPT2: from_gpt2},
            rules=rules)
