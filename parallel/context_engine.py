"""Context parallelism around any engine: split each micro-batch's sequence, run the step, nothing else.

:func:`pretrain.engines.build_engine` wraps the engine of the rest of the layout (DeepSpeed ZeRO 0-3 with
tensor/sequence parallelism, pipelines, our data-parallel step) in :class:`ContextParallelEngine` when
``parallel.cp > 1``. The inner engine sees context ranks as data ranks: its data group (``mesh.group("dp")``)
spans ``replicas x cp`` ranks, so the global token count and the gradient reduction already run over them,
which makes the loss and the gradients those of one process on whole sequences (see
:mod:`pretrain.parallel.context`). What changes is only what the trainer sees: ``dp_rank`` / ``dp_size`` are
the data *replica* (the ``cp`` ranks of one replica read the same samples), and each micro-batch handed to
the inner engine is this rank's load-balanced part of it, with the model's context-parallel attention on.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from pretrain.engine import Engine, EvalResult, StepResult
from pretrain.parallel.context import ContextParallel


class ContextParallelEngine(Engine):
    """``inner`` trains on this rank's chunks of each sequence; ``cp`` is the model factory's context group."""

    def __init__(self, inner: Engine, cp: ContextParallel):
        self.inner, self.cp = inner, cp
        self.cfg, self.device, self.mesh, self.dp_group = inner.cfg, inner.device, inner.mesh, inner.dp_group
        self.dp_rank, self.dp_size = self.mesh.replica_rank, self.mesh.layout.replicas
        self.model_parallel_size = inner.model_parallel_size * cp.size  # ranks sharing one replica (for MFU)

    @property
    def model(self) -> nn.Module:
        return self.inner.model

    @property
    def ds(self):
        return self.inner.ds

    @property
    def stages(self) -> tuple[nn.Module, ...]:
        return self.inner.stages

    def train_step(self, micro_batches: list[dict], lr: float, stop: bool = False) -> StepResult:
        with self.cp.sharding():
            return self.inner.train_step([self.cp.split(mb) for mb in micro_batches], lr, stop)

    def eval_step(self, micro_batches: list[dict]) -> EvalResult:
        with self.cp.sharding():
            return self.inner.eval_step([self.cp.split(mb) for mb in micro_batches])

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)

    def local_optimizers(self) -> list[torch.optim.Optimizer]:
        return self.inner.local_optimizers()
