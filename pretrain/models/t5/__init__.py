"""T5 v1.1 encoder-decoder (relative position buckets, RMSNorm, gated-GELU, no biases); Switch by config."""

from pretrain.models.t5.config import T5Config
from pretrain.models.t5.model import T5

CONFIG, MODEL = T5Config, T5

__all__ = ["T5", "T5Config"]
