"""What every family's Hugging Face config translation shares (each family's own lives in its folder,
``pretrain/models/<family>/hf.py``, and is reached through its spec's ``hf``): the architecture names, the
error type and the checks. The translations refuse what cannot be exact.

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
``capacity_factor_eval * top_k >= num_experts``, or ``model.moe.dropless``); export warns otherwise. The
top-k MoE classes (Mixtral, Qwen2/3-MoE, DeepSeek-V3, Glm4-MoE) are described in :mod:`pretrain.hf.moe`.
"""

from __future__ import annotations

import warnings

LLAMA, GPT2, QWEN2_MOE = "LlamaForCausalLM", "GPT2LMHeadModel", "Qwen2MoeForCausalLM"
T5, SWITCH = "T5ForConditionalGeneration", "SwitchTransformersForConditionalGeneration"
MISTRAL = "MistralForCausalLM"  # the Llama flavour with a sliding window (model.sparse.pattern=sliding_window)


class UnsupportedConfig(ValueError):
    """The config has no exact counterpart on the other side; the message names the field."""


def need(ok: bool, msg: str) -> None:
    if not ok:
        raise UnsupportedConfig(msg)


def get(hf, name: str, default=None):
    """A field of an HF config that older or newer ``transformers`` versions may lack."""
    return getattr(hf, name, default)


def warn_capacity(moe) -> None:
    if not moe.dropless and moe.capacity_factor_eval * moe.top_k < moe.num_experts:
        warnings.warn(f"model.moe.capacity_factor_eval={moe.capacity_factor_eval} < num_experts={moe.num_experts} "
                      f"/ top_k={moe.top_k}: "
                      "our model may drop tokens at evaluation, the exported (dropless) HF model never does",
                      stacklevel=3)
