"""Parameter counts and training FLOPs, from the config alone (used for MFU).

Training FLOPs follow PaLM (Chowdhery et al., 2022, appendix B) / Megatron: ``6 * N`` per token for every
weight that multiplies it (forward 2, backward 4), where ``N`` counts the *active* parameters (an MoE layer
counts its router, its top-k experts and its shared expert), excludes embedding lookups and includes the LM head
(tied or not); plus attention's ``QK^T`` and ``AV``: ``12 * layers * q_len * k_len * heads * head_dim`` per
sequence, without halving for causal masks (the PaLM convention).
"""

from __future__ import annotations

from typing import Any

import torch

from pretrain.models.gpt.config import GPTConfig
from pretrain.models.mlp import is_gated
from pretrain.models.t5.config import T5Config


def _mlp(dim: int, hidden: int, activation: str, bias: bool) -> int:
    width = hidden * (2 if is_gated(activation) else 1)
    return dim * width + hidden * dim + (width + dim if bias else 0)


def _ffn(cfg: Any, dim: int, hidden: int, activation: str, bias: bool, index: int, active: bool) -> int:
    moe = cfg.moe
    if not moe.is_moe_layer(index):
        return _mlp(dim, hidden, activation, bias)
    expert = _mlp(dim, moe.expert_ffn_size or hidden, activation, bias)
    shared = (_mlp(dim, moe.shared_ffn_size, activation, bias) if moe.shared_ffn_size else 0) + \
        (dim if moe.shared_gate else 0)
    return moe.num_experts * dim + expert * (moe.top_k if active else moe.num_experts) + shared


def _gpt_params(cfg: GPTConfig, active: bool) -> tuple[int, int]:
    """(all counted parameters, embedding-lookup parameters)."""
    d, bias = cfg.hidden_size, not cfg.llama
    norm = d if cfg.llama else 2 * d
    qkv = (cfg.num_heads + 2 * cfg.kv_heads) * cfg.head_dim
    attn = d * qkv + cfg.num_heads * cfg.head_dim * d + (qkv + d if bias else 0) + \
        (2 * cfg.head_dim if cfg.qk_norm else 0)  # QK-norm weights
    act = "swiglu" if cfg.llama else "gelu"
    blocks = sum(2 * norm + attn + _ffn(cfg, d, cfg.ffn_size, act, bias, i, active) for i in range(cfg.num_layers))
    embed = cfg.vocab_size * d + (0 if cfg.llama else cfg.max_seq_len * d)
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    return embed + blocks + norm + head, embed


def _t5_block(cfg: T5Config, index: int, decoder: bool, active: bool) -> int:
    inner, d = cfg.num_heads * cfg.d_kv, cfg.d_model
    attn = 4 * d * inner
    return (3 if decoder else 2) * d + attn * (2 if decoder else 1) + \
        _ffn(cfg, d, cfg.d_ff, cfg.activation, False, index, active)


def _t5_params(cfg: T5Config, active: bool) -> tuple[int, int, int]:
    """(encoder block params, decoder block params, everything else)."""
    enc = sum(_t5_block(cfg, i, False, active) for i in range(cfg.num_layers))
    dec = sum(_t5_block(cfg, i, True, active) for i in range(cfg.decoder_layers))
    rest = (cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)  # embedding (+ untied head)
            + 2 * cfg.relative_attention_num_buckets * cfg.num_heads + 2 * cfg.d_model)  # bias tables, final norms
    return enc, dec, rest


def gpt_param_count(cfg: GPTConfig, active: bool = False) -> int:
    """Number of parameters; ``active=True`` counts ``top_k`` experts per MoE layer (what a token uses)."""
    return _gpt_params(cfg, active)[0]


def t5_param_count(cfg: T5Config, active: bool = False) -> int:
    """As :func:`gpt_param_count`, for T5."""
    return sum(_t5_params(cfg, active))


def flops_per_token(cfg: GPTConfig, seq_len: int) -> float:
    """GPT training FLOPs per token at sequence length ``seq_len``."""
    total, embed = _gpt_params(cfg, active=True)
    matmul = total - embed + (cfg.vocab_size * cfg.hidden_size if cfg.tie_embeddings else 0)
    return 6.0 * matmul + 12.0 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim


def t5_flops_per_sample(cfg: T5Config, enc_len: int, dec_len: int) -> float:
    """T5 training FLOPs for one (encoder ``enc_len``, decoder ``dec_len``) sample."""
    enc, dec, _ = _t5_params(cfg, active=True)
    inner, d, v = cfg.num_heads * cfg.d_kv, cfg.d_model, cfg.vocab_size
    cross_kv = cfg.decoder_layers * 2 * d * inner  # cross-attention K/V project encoder tokens
    weights = enc * enc_len + (dec - cross_kv) * dec_len + cross_kv * enc_len + v * d * dec_len
    attn = cfg.num_layers * enc_len ** 2 + cfg.decoder_layers * (dec_len ** 2 + dec_len * enc_len)
    return 6.0 * weights + 12.0 * inner * attn


def gpt_batch_flops(cfg: GPTConfig, batch: dict[str, torch.Tensor]) -> float:
    """Training FLOPs of one forward+backward over ``batch`` (shapes only are read)."""
    b, s = batch["input_ids"].shape
    return b * s * flops_per_token(cfg, s)


def t5_batch_flops(cfg: T5Config, batch: dict[str, torch.Tensor]) -> float:
    """As :func:`gpt_batch_flops`, for T5."""
    b, s = batch["input_ids"].shape
    return b * t5_flops_per_sample(cfg, s, batch["decoder_input_ids"].shape[1])
