"""How an encoder is parallelised: the sizes tensor parallelism splits, activation checkpointing, and the cut
of a pipeline stage (blocks ``[start, end)``; the embeddings on the first stage, the final norm and MLM head on
the last, the tied word embedding on both). Tensor and sequence parallelism come from the layer factory.
"""

from __future__ import annotations

import torch

from pretrain.models.encoder.config import EncoderConfig
from pretrain.models.encoder.model import Encoder
from pretrain.parallel.parallelize import checkpoint_blocks, keep_blocks, shell


def tp_sizes(cfg: EncoderConfig) -> dict[str, int]:
    return {"model.num_heads": cfg.num_heads, "model.ffn_hidden_size": cfg.ffn_hidden_size,
            "model.vocab_size": cfg.vocab_size}


def pipeline_blocks(cfg: EncoderConfig) -> int:
    return cfg.num_layers


def parallelize(model: Encoder) -> None:
    checkpoint_blocks(model.blocks, model.cfg.activation_checkpointing, model.cfg.checkpoint_every)


def pipeline_stage(model: Encoder, blocks: range, first: bool, last: bool) -> Encoder:
    """``model`` keeping ``blocks``; the MLM decoder is tied to the word embedding, so the last stage keeps it
    too (its gradient is summed over the two stages like GPT's tied head)."""
    stage = shell(model)
    stage.blocks = keep_blocks(model.blocks, blocks)
    if not first:
        stage.pos_emb = stage.type_emb = stage.emb_norm = None
    if not (first or last):
        stage.tok_emb = None
    if not last:
        stage.norm = stage.head_dense = stage.head_norm = stage.head = stage.head_bias = None
        stage.pooler = stage.nsp = None
    return stage


def stage_inputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``(input ids, attention mask, token types, document ids)``, the defaults filled in for absent keys."""
    ids = batch["input_ids"]
    return ids, *(batch[key] if key in batch else fill(ids) for key, fill in (
        ("attention_mask", torch.ones_like), ("token_type_ids", torch.zeros_like), ("document_ids", torch.zeros_like)))
