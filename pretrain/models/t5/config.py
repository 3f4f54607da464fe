"""T5 v1.1 configuration (defaults: T5-small v1.1); ``moe.num_experts > 0`` makes it a Switch Transformer."""

from __future__ import annotations

from dataclasses import dataclass, field

from pretrain.models.attention import BACKENDS
from pretrain.models.gpt.config import CHECKPOINTING
from pretrain.models.mlp import ACTIVATIONS
from pretrain.models.moe import MoEConfig
from pretrain.models.patterns import SparseConfig


@dataclass
class T5Config:
    vocab_size: int = 32128  # token vocabulary (shared encoder/decoder embedding)
    d_model: int = 512  # model width
    d_kv: int = 64  # per-head width; num_heads * d_kv need not equal d_model
    d_ff: int = 1024  # feed-forward width
    num_layers: int = 8  # encoder blocks
    num_decoder_layers: int | None = None  # None = num_layers
    num_heads: int = 6  # attention heads (each d_kv wide)
    relative_attention_num_buckets: int = 32  # buckets of the relative position bias
    relative_attention_max_distance: int = 128  # distance beyond which relative positions share a bucket
    activation: str = "geglu"  # T5 v1.1 gated-GELU; "relu" gives the original T5 FFN
    norm_eps: float = 1e-6  # epsilon of the RMS norms
    tie_embeddings: bool = False  # v1.1 unties the LM head; tied heads scale the output by d_model**-0.5
    init_factor: float = 1.0  # Mesh-TF initializer_factor
    decoder_start_token_id: int = 0  # the pad id in T5 vocabularies
    attention_backend: str = "auto"  # auto | sdpa | reference; flash_attn cannot add the relative bias
    activation_checkpointing: str = "none"  # none | full (every block) | every_n (blocks 0, n, 2n, ...)
    checkpoint_every: int = 2  # n of activation_checkpointing=every_n
    moe: MoEConfig = field(default_factory=MoEConfig)  # Switch mixture-of-experts layers (model.moe.*)
    sparse: SparseConfig = field(default_factory=SparseConfig)  # encoder self-attention pattern (model.sparse.*)

    @property
    def decoder_layers(self) -> int:
        return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

    def validate(self) -> None:
        for key in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "decoder_layers", "num_heads",
                    "relative_attention_num_buckets", "relative_attention_max_distance", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key.replace('decoder_layers', 'num_decoder_layers')}="
                                 f"{getattr(self, key)}: must be a positive integer")
        if self.relative_attention_num_buckets < 4:
            raise ValueError("model.relative_attention_num_buckets must be >= 4 (T5 uses 32)")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"model.activation={self.activation!r}: expected one of {ACTIVATIONS}")
        if self.attention_backend not in BACKENDS:
            raise ValueError(f"model.attention_backend={self.attention_backend!r}: expected one of {BACKENDS}")
        if self.attention_backend == "flash_attn":
            raise ValueError("model.attention_backend=flash_attn: T5's self-attention adds a relative position bias, "
                             "which flash-attn cannot take; use model.attention_backend=auto (flash-attn where "
                             "it can run, sdpa elsewhere)")
        if self.activation_checkpointing not in CHECKPOINTING:
            raise ValueError(f"model.activation_checkpointing={self.activation_checkpointing!r}: "
                             f"expected one of {CHECKPOINTING}")
        self.moe.validate()
        self.sparse.validate()
        if self.sparse.enabled and self.sparse.kernel != "mask":
            raise ValueError(f"model.sparse.kernel={self.sparse.kernel}: T5 adds a relative position bias, which the "
                             "flex kernel does not take here; use model.sparse.kernel=mask")
