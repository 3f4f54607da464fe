"""T5 v1.1 configuration (defaults: T5-small v1.1); ``moe.num_experts > 0`` makes it a Switch Transformer."""

from __future__ import annotations

from dataclasses import dataclass, field

from pretrain.models.attention import BACKENDS
from pretrain.models.gpt.config import CHECKPOINTING
from pretrain.models.mlp import ACTIVATIONS
from pretrain.models.moe import MoEConfig


@dataclass
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64  # per-head width; num_heads * d_kv need not equal d_model
    d_ff: int = 1024
    num_layers: int = 8  # encoder blocks
    num_decoder_layers: int | None = None  # None = num_layers
    num_heads: int = 6
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    activation: str = "geglu"  # T5 v1.1 gated-GELU; "relu" gives the original T5 FFN
    norm_eps: float = 1e-6
    tie_embeddings: bool = False  # v1.1 unties the LM head; tied heads scale the output by d_model**-0.5
    init_factor: float = 1.0  # Mesh-TF initializer_factor
    decoder_start_token_id: int = 0  # the pad id in T5 vocabularies
    attention_backend: str = "sdpa"
    activation_checkpointing: str = "none"
    checkpoint_every: int = 2
    moe: MoEConfig = field(default_factory=MoEConfig)

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
            raise ValueError("model.attention_backend=flash_attn cannot add T5's relative position bias; use sdpa")
        if self.activation_checkpointing not in CHECKPOINTING:
            raise ValueError(f"model.activation_checkpointing={self.activation_checkpointing!r}: "
                             f"expected one of {CHECKPOINTING}")
        self.moe.validate()
