"""GPT with a causal sliding window (``model.sparse.pattern=sliding_window``) <-> ``MistralForCausalLM``.

Mistral is Llama's architecture and weight names plus ``sliding_window``: a query sees the ``sliding_window``
keys ending at itself (``transformers``' ``kv_idx > q_idx - sliding_window``), which is our ``window``. Other
patterns (global tokens, BigBird) and sparse MoE models have no exact Hugging Face counterpart and are refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pretrain.hf.configs import MISTRAL, get, need
from pretrain.models.gpt.config import GPTConfig


def architecture(cfg: GPTConfig) -> str:
    sparse = cfg.sparse
    need(cfg.llama and not cfg.moe.enabled and sparse.pattern == "sliding_window" and sparse.global_tokens == 0,
         f"model.sparse.pattern={sparse.pattern} (global_tokens={sparse.global_tokens}): only a plain causal "
         "sliding window on a dense Llama-flavour model has a Hugging Face counterpart (Mistral)")
    return MISTRAL


def check(cfg: GPTConfig, arch: str) -> None:
    """Refuse exporting a sparse pattern as any architecture but Mistral (an imported Llama keeps its class)."""
    need(arch == MISTRAL or not cfg.sparse.enabled, f"model.sparse.pattern={cfg.sparse.pattern}: {arch} has no "
                                                    f"sparse attention; export as {MISTRAL} (--architecture)")


def to_config(cfg: GPTConfig, llama: dict[str, Any]) -> dict[str, Any]:
    """Mistral's config from the Llama fields ``llama`` (a dense model: ``sliding_window`` null)."""
    if cfg.sparse.enabled:
        architecture(cfg)  # refuses global tokens, BigBird and MoE
    return dict(llama, head_dim=cfg.head_dim, sliding_window=cfg.sparse.window if cfg.sparse.enabled else None)


def importer(from_llama: Callable[[Any], dict[str, Any]]) -> Callable[[Any], dict[str, Any]]:
    """Mistral's config translation: the Llama one plus the window (none: dense attention)."""

    def from_mistral(hf) -> dict[str, Any]:
        window = get(hf, "sliding_window")
        sparse = {} if window is None else dict(sparse=dict(pattern="sliding_window", window=int(window)))
        return dict(from_llama(hf), **sparse)

    return from_mistral
