"""What each Hugging Face mixture-of-experts class can compute, the check that refuses the rest (naming our
``model.moe.*`` field), and the weight rules of one MoE layer; family-independent (GPT's config translation is
``pretrain/models/gpt/hf_moe.py``, T5's Switch check is in ``pretrain/models/t5/hf.py``).

Per token every class computes ``sum_j w_j * expert_{i_j}(x) [+ shared(x)]`` like our layer
(:mod:`pretrain.models.moe`); they differ in how the router scores and weights experts:

* ``MixtralForCausalLM``: softmax over all experts, top-k, renormalised (weights sum to 1); experts in every
  block, no shared expert.
* ``Qwen2MoeForCausalLM``: softmax, top-k, renormalised only with ``norm_topk_prob``; a shared expert of its own
  width whose output is scaled by ``sigmoid(x @ shared_expert_gate)``; dense blocks by ``decoder_sparse_step``
  and ``mlp_only_layers``. Switch-GPT exports here with ``num_experts_per_tok=1, norm_topk_prob=False`` and a
  width-0 shared expert.
* ``Qwen3MoeForCausalLM``: Qwen2-MoE's router without the shared expert; its attention always applies a
  per-head RMSNorm to queries and keys before RoPE (``q_norm``/``k_norm``): our ``model.qk_norm``.
* ``DeepseekV3ForCausalLM``: its attention is always multi-head latent attention (``kv_lora_rank``, a low-rank
  key/value projection with an RMSNorm inside): refused; its MoE layer is exactly ``Glm4MoeForCausalLM``'s.
* ``Glm4MoeForCausalLM`` (the DeepSeek-V3 MoE with standard grouped-query attention): sigmoid scores, selection
  by ``scores + e_score_correction_bias`` (our aux-loss-free ``expert_bias``), weights the unbiased scores,
  optionally renormalised, times ``routed_scaling_factor``; ``n_shared_experts`` ungated shared experts of the
  expert width; the first ``first_k_dense_replace`` blocks dense; q/k norms as ``use_qk_norm``. Exported with
  ``n_group = topk_group = 1`` (we have no group-limited routing) and ``partial_rotary_factor=1``.

HF MoE layers never drop tokens: equal to ours when dropless (``model.moe.dropless``) or when the evaluation
capacity cannot drop (``capacity_factor_eval * top_k >= num_experts``); export warns otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pretrain.hf.configs import QWEN2_MOE, need
from pretrain.hf.mapping import Rule, constant, experts, gated, same

MIXTRAL, QWEN3_MOE = "MixtralForCausalLM", "Qwen3MoeForCausalLM"
DEEPSEEK_V3, GLM4_MOE = "DeepseekV3ForCausalLM", "Glm4MoeForCausalLM"


@dataclass(frozen=True)
class Router:
    """What one HF MoE class computes, as our ``model.moe`` settings."""

    arch: str
    scores: tuple[str, ...] = ("softmax",)  # model.moe.score values it has
    normalize: tuple[bool, ...] = (False, True)  # model.moe.normalize_top_k values it has
    top_k: bool = True  # any k (False: top-1 only)
    shared: str = ""  # shared expert: "" none, "gated" (sigmoid-gated, any width), "plain" (n x expert width)
    scale: bool = False  # a routed-weight scale (routed_scaling_factor)
    bias: bool = False  # a selection-only expert bias (e_score_correction_bias)


ROUTERS = {
    MIXTRAL: Router(MIXTRAL, normalize=(True,)),
    QWEN2_MOE: Router(QWEN2_MOE, shared="gated"),
    QWEN3_MOE: Router(QWEN3_MOE),
    GLM4_MOE: Router(GLM4_MOE, scores=("sigmoid",), shared="plain", scale=True, bias=True),
}
SWITCH_ROUTER = Router("SwitchTransformersForConditionalGeneration", normalize=(False,), top_k=False)


def check_router(moe, router: Router, ffn: int) -> None:
    """Refuse, naming our field, a router setting ``router.arch`` cannot compute."""
    arch = router.arch
    need(router.top_k or moe.top_k == 1, f"model.moe.top_k={moe.top_k}: {arch} routes each token to one expert")
    need(moe.score in router.scores, f"model.moe.score={moe.score!r}: {arch} scores experts with "
                                     f"{' or '.join(router.scores)}")
    need(moe.normalize_top_k in router.normalize, f"model.moe.normalize_top_k={moe.normalize_top_k}: {arch} "
                                                  f"{'always' if moe.normalize_top_k is False else 'never'} "
                                                  "renormalises the top-k weights")
    need(router.scale or moe.routed_scale == 1, f"model.moe.routed_scale={moe.routed_scale}: {arch} has no "
                                                "routed-weight scale (DeepSeek's routed_scaling_factor)")
    need(router.bias or moe.bias_update_rate == 0, f"model.moe.bias_update_rate={moe.bias_update_rate}: {arch} "
                                                   "has no expert bias (aux-loss-free balancing)")
    need(router.shared or not moe.shared_ffn_size, f"model.moe.shared_ffn_size={moe.shared_ffn_size}: {arch} has "
                                                   "no shared expert")
    need(not moe.shared_ffn_size or moe.shared_gate == (router.shared == "gated"),
         f"model.moe.shared_gate={moe.shared_gate}: {arch}'s shared expert is "
         f"{'gated by sigmoid(x @ w)' if router.shared == 'gated' else 'not gated'}")
    width = moe.expert_hidden(ffn)
    need(router.shared != "plain" or moe.shared_ffn_size % width == 0,
         f"model.moe.shared_ffn_size={moe.shared_ffn_size}: {arch} has n_shared_experts shared experts of the "
         f"expert width {width}; use a multiple of it")


def _shared_rules(moe, ours: str, hf: str, dim: int) -> list[Rule]:
    """Our shared expert (a dense MLP) <-> the HF shared MLP; zero-width HF tensors when we have none."""
    if moe.shared_ffn_size:
        return [gated(ours + "shared.w_in.weight", hf + "gate_proj.weight", hf + "up_proj.weight"),
                same(ours + "shared.w_out.weight", hf + "down_proj.weight")]
    return [constant(hf + "gate_proj.weight", lambda: torch.zeros(0, dim)),
            constant(hf + "up_proj.weight", lambda: torch.zeros(0, dim)),
            constant(hf + "down_proj.weight", lambda: torch.zeros(dim, 0))]


def layer_rules(moe, arch: str, ours: str, hf: str, dim: int) -> list[Rule]:
    """One MoE layer: our ``{ours}router/w_in/w_out/...`` <-> ``{hf}gate/experts/...`` of ``arch``."""
    rules = [same(ours + "router", hf + "gate.weight"), experts(ours + "w_in", hf + "experts.gate_up_proj"),
             experts(ours + "w_out", hf + "experts.down_proj")]
    if arch == QWEN2_MOE:
        gate = hf + "shared_expert_gate.weight"
        rules += _shared_rules(moe, ours, hf + "shared_expert.", dim)
        rules.append(same(ours + "shared_gate", gate) if moe.shared_gate else
                     constant(gate, lambda: torch.zeros(1, dim)))
    if arch == GLM4_MOE:
        bias = hf + "gate.e_score_correction_bias"
        rules += _shared_rules(moe, ours, hf + "shared_experts.", dim)
        rules.append(same(ours + "expert_bias", bias) if moe.bias_update_rate > 0 else
                     constant(bias, lambda: torch.zeros(moe.num_experts)))
    return rules
