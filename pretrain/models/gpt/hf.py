"""GPT <-> Hugging Face: Llama flavour <-> ``LlamaForCausalLM``, GPT-2 flavour <-> ``GPT2LMHeadModel``,
MoE GPT <-> Mixtral / Qwen2-MoE / Glm4-MoE (DeepSeek-V3's MoE), Switch-GPT -> ``Qwen2MoeForCausalLM`` (see
:mod:`pretrain.hf.moe` and :mod:`pretrain.models.gpt.hf_moe`); the config translation and the weight tables
(:mod:`pretrain.hf.mapping`'s rules) that export and import both walk.
"""

from __future__ import annotations

from typing import Any

from pretrain.hf.configs import GPT2, LLAMA, MISTRAL, UnsupportedConfig, get, need
from pretrain.hf.mapping import Rule, gated, gpt2_qkv, grouped_qkv, same, transposed
from pretrain.hf.moe import layer_rules
from pretrain.models import rope
from pretrain.models.gpt import hf_moe, hf_window
from pretrain.models.gpt.config import GPTConfig
from pretrain.models.spec import HFSpec


def architecture(cfg: GPTConfig) -> str:
    if cfg.sparse.enabled:  # a sliding window: Mistral
        return hf_window.architecture(cfg)
    if cfg.moe.enabled:
        need(cfg.llama, "model.flavour=gpt2 with model.moe.num_experts>0: no Hugging Face decoder-only MoE has "
                        "LayerNorm, learned positions and biases; use flavour=llama for Switch-GPT")
        return hf_moe.default_architecture(cfg)
    return LLAMA if cfg.llama else GPT2


def to_config(cfg: GPTConfig, arch: str, ids: dict[str, int | None]) -> dict[str, Any]:
    hf_window.check(cfg, arch)
    need(arch in hf_moe.QK_NORM or not cfg.qk_norm, f"model.qk_norm=true: {arch} has no query/key norms; "
                                                     f"{', '.join(hf_moe.QK_NORM)} have")
    need(arch in hf_moe.CLASSES or not cfg.moe.enabled, f"model.moe.num_experts={cfg.moe.num_experts}: {arch} has "
                                                        "no experts; export a MoE model as one of "
                                                        f"{', '.join(hf_moe.CLASSES)}")
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
                 intermediate_size=cfg.ffn_size, hidden_act="silu", rms_norm_eps=cfg.norm_eps, attention_dropout=0.0,
                 **rope.to_hf(cfg.rope_theta, cfg.rope_scaling, cfg.max_seq_len))  # rope_parameters, max positions
    if arch == LLAMA:
        return dict(llama, head_dim=cfg.head_dim, attention_bias=False, mlp_bias=False, pretraining_tp=1)
    if arch == MISTRAL:
        return hf_window.to_config(cfg, llama)
    return hf_moe.to_config(cfg, arch, llama)


def from_llama(hf) -> dict[str, Any]:
    need(hf.hidden_act == "silu", f"hidden_act={hf.hidden_act!r}: only silu (SwiGLU) is supported")
    need(not get(hf, "attention_bias") and not get(hf, "mlp_bias"), "attention_bias/mlp_bias=true: our Llama "
                                                                     "flavour has no biases")
    params = get(hf, "rope_parameters") or {"rope_type": "default", "rope_theta": get(hf, "rope_theta", 1e4)}
    try:  # rope_theta, max_seq_len and rope_scaling (pretrain.models.rope)
        positions = rope.from_hf(params, hf.max_position_embeddings)
    except ValueError as e:
        raise UnsupportedConfig(str(e)) from None
    head_dim = get(hf, "head_dim") or hf.hidden_size // hf.num_attention_heads
    need(head_dim * hf.num_attention_heads == hf.hidden_size,
         f"head_dim={head_dim}: must equal hidden_size / num_attention_heads")
    return dict(flavour="llama", vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
                num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
                num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
                ffn_hidden_size=hf.intermediate_size, tie_embeddings=bool(hf.tie_word_embeddings),
                norm_eps=float(hf.rms_norm_eps), init_std=float(hf.initializer_range), **positions)


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


def llama_rules(cfg: GPTConfig, arch: str) -> list[Rule]:
    """GPT Llama flavour <-> ``LlamaForCausalLM``; with ``moe``, MoE GPT <-> ``arch`` (:mod:`pretrain.hf.moe`)."""
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
        if cfg.qk_norm:
            rules += [same(o + "attn.q_norm.weight", h + "self_attn.q_norm.weight"),
                      same(o + "attn.k_norm.weight", h + "self_attn.k_norm.weight")]
        if cfg.moe.is_moe_layer(i):
            rules += layer_rules(cfg.moe, arch, o + "mlp.", h + "mlp.", cfg.hidden_size)
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
    table = gpt2_rules(cfg) if arch == GPT2 else llama_rules(cfg, arch)
    if not cfg.tie_embeddings:
        return table, {}
    return table, {"lm_head.weight": "transformer.wte.weight" if arch == GPT2 else "model.embed_tokens.weight"}


HF = HFSpec(classes={LLAMA: "LlamaConfig", GPT2: "GPT2Config", MISTRAL: "MistralConfig", **hf_moe.CLASSES},
            architecture=architecture, to_config=to_config,
            from_config={LLAMA: from_llama, GPT2: from_gpt2, MISTRAL: hf_window.importer(from_llama),
                         **{arch: hf_moe.importer(arch, from_llama) for arch in hf_moe.CLASSES}},
            rules=rules)
