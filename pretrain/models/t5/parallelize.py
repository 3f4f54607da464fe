"""How a T5 is parallelised: the sizes tensor parallelism splits, activation checkpointing of both stacks, and
the cut of a pipeline stage. A pipeline splits the encoder's blocks followed by the decoder's; the first stage
keeps the shared embedding (it embeds both inputs), the last the head (and the embedding for a tied head); a
stage keeps a stack's bias table when it holds any of the stack's blocks and its final norm with its last block.
"""

from __future__ import annotations

import torch

from pretrain.models.t5.config import T5Config
from pretrain.models.t5.model import T5, Stack
from pretrain.parallel.parallelize import PassThrough, checkpoint_blocks, keep_blocks, shell


def tp_sizes(cfg: T5Config) -> dict[str, int]:
    return {"model.num_heads": cfg.num_heads, "model.d_ff": cfg.d_ff, "model.vocab_size": cfg.vocab_size}


def pipeline_blocks(cfg: T5Config) -> int:
    return cfg.num_layers + cfg.decoder_layers


def parallelize(model: T5) -> None:
    for stack in (model.encoder, model.decoder):
        checkpoint_blocks(stack.blocks, model.cfg.activation_checkpointing, model.cfg.checkpoint_every)


def _cut_stack(stack: Stack, keep: range) -> Stack | None:
    if not keep:
        return None
    part = shell(stack)
    part.blocks = keep_blocks(stack.blocks, keep)
    if keep[-1] != len(stack.blocks) - 1:
        part.norm = PassThrough()
    return part


def pipeline_stage(model: T5, blocks: range, first: bool, last: bool) -> T5:
    """``model`` keeping blocks ``blocks`` (counting the encoder's first, then the decoder's)."""
    n_enc = len(model.encoder.blocks)
    stage = shell(model)
    stage.encoder = _cut_stack(model.encoder, range(blocks.start, min(blocks.stop, n_enc)))
    stage.decoder = _cut_stack(model.decoder, range(max(blocks.start, n_enc) - n_enc, blocks.stop - n_enc))
    if not (first or (last and model.cfg.tie_embeddings)):
        stage.embedding = None
    if not last:
        stage.head = None
    return stage


def stage_inputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    mask = batch.get("attention_mask")
    mask = torch.ones_like(batch["input_ids"]) if mask is None else mask
    return batch["input_ids"], mask, batch["decoder_input_ids"]
