"""GPT configuration; ``flavour`` picks the Llama or GPT-2 architecture, the rest are sizes and switches."""

from __future__ import annotations

from dataclasses import dataclass, field

from pretrain.models.attention import BACKENDS, FLASH_MAX_HEAD_DIM
from pretrain.models.moe import MoEConfig
from pretrain.models.patterns import SparseConfig
from pretrain.models.rope import RopeScaling

FLAVOURS = ("llama", "gpt2")
CHECKPOINTING = ("none", "full", "every_n")


@dataclass
class GPTConfig:
    vocab_size: int = 32000  # token vocabulary (embedding rows and LM-head columns)
    hidden_size: int = 768  # model width d_model
    num_layers: int = 12  # transformer blocks
    num_heads: int = 12  # query heads; head_dim = hidden_size / num_heads
    num_kv_heads: int | None = None  # None = num_heads (no grouped-query attention)
    ffn_hidden_size: int | None = None  # None = 4*hidden (gpt2) or 8/3*hidden rounded up to 256 (llama)
    max_seq_len: int = 2048  # longest sequence (learned position table size for gpt2)
    flavour: str = "llama"  # llama (RMSNorm, RoPE, SwiGLU, no biases) | gpt2 (LayerNorm, learned positions, GELU)
    tie_embeddings: bool = False  # share the input embedding with the LM head
    norm_eps: float = 1e-5  # epsilon of every normalisation layer
    rope_theta: float = 10000.0  # RoPE base frequency (llama flavour)
    qk_norm: bool = False  # RMSNorm of every query and key head (over head_dim) before RoPE (Qwen3)
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)  # longer contexts (model.rope_scaling.*)
    sparse: SparseConfig = field(default_factory=SparseConfig)  # sparse attention pattern (model.sparse.*)
    init_std: float = 0.02  # std of the normal init; output projections are scaled by 1/sqrt(2*num_layers)
    attention_backend: str = "auto"  # auto | sdpa | flash_attn | reference (pretrain.models.attention)
    document_masking: bool = False  # attend only within the document (batch["document_ids"])
    activation_checkpointing: str = "none"  # none | full (every block) | every_n (blocks 0, n, 2n, ...)
    checkpoint_every: int = 2  # n of activation_checkpointing=every_n
    moe: MoEConfig = field(default_factory=MoEConfig)  # Switch mixture-of-experts layers (model.moe.*)

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        if self.flavour == "gpt2":
            return 4 * self.hidden_size
        return -(-(8 * self.hidden_size // 3) // 256) * 256

    @property
    def llama(self) -> bool:
        return self.flavour == "llama"

    def validate(self) -> None:
        if self.flavour not in FLAVOURS:
            raise ValueError(f"model.flavour={self.flavour!r}: expected one of {FLAVOURS}")
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_seq_len", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key}={getattr(self, key)}: must be a positive integer")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads="
                             f"{self.num_heads}; pick num_heads dividing hidden_size")
        if self.kv_heads < 1 or self.num_heads % self.kv_heads:
            raise ValueError(f"model.num_kv_heads={self.num_kv_heads} must divide model.num_heads={self.num_heads}")
        if self.llama and self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} must be even for RoPE; change model.num_heads")
        if self.ffn_size < 1:
            raise ValueError(f"model.ffn_hidden_size={self.ffn_hidden_size}: must be positive or null")
        if self.attention_backend not in BACKENDS:
            raise ValueError(f"model.attention_backend={self.attention_backend!r}: expected one of {BACKENDS}")
        if self.attention_backend == "flash_attn" and self.head_dim > FLASH_MAX_HEAD_DIM:
            raise ValueError(f"model.attention_backend=flash_attn: head dim {self.head_dim} (hidden_size / num_heads) "
                             f"is above flash-attn's {FLASH_MAX_HEAD_DIM}; use model.attention_backend=auto "
                             "or more heads")
        if self.activation_checkpointing not in CHECKPOINTING:
            raise ValueError(f"model.activation_checkpointing={self.activation_checkpointing!r}: "
                             f"expected one of {CHECKPOINTING}")
        self.moe.validate()
        self.rope_scaling.validate(self.max_seq_len)
        if self.rope_scaling.type != "none" and not self.llama:
            raise ValueError("model.rope_scaling.type needs model.flavour=llama (gpt2 has learned positions)")
        self.sparse.validate()
