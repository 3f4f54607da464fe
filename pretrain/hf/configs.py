"""Our model configs <-> Hugging Face ``config.json``, per architecture, refusing what cannot be exact.

Every HF field that changes the computation is written explicitly (norm epsilon, RoPE theta, tied embeddings,
kv heads, dropout 0, activation, ...), never left to a ``transformers`` default. A setting with no exact HF
counterpart raises :class:`UnsupportedConfig` naming our field (export) or the HF field (import).

Switch-GPT maps to ``Qwen2MoeForCausalLM``: it routes with ``softmax`` over all experts, takes the top-k and
only renormalises when ``norm_topk_prob`` is set, so ``num_experts_per_tok=1, norm_topk_prob=False`` scales the
expert output by the router probability of the chosen expert, exactly Switch's top-1. Its shared expert is
given width 0 (its output is then exactly zero), its qkv bias is switched off (``qkv_bias=False``), and
``decoder_sparse_step`` = our ``moe.every`` places the expert layers identically. Mixtral (and most others)
renormalise the top-k probabilities, so top-1 weight would always be 1; Qwen3-MoE and OLMoE add q/k norms.
HF MoE layers (Qwen2-MoE, and Switch Transformers with ``expert_capacity`` set to the sequence-length bound)
never drop tokens, so they equal ours whenever our capacity drops none (always when
``capacity_factor_eval >= num_experts``); export warns otherwise.
"""

from __future__ import annotations

import warnings
from typing import Any

LLAMA, GPT2, QWEN2_MOE = "LlamaForCausalLM", "GPT2LMHeadModel", "Qwen2MoeForCausalLM"
T5, SWITCH = "T5ForConditionalGeneration", "SwitchTransformersForConditionalGeneration"
SUPPORTED_IMPORTS = (LLAMA, GPT2, T5)
DROPLESS_CAPACITY = 1 << 20  # Switch Transformers' per-sequence expert capacity: effectively dropless


class UnsupportedConfig(ValueError):
    """The config has no exact counterpart on the other side; the message names the field."""


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise UnsupportedConfig(msg)


def hf_architecture(family: str, cfg) -> str:
    if family == "gpt":
        if cfg.moe.enabled:
            _need(cfg.llama, "model.flavour=gpt2 with model.moe.num_experts>0: no Hugging Face decoder-only MoE "
                             "has LayerNorm, learned positions and biases; use flavour=llama for Switch-GPT")
            return QWEN2_MOE
        return LLAMA if cfg.llama else GPT2
    if family == "t5":
        return SWITCH if cfg.moe.enabled else T5
    raise UnsupportedConfig(f"model.family={family!r}: no Hugging Face export")


def _warn_capacity(moe) -> None:
    if moe.capacity_factor_eval < moe.num_experts:
        warnings.warn(f"model.moe.capacity_factor_eval={moe.capacity_factor_eval} < num_experts={moe.num_experts}: "
                      "our model may drop tokens at evaluation, the exported (dropless) HF model never does",
                      stacklevel=3)


def to_hf_config(family: str, cfg, specials: dict[str, int | None]) -> tuple[str, dict[str, Any]]:
    """``(architecture, config kwargs)`` for ``transformers.<Arch>Config(**kwargs)``."""
    arch = hf_architecture(family, cfg)
    ids = {k: specials.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if family == "gpt":
        common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings,
                      initializer_range=cfg.init_std, use_cache=True, **ids)
        if arch == GPT2:
            _need(cfg.kv_heads == cfg.num_heads, f"model.num_kv_heads={cfg.num_kv_heads}: GPT-2 has no "
                                                 "grouped-query attention (set it to null or num_heads)")
            return arch, dict(common, n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
                              n_inner=cfg.ffn_size, n_positions=cfg.max_seq_len, activation_function="gelu_new",
                              layer_norm_epsilon=cfg.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                              scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                              reorder_and_upcast_attn=False)
        llama = dict(common, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                     num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
                     intermediate_size=cfg.ffn_size, hidden_act="silu", max_position_embeddings=cfg.max_seq_len,
                     rms_norm_eps=cfg.norm_eps,
                     rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
                     attention_dropout=0.0)
        if arch == LLAMA:
            return arch, dict(llama, head_dim=cfg.head_dim, attention_bias=False, mlp_bias=False,
                          pretraining_tp=1)
        _need(cfg.head_dim * cfg.num_heads == cfg.hidden_size, "head_dim must be hidden_size / num_heads")
        _warn_capacity(cfg.moe)
        return arch, dict(llama, moe_intermediate_size=cfg.ffn_size, shared_expert_intermediate_size=0,
                          num_experts=cfg.moe.num_experts, num_experts_per_tok=1, norm_topk_prob=False,
                          decoder_sparse_step=cfg.moe.every, mlp_only_layers=[], qkv_bias=False,
                          use_sliding_window=False, output_router_logits=False,
                          router_aux_loss_coef=cfg.moe.aux_loss_weight)
    # T5 family
    common = dict(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff,
                  num_layers=cfg.num_layers, num_decoder_layers=cfg.decoder_layers, num_heads=cfg.num_heads,
                  relative_attention_num_buckets=cfg.relative_attention_num_buckets,
                  relative_attention_max_distance=cfg.relative_attention_max_distance, dropout_rate=0.0,
                  layer_norm_epsilon=cfg.norm_eps, initializer_factor=cfg.init_factor,
                  tie_word_embeddings=cfg.tie_embeddings, is_encoder_decoder=True, use_cache=True,
                  decoder_start_token_id=cfg.decoder_start_token_id, **ids)
    if arch == T5:
        proj = {"geglu": "gated-gelu", "swiglu": "gated-silu", "relu": "relu"}.get(cfg.activation)
        _need(proj is not None, f"model.activation={cfg.activation!r}: HF T5's 'gelu' is the exact erf GELU, ours "
                                "is the tanh approximation; use geglu, swiglu or relu")
        return arch, dict(common, feed_forward_proj=proj)
    moe = cfg.moe
    act = {"relu": "relu", "gelu": "gelu_new"}.get(cfg.activation)
    _need(act is not None, f"model.activation={cfg.activation!r}: Switch Transformers' feed-forward is not "
                           "gated; use relu or gelu for Switch-T5 export")
    _need(moe.every in (1, 2), f"model.moe.every={moe.every}: Switch Transformers puts experts in layers "
                               "i % step == 1 (or all), which matches every=1 or 2 only")
    _warn_capacity(moe)
    return arch, dict(common, dense_act_fn=act, num_experts=moe.num_experts, expert_capacity=DROPLESS_CAPACITY,
                      num_sparse_encoder_layers=len([i for i in range(cfg.num_layers) if moe.is_moe_layer(i)]),
                      num_sparse_decoder_layers=len([i for i in range(cfg.decoder_layers) if moe.is_moe_layer(i)]),
                      router_bias=False, router_jitter_noise=moe.jitter, router_dtype="float32",
                      router_ignore_padding_tokens=False, router_z_loss_coef=moe.z_loss_weight,
                      router_aux_loss_coef=moe.aux_loss_weight, add_router_probs=False)


