"""The engine interface: what the trainer, checkpoints and evals may ask of whoever owns model and optimizer.

An engine turns this rank's micro-batches into one optimizer step. The trainer sees only this interface, so
layouts plug in without touching the loop (like lm-eval's ``api/model.py``: a few documented abstract
methods, nothing else assumed). Implementations:

* :class:`pretrain.local_engine.LocalEngine`: plain torch, one process or plain data parallelism (DDP);
* :class:`pretrain.parallel.engine.DeepSpeedEngine`: ZeRO 0-3 around a tensor/sequence-parallel model;
* :class:`pretrain.parallel.data.DataParallelEngine`: expert parallelism, our own data-parallel step;
* :class:`pretrain.parallel.pipeline.PipelineEngine`: pipeline stages on top of that.

:func:`pretrain.engines.build_engine` picks one; :mod:`pretrain.step` holds the step arithmetic they share
(one loss definition for all, one host read per step).

The attributes below are declared for every engine (defaults fit one process without a mesh); checkpointing
(:mod:`pretrain.reshard`) reads ``mesh``, ``ds``, ``model`` and :meth:`Engine.local_optimizers`, the trainer
``dp_rank``/``dp_size``/``dp_group``, ``model_parallel_size`` and ``stages``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

if TYPE_CHECKING:  # annotations only
    from pretrain.config import Config
    from pretrain.parallel.mesh import Mesh


@dataclass(frozen=True)
class StepResult:
    """One optimizer step, as every rank agrees on it (host floats)."""

    loss: float  # LM loss per token over the global batch + auxiliary losses averaged over micro-batches
    lm_loss: float  # the LM part alone
    grad_norm: float  # global L2 norm before clipping (nan when the step was skipped by DeepSpeed)
    num_tokens: float  # loss-masked tokens in the global batch
    skipped: bool  # the loss or the norm was not finite: no update was made, on any rank
    stop: bool = False  # some rank passed ``stop=True``: every rank learns it in the same step


@dataclass(frozen=True)
class EvalResult:
    """Sums over the data-parallel group for one global batch, without gradients."""

    lm_loss_sum: float
    num_tokens: float


class Engine(ABC):
    """Owns this rank's model and optimizer; ``train_step`` does forward/backward over the micro-batches and
    one update. Every method that communicates must be called on every rank."""

    cfg: Config
    model: nn.Module  # this rank's parameters under the full model's names (a pipeline rank: its stages)
    device: torch.device = torch.device("cpu")
    dp_rank: int = 0
    dp_size: int = 1
    dp_group: Any = None  # process group of this rank's data-parallel peers; None = the whole world
    model_parallel_size: int = 1  # ranks sharing one model replica (tensor x pipeline), for MFU
    mesh: Mesh | None = None  # the process mesh of a parallel layout; None = plain data parallelism
    ds: Any = None  # the DeepSpeed engine when DeepSpeed drives the step (its ZeRO optimizer holds the state)
    stages: tuple[nn.Module, ...] = ()  # a pipeline rank's stages (to evaluate the live model); else empty

    @abstractmethod
    def train_step(self, micro_batches: list[dict], lr: float, stop: bool = False) -> StepResult:
        """Forward/backward over this rank's ``micro_batches`` (CPU tensors) and one update at ``lr``.

        ``stop``: this rank wants to stop; the result's ``stop`` is true on every rank if any rank passed it.
        At most one device -> host read per call (the result's numbers)."""

    @abstractmethod
    def eval_step(self, micro_batches: list[dict]) -> EvalResult:
        """LM loss sum and token count of the micro-batches, summed over the data-parallel group."""

    @abstractmethod
    def state_dict(self) -> dict:
        """``{"model": {name: tensor}, "optimizer": plain tensors/containers}`` of this rank (same-layout
        checkpoints; ``weights_only`` loadable)."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned on the same rank of the same layout."""

    @abstractmethod
    def local_optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers holding this rank's per-parameter state (a ZeRO-1 shard's own optimizer; DeepSpeed's
        optimizer), for checkpoints that reshard moments."""
