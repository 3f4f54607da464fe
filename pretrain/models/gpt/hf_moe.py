"""MoE GPT (Llama flavour) <-> Hugging Face MoE decoders: Mixtral, Qwen2-MoE, Qwen3-MoE (with ``model.qk_norm``),
DeepSeek-V3-style (as ``Glm4MoeForCausalLM``), with DeepSeek-V3 itself refused naming the field; what each class
computes is in :mod:`pretrain.hf.moe`.

Export picks the architecture with ``pretrain export --architecture``, else the one the checkpoint was
imported from, else :func:`default_architecture`: sigmoid scores, an expert bias, a routed scale or an ungated
shared expert -> Glm4-MoE; otherwise Qwen3-MoE with QK-norm; otherwise Mixtral when every block is top-k
(k >= 2) renormalised without a shared expert; otherwise Qwen2-MoE (which includes Switch). Import gives a
dropless model without router jitter and z-loss (HF has neither); Glm4-MoE imports with aux-loss-free balancing
on (``bias_update_rate`` 1e-3, DeepSeek-V3's gamma) so its ``e_score_correction_bias`` has a home.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from pretrain.hf.configs import QWEN2_MOE, get, need, warn_capacity
from pretrain.hf.moe import DEEPSEEK_V3, GLM4_MOE, MIXTRAL, QWEN3_MOE, ROUTERS, check_router
from pretrain.models.gpt.config import GPTConfig

CLASSES = {MIXTRAL: "MixtralConfig", QWEN2_MOE: "Qwen2MoeConfig", QWEN3_MOE: "Qwen3MoeConfig",
           DEEPSEEK_V3: "DeepseekV3Config", GLM4_MOE: "Glm4MoeConfig"}
IMPORTED_BIAS_RATE = 1e-3  # DeepSeek-V3's bias update speed gamma


REFUSED = {  # architectures that cannot hold our GPT at all, and why
    DEEPSEEK_V3: f"{DEEPSEEK_V3}: its attention is multi-head latent attention (kv_lora_rank, q_lora_rank, "
                 "qk_rope_head_dim), which our grouped-query attention cannot express; its MoE layer is "
                 f"{GLM4_MOE}'s, so export DeepSeek-style MoE with --architecture {GLM4_MOE}",
}
QK_NORM = {QWEN3_MOE: True, GLM4_MOE: None}  # archs with q/k norms: always (True) or as configured (None)


def default_architecture(cfg: GPTConfig) -> str:
    moe = cfg.moe
    if moe.score == "sigmoid" or moe.bias_update_rate > 0 or moe.routed_scale != 1 or \
            (moe.shared_ffn_size and not moe.shared_gate):
        return GLM4_MOE
    if cfg.qk_norm:
        return QWEN3_MOE
    if moe.top_k > 1 and moe.normalize_top_k and moe.every == 1 and not moe.first_dense and not moe.shared_ffn_size:
        return MIXTRAL
    return QWEN2_MOE


def to_config(cfg: GPTConfig, arch: str, llama: dict[str, Any]) -> dict[str, Any]:
    """HF config kwargs of MoE ``arch`` from the Llama kwargs, refusing what it cannot compute (naming the field)."""
    moe = cfg.moe
    need(arch not in REFUSED, REFUSED.get(arch, ""))
    need(cfg.llama, f"model.flavour={cfg.flavour}: {arch} is a Llama-style decoder; use flavour=llama")
    need(moe.enabled, f"model.moe.num_experts=0: {arch} is a mixture of experts; a dense model exports as "
                      "LlamaForCausalLM")
    need(QK_NORM.get(arch, False) in (None, cfg.qk_norm),
         f"model.qk_norm={str(cfg.qk_norm).lower()}: {arch} {'never' if cfg.qk_norm else 'always'} normalises "
         "queries and keys per head")
    check_router(moe, ROUTERS[arch], cfg.ffn_size)
    warn_capacity(moe)
    width = moe.expert_hidden(cfg.ffn_size)
    common = dict(llama, num_experts_per_tok=moe.top_k, output_router_logits=False)
    if arch in (QWEN2_MOE, QWEN3_MOE):
        qwen = dict(common, moe_intermediate_size=width, num_experts=moe.num_experts,
                    norm_topk_prob=moe.normalize_top_k, decoder_sparse_step=moe.every,
                    mlp_only_layers=list(range(moe.first_dense)), use_sliding_window=False,
                    router_aux_loss_coef=moe.aux_loss_weight)
        if arch == QWEN3_MOE:
            return dict(qwen, head_dim=cfg.head_dim, attention_bias=False)
        return dict(qwen, shared_expert_intermediate_size=moe.shared_ffn_size, qkv_bias=False)
    need(moe.every == 1, f"model.moe.every={moe.every}: {arch} has experts in every block (after "
                         f"{'the first dense ones' if arch == GLM4_MOE else 'none dense'}); use every=1")
    if arch == MIXTRAL:
        need(moe.first_dense == 0, f"model.moe.first_dense={moe.first_dense}: {arch} has no dense blocks")
        return dict(common, intermediate_size=width, num_local_experts=moe.num_experts, router_jitter_noise=0.0,
                    sliding_window=None, head_dim=cfg.head_dim, router_aux_loss_coef=moe.aux_loss_weight)
    return dict(common, moe_intermediate_size=width, n_routed_experts=moe.num_experts,
                n_shared_experts=moe.shared_ffn_size // width, routed_scaling_factor=float(moe.routed_scale),
                n_group=1, topk_group=1, first_k_dense_replace=moe.first_dense, norm_topk_prob=moe.normalize_top_k,
                use_qk_norm=cfg.qk_norm, attention_bias=False, head_dim=cfg.head_dim,
                rope_parameters=dict(llama["rope_parameters"], partial_rotary_factor=1.0))


Llama = Callable[[Any], dict[str, Any]]  # HF config -> our attention, norm, embedding and RoPE values


def _imported(hf, llama: Llama, experts: int, width: int, **moe: Any) -> dict[str, Any]:
    """Our model config: the Llama part plus a dropless, jitter-free ``moe`` section."""
    base = dict(num_experts=experts, top_k=hf.num_experts_per_tok, expert_ffn_size=width, dropless=True,
                jitter=0.0, z_loss_weight=0.0)
    return dict(llama(hf), moe=dict(base, **moe))


def from_mixtral(hf, llama: Llama) -> dict[str, Any]:
    need(not get(hf, "sliding_window"), f"{MIXTRAL} sliding_window={get(hf, 'sliding_window')}: our attention has "
                                        "no sliding window")
    return _imported(hf, llama, hf.num_local_experts, hf.intermediate_size, every=1, normalize_top_k=True,
                     aux_loss_weight=float(hf.router_aux_loss_coef))


def _first_dense(hf, arch: str) -> int:
    dense = list(get(hf, "mlp_only_layers") or [])
    need(dense == list(range(len(dense))), f"{arch} mlp_only_layers={dense}: only a leading run of dense blocks "
                                           "(model.moe.first_dense) is supported")
    return len(dense)


def _from_qwen(hf, llama: Llama, arch: str, **moe: Any) -> dict[str, Any]:
    for key in ("qkv_bias", "attention_bias", "use_sliding_window"):
        need(not get(hf, key), f"{arch} {key}={get(hf, key)}: our attention has neither biases nor a sliding window")
    return _imported(hf, llama, hf.num_experts, hf.moe_intermediate_size, every=hf.decoder_sparse_step,
                     first_dense=_first_dense(hf, arch), normalize_top_k=bool(hf.norm_topk_prob),
                     aux_loss_weight=float(hf.router_aux_loss_coef), **moe)


def from_qwen2_moe(hf, llama: Llama) -> dict[str, Any]:
    shared = hf.shared_expert_intermediate_size
    return _from_qwen(hf, llama, QWEN2_MOE, shared_ffn_size=shared, shared_gate=shared > 0)


def from_qwen3_moe(hf, llama: Llama) -> dict[str, Any]:
    return dict(_from_qwen(hf, llama, QWEN3_MOE), qk_norm=True)


def from_glm4_moe(hf, llama: Llama) -> dict[str, Any]:
    need(not get(hf, "attention_bias"), f"{GLM4_MOE} attention_bias=True: our attention has no biases")
    partial = (get(hf, "rope_parameters") or {}).get("partial_rotary_factor", get(hf, "partial_rotary_factor", 1.0))
    need(partial == 1.0, f"{GLM4_MOE} partial_rotary_factor={partial}: our RoPE rotates the whole head (1.0)")
    full = copy.copy(hf)  # the Llama part reads plain rope_parameters
    full.rope_parameters = {k: v for k, v in hf.rope_parameters.items() if k != "partial_rotary_factor"}
    need(hf.n_group == hf.topk_group, f"{GLM4_MOE} n_group={hf.n_group}, topk_group={hf.topk_group}: we have no "
                                      "group-limited routing (it is a no-op only when topk_group == n_group)")
    width = hf.moe_intermediate_size
    ours = _imported(full, llama, hf.n_routed_experts, width, every=1, first_dense=hf.first_k_dense_replace,
                     score="sigmoid", normalize_top_k=bool(hf.norm_topk_prob),
                     routed_scale=float(hf.routed_scaling_factor), shared_ffn_size=hf.n_shared_experts * width,
                     bias_update_rate=IMPORTED_BIAS_RATE, aux_loss_weight=0.0)
    return dict(ours, qk_norm=bool(get(hf, "use_qk_norm")))


FROM_CONFIG = {MIXTRAL: from_mixtral, QWEN2_MOE: from_qwen2_moe, QWEN3_MOE: from_qwen3_moe, GLM4_MOE: from_glm4_moe}


def importer(arch: str, llama: Llama) -> Callable[[Any], dict[str, Any]]:
    """``hf_config -> our model config values`` for MoE ``arch``; ``llama`` translates the attention part."""
    def convert(hf) -> dict[str, Any]:
        need(arch not in REFUSED, REFUSED.get(arch, ""))
        return FROM_CONFIG[arch](hf, llama)

    return convert
