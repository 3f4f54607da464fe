"""How a GPT is parallelised: the sizes tensor parallelism splits, activation checkpointing, and the cut of a
pipeline stage (blocks ``[start, end)``, the embeddings on the first stage, final norm and head on the last).
Tensor and sequence parallelism need nothing here: they come from the layer factory the model is built with.
"""

from __future__ import annotations

import torch

from pretrain.models.gpt.config import GPTConfig
from pretrain.models.gpt.model import GPT
from pretrain.parallel.parallelize import checkpoint_blocks, keep_blocks, shell


def tp_sizes(cfg: GPTConfig) -> dict[str, int]:
    sizes = {"model.num_heads": cfg.num_heads, "model.num_kv_heads": cfg.kv_heads,
             "model.ffn_hidden_size": cfg.ffn_size, "model.vocab_size": cfg.vocab_size}
    if not cfg.llama:  # learned position embeddings are split like a vocabulary
        sizes["model.max_seq_len"] = cfg.max_seq_len
    return sizes


def pipeline_blocks(cfg: GPTConfig) -> int:
    return cfg.num_layers


def parallelize(model: GPT) -> None:
    checkpoint_blocks(model.blocks, model.cfg.activation_checkpointing, model.cfg.checkpoint_every)


def pipeline_stage(model: GPT, blocks: range, first: bool, last: bool) -> GPT:
    """``model`` with the blocks outside ``blocks`` removed, the embeddings only on the first stage (and the
    token embedding on the last one for a tied head), the final norm and head only on the last."""
    stage = shell(model)
    stage.blocks = keep_blocks(model.blocks, blocks)
    if not first:
        stage.pos_emb = None
        if not (last and model.cfg.tie_embeddings):
            stage.tok_emb = None
    if not last:
        stage.norm = stage.head = None
    return stage


def stage_inputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``(input ids,)``, or ``(input ids, position ids, document ids)`` when the batch has position ids (packed
    documents: the data pipeline gives both; absent document ids are one document per row)."""
    ids = batch["input_ids"]
    if "position_ids" not in batch:
        if "document_ids" in batch:
            raise ValueError("a pipeline stage got document_ids without position_ids: batches of packed documents "
                             "carry both (data.document_mask gives them)")
        return (ids,)
    return ids, batch["position_ids"], batch["document_ids"] if "document_ids" in batch else torch.zeros_like(ids)
