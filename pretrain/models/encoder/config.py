"""Encoder configuration (defaults: BERT-base); ``flavour`` picks BERT, RoBERTa or the ModernBERT-style encoder.

* ``bert``: post-LayerNorm blocks, learned absolute positions, token types (segment A/B), GELU, biases;
  optionally the pooler + next-sentence (or sentence-order) head (``nsp_head``).
* ``roberta``: BERT's architecture with one token type and positions offset past the pad id (``pad_token_id +
  1`` for the first token, as fairseq/Hugging Face number them), so ``max_seq_len`` is 514 for 512 tokens.
* ``modernbert``: pre-LayerNorm without biases, RoPE, GeGLU, every ``global_every``-th layer global and the others
  local (each token sees ``local_window // 2`` tokens either side), a final norm.

``configs/bert_base.yaml``, ``bert_large``, ``roberta_base`` and ``modernbert_base`` hold the published sizes
(``tests/test_encoder.py`` checks their parameter counts).
"""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.models.attention import BACKENDS
from pretrain.models.gpt.config import CHECKPOINTING
from pretrain.models.moe import MoEConfig

FLAVOURS = ("bert", "roberta", "modernbert")


@dataclass
class EncoderConfig:
    vocab_size: int = 30522  # token vocabulary (embedding rows; the MLM head is tied to them)
    hidden_size: int = 768  # model width
    num_layers: int = 12  # transformer blocks
    num_heads: int = 12  # attention heads; head_dim = hidden_size / num_heads
    ffn_hidden_size: int = 3072  # feed-forward width (of each half of ModernBERT's GeGLU)
    max_seq_len: int = 512  # learned position table rows (bert, roberta: 514 = 512 + pad offset); RoPE table length
    flavour: str = "bert"  # bert | roberta | modernbert (see the module docstring)
    type_vocab_size: int = 2  # token types: bert 2, roberta 1, modernbert 0 (none)
    pad_token_id: int = 0  # padding id; roberta numbers positions from pad_token_id + 1
    norm_eps: float = 1e-12  # LayerNorm epsilon (BERT 1e-12, RoBERTa and ModernBERT 1e-5)
    init_std: float = 0.02  # std of the normal init of every weight
    nsp_head: bool = False  # bert: pooler + 2-way next-sentence / sentence-order classifier on the first token
    global_every: int = 3  # modernbert: layers 0, n, 2n, ... attend globally, the others locally
    local_window: int = 128  # modernbert: a local layer's token sees local_window // 2 tokens on either side
    global_rope_theta: float = 160000.0  # modernbert: RoPE base of the global layers
    local_rope_theta: float = 10000.0  # modernbert: RoPE base of the local layers
    attention_backend: str = "auto"  # auto | sdpa | flash_attn | reference (pretrain.models.attention)
    document_masking: bool = False  # packed samples: attend within each document, positions restart per document
    activation_checkpointing: str = "none"  # none | full (every block) | every_n (blocks 0, n, 2n, ...)
    checkpoint_every: int = 2  # n of activation_checkpointing=every_n

    @property
    def moe(self) -> MoEConfig:
        """Encoders have no Switch layers (the spec's contract asks every config for one)."""
        return MoEConfig()

    @property
    def modern(self) -> bool:
        return self.flavour == "modernbert"

    @property
    def biases(self) -> bool:
        """BERT and RoBERTa have biases in every linear layer and LayerNorm; ModernBERT none."""
        return not self.modern

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def position_offset(self) -> int:
        """Position id of the first token: roberta's ``pad_token_id + 1``, else 0."""
        return self.pad_token_id + 1 if self.flavour == "roberta" else 0

    @property
    def max_tokens(self) -> int:
        """The longest input the position table (or RoPE table) allows."""
        return self.max_seq_len - self.position_offset

    def is_global(self, index: int) -> bool:
        return not self.modern or index % self.global_every == 0

    def validate(self) -> None:
        if self.flavour not in FLAVOURS:
            raise ValueError(f"model.flavour={self.flavour!r}: expected one of {FLAVOURS}")
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size", "max_seq_len",
                    "global_every", "local_window", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key}={getattr(self, key)}: must be a positive integer")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads="
                             f"{self.num_heads}; pick num_heads dividing hidden_size")
        if self.modern and self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} must be even for RoPE; change model.num_heads")
        if self.modern and self.type_vocab_size:
            raise ValueError(f"model.type_vocab_size={self.type_vocab_size}: flavour=modernbert has no token types; "
                             "set it to 0")
        if not self.modern and self.type_vocab_size < 1:
            raise ValueError(f"model.type_vocab_size={self.type_vocab_size}: flavour={self.flavour} needs at least "
                             "1 (bert 2, roberta 1)")
        if self.nsp_head and self.flavour != "bert":
            raise ValueError(f"model.nsp_head=true: only flavour=bert has a next-sentence head (got {self.flavour})")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"model.pad_token_id={self.pad_token_id}: must be a token id below model.vocab_size")
        if self.max_tokens < 1:
            raise ValueError(f"model.max_seq_len={self.max_seq_len} leaves no positions after roberta's offset "
                             f"pad_token_id + 1 = {self.position_offset}")
        if self.attention_backend not in BACKENDS:
            raise ValueError(f"model.attention_backend={self.attention_backend!r}: expected one of {BACKENDS}")
        if self.activation_checkpointing not in CHECKPOINTING:
            raise ValueError(f"model.activation_checkpointing={self.activation_checkpointing!r}: "
                             f"expected one of {CHECKPOINTING}")

