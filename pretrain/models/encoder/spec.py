"""The encoder family's spec (see :mod:`pretrain.models.spec`), with its parameter count and training FLOPs
(the conventions of :mod:`pretrain.models.flops`: ``6 * N`` per token for the weights a token multiplies, the
tied MLM decoder included and embedding lookups excluded, plus ``12 * layers * s * k * d`` for attention, where a
ModernBERT local layer's token sees at most ``k = local_window + 1`` keys)."""

from __future__ import annotations

import torch

from pretrain.models.encoder import parallelize
from pretrain.models.encoder.config import EncoderConfig
from pretrain.models.encoder.hf import HF
from pretrain.models.encoder.model import Encoder
from pretrain.models.spec import ModelSpec


def _params(cfg: EncoderConfig) -> tuple[int, int]:
    """(all parameters, embedding-lookup parameters)."""
    d, v, bias = cfg.hidden_size, cfg.vocab_size, cfg.biases
    norm = 2 * d if bias else d
    width = cfg.ffn_hidden_size * (2 if cfg.modern else 1)
    block = 4 * d * d + d * width + cfg.ffn_hidden_size * d + ((4 * d + width + d) if bias else 0) + 2 * norm
    blocks = cfg.num_layers * block - (norm if cfg.modern else 0)  # ModernBERT's first block: no attention norm
    lookups = v * d + (0 if cfg.modern else cfg.max_seq_len * d) + cfg.type_vocab_size * d
    head = d * d + (d if bias else 0) + norm + v  # transform, its norm, the decoder bias (decoder tied)
    nsp = d * d + d + 2 * d + 2 if cfg.nsp_head else 0
    return lookups + norm + blocks + (norm if cfg.modern else 0) + head + nsp, lookups


def param_count(cfg: EncoderConfig, active: bool = False) -> int:
    """Number of parameters (``active`` changes nothing: there are no experts)."""
    return _params(cfg)[0]


def batch_flops(cfg: EncoderConfig, batch: dict[str, torch.Tensor]) -> float:
    """Training FLOPs of one forward+backward over ``batch`` (shapes only are read)."""
    b, s = batch["input_ids"].shape
    total, lookups = _params(cfg)
    weights = total - lookups + cfg.vocab_size * cfg.hidden_size
    keys = sum(s if cfg.is_global(i) else min(s, cfg.local_window + 1) for i in range(cfg.num_layers))
    return b * s * (6.0 * weights + 12.0 * keys * cfg.hidden_size)


SPEC = ModelSpec(
    name="encoder", config=EncoderConfig, model=Encoder, dataset="mlm", tp_sizes=parallelize.tp_sizes,
    pipeline_blocks=parallelize.pipeline_blocks, parallelize=parallelize.parallelize,
    pipeline_stage=parallelize.pipeline_stage, stage_inputs=parallelize.stage_inputs, batch_flops=batch_flops,
    param_count=param_count, hf=HF,
)