def _get(hf, name: str, default=None):
    return getattr(hf, name, default)


def from_hf_config(hf) -> tuple[str, dict[str, Any]]:
    """``(family, our model config dict)`` from an HF ``PretrainedConfig``; refuses what we cannot represent."""
    arch = (_get(hf, "architectures") or [type(hf).__name__])[0]
    if arch not in SUPPORTED_IMPORTS:
        raise UnsupportedConfig(f"architecture {arch!r} cannot be imported; supported: {', '.join(SUPPORTED_IMPORTS)}")
    if arch == LLAMA:
        _need(hf.hidden_act == "silu", f"hidden_act={hf.hidden_act!r}: only silu (SwiGLU) is supported")
        _need(not _get(hf, "attention_bias") and not _get(hf, "mlp_bias"), "attention_bias/mlp_bias=true: our "
                                                                           "Llama flavour has no biases")
        rope = _get(hf, "rope_parameters") or {"rope_type": "default", "rope_theta": _get(hf, "rope_theta", 1e4)}
        _need(rope.get("rope_type", "default") == "default",
              f"rope_parameters.rope_type={rope.get('rope_type')!r}: only plain RoPE is supported")
        head_dim = _get(hf, "head_dim") or hf.hidden_size // hf.num_attention_heads
        _need(head_dim * hf.num_attention_heads == hf.hidden_size,
              f"head_dim={head_dim}: must equal hidden_size / num_attention_heads")
        return "gpt", dict(flavour="llama", vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
                           num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
                           num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
                           ffn_hidden_size=hf.intermediate_size, max_seq_len=hf.max_position_embeddings,
                           tie_embeddings=bool(hf.tie_word_embeddings), norm_eps=float(hf.rms_norm_eps),
                           rope_theta=float(rope["rope_theta"]), init_std=float(hf.initializer_range))
    if arch == GPT2:
        _need(hf.activation_function == "gelu_new",
              f"activation_function={hf.activation_function!r}: only gelu_new (tanh GELU) is supported")
        for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                          ("reorder_and_upcast_attn", False)):
            _need(bool(_get(hf, key, want)) == want, f"{key}={_get(hf, key)}: only {want} is supported")
        return "gpt", dict(flavour="gpt2", vocab_size=hf.vocab_size, hidden_size=hf.n_embd, num_layers=hf.n_layer,
                           num_heads=hf.n_head, ffn_hidden_size=hf.n_inner or 4 * hf.n_embd,
                           max_seq_len=hf.n_positions, tie_embeddings=bool(hf.tie_word_embeddings),
                           norm_eps=float(hf.layer_norm_epsilon), init_std=float(hf.initializer_range))
    acts = {("gelu_new", True): "geglu", ("silu", True): "swiglu", ("relu", False): "relu"}
    act = acts.get((hf.dense_act_fn, bool(hf.is_gated_act)))
    _need(act is not None, f"feed_forward_proj={hf.feed_forward_proj!r}: supported are gated-gelu, gated-silu, relu")
    return "t5", dict(vocab_size=hf.vocab_size, d_model=hf.d_model, d_kv=hf.d_kv, d_ff=hf.d_ff,
                      num_layers=hf.num_layers, num_decoder_layers=hf.num_decoder_layers, num_heads=hf.num_heads,
                      relative_attention_num_buckets=hf.relative_attention_num_buckets,
                      relative_attention_max_distance=hf.relative_attention_max_distance, activation=act,
                      norm_eps=float(hf.layer_norm_epsilon), tie_embeddings=bool(hf.tie_word_embeddings),
                      init_factor=float(hf.initializer_factor),
                      decoder_start_token_id=int(hf.decoder_start_token_id or 0))
