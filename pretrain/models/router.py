"""Token-choice routing of a mixture-of-experts layer and its auxiliary losses (see docs/design.md, MoE).

:func:`route` turns fp32 router logits ``[tokens, E]`` into ``k`` experts per token and their weights:

1. scores: ``softmax`` over the experts (Switch, Mixtral, Qwen-MoE) or a per-expert ``sigmoid`` (DeepSeek-V3);
2. selection: the top ``k`` of ``scores + expert_bias`` (the aux-loss-free bias steers selection only);
3. weights: the selected *unbiased* scores, divided by their sum when ``normalize_top_k``, times
   ``routed_scale``. With ``k = 1``, softmax and no bias this is Switch's ``probs.max(-1)``, bit for bit.

:func:`balance_loss` is the load-balancing loss ``(E / k) * sum_i f_i * P_i`` (``f_i``: fraction of tokens
that selected expert ``i``, ``P_i``: its mean normalised score); ``scope="batch"`` takes both over the
micro-batch (Switch; DeepSeek-V2's expert-level loss), ``"sequence"`` per sequence, averaged over sequences
(DeepSeek-V3's sequence-wise loss). Perfect balance gives 1 in both. :func:`z_loss` is ST-MoE's router z-loss.
"""

from __future__ import annotations

import torch

SCORES = ("softmax", "sigmoid")
SCOPES = ("batch", "sequence")


def scores_of(logits: torch.Tensor, score: str) -> torch.Tensor:
    return logits.softmax(-1) if score == "softmax" else logits.sigmoid()


def route(scores: torch.Tensor, k: int, bias: torch.Tensor | None, normalize: bool,
          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights [T, k], experts [T, k])`` of fp32 ``scores [T, E]``."""
    if k == 1 and bias is None:
        weight, expert = scores.max(-1, keepdim=True)
    else:
        expert = (scores if bias is None else scores + bias).topk(k, dim=-1).indices
        weight = scores.gather(-1, expert)
    if normalize:
        weight = weight / (weight.sum(-1, keepdim=True) + 1e-20)
    return (weight * scale if scale != 1.0 else weight), expert


def selection_hot(expert: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[..., tokens * k, E]`` float one-hot of the selections ``expert [..., tokens, k]`` (no range check, so
    no host sync)."""
    hot = expert.unsqueeze(-1) == torch.arange(num_experts, device=expert.device)
    return hot.flatten(-3, -2).float()


def balance_loss(scores: torch.Tensor, expert: torch.Tensor, score: str, scope: str,
                 batch_shape: torch.Size) -> torch.Tensor:
    """Load-balancing loss of ``scores [T, E]`` and the selections ``expert [T, k]`` (``T = prod(batch_shape)``,
    ``batch_shape = (batch, seq)``)."""
    num_experts, k = scores.shape[-1], expert.shape[-1]
    probs = scores if score == "softmax" else scores / scores.sum(-1, keepdim=True)
    if scope == "sequence":
        probs = probs.view(*batch_shape, num_experts)
        expert = expert.view(*batch_shape, k)
    frac = selection_hot(expert, num_experts).mean(-2)  # f_i / k: the fraction of the tokens' k selections
    return (num_experts * (frac * probs.mean(-2)).sum(-1)).mean()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits, -1).pow(2).mean()
