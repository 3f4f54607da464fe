"""Decoder-only GPT: Llama flavour (RMSNorm, RoPE, SwiGLU, GQA) or GPT-2 flavour (LayerNorm, learned positions)."""

from pretrain.models.gpt.config import GPTConfig
from pretrain.models.gpt.model import GPT, KVCache

CONFIG, MODEL = GPTConfig, GPT

__all__ = ["GPT", "GPTConfig", "KVCache"]
