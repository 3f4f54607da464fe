"""What a family's ``parallelize`` and ``pipeline_stage`` steps are built from (see
:mod:`pretrain.models.spec`): activation checkpointing of blocks, and cutting a model into a pipeline stage.

Both leave parameter names alone, so checkpoints of any layout name tensors like a single-process run:

* :func:`checkpoint_blocks` makes the chosen blocks recompute their activations in backward
  (``torch.utils.checkpoint``, non-reentrant, RNG replayed: Switch router jitter recomputes identically);
* :func:`shell` is a shallow copy of a module with its own table of children, so a stage can drop pieces
  without touching the model it was cut from; :func:`keep_blocks` replaces the blocks other stages own by
  parameter-free :class:`PassThrough` modules (the model's own loop over its blocks then runs only this stage's).
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def checkpoint_blocks(blocks: nn.ModuleList, mode: str, every: int) -> None:
    """``mode``: "none", "full" (every block) or "every_n" (blocks 0, every, 2 * every, ...)."""
    for i, block in enumerate(blocks):
        if mode == "full" or (mode == "every_n" and i % every == 0):
            block.forward = _recomputed(block.forward)


def _recomputed(forward):
    @functools.wraps(forward)
    def run(*args):
        if torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False)
        return forward(*args)

    return run


class PassThrough(nn.Module):
    """Stands in for a block (or norm) another pipeline stage owns: returns its first input unchanged."""

    def forward(self, h: torch.Tensor, *args) -> torch.Tensor:
        return h


def shell(module: nn.Module) -> nn.Module:
    """A copy of ``module`` sharing its parameters, buffers and children, whose children can be replaced."""
    out = copy.copy(module)
    out._modules = dict(module._modules)
    return out


def keep_blocks(blocks: nn.ModuleList, keep: range) -> nn.ModuleList:
    """``blocks`` with those outside ``keep`` replaced by :class:`PassThrough` (same indices, same names)."""
    return nn.ModuleList(block if i in keep else PassThrough() for i, block in enumerate(blocks))
