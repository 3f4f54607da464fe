"""Plain torch engine: one process, or plain data parallelism over the default process group.

Data parallelism is torch's ``DistributedDataParallel``: gradients are all-reduced in buckets while the last
micro-batch's backward still runs (earlier micro-batches accumulate under ``no_sync``), straight from the
gradient buffers (``gradient_as_bucket_view``: no flat copy). Its comm hook *sums* rather than averages,
because every micro-batch's objective is already divided by the global token count (:mod:`pretrain.step`).
DDP also broadcasts rank 0's initial parameters, so every replica starts identical.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from pretrain import step
from pretrain.config import Config
from pretrain.devices import autocast
from pretrain.engine import Engine, EvalResult, StepResult
from pretrain.optim import build_optimizer, clip_grad_norm


def _sum_hook(group, bucket):  # no annotations: DDP checks them against the real classes
    """DDP comm hook: sum the ``dist.GradBucket`` over the data-parallel ranks (DDP's default averages)."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class LocalEngine(Engine):
    """fp32 or bf16 autocast; the loss is averaged per token over all micro-batches and ranks."""

    def __init__(self, cfg: Config, model: nn.Module, device: torch.device):
        self.cfg, self.model, self.device = cfg, model.to(device), device
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.ddp = None
        if step.distributed():
            self.dp_rank, self.dp_size = dist.get_rank(), dist.get_world_size()
            self.ddp = DistributedDataParallel(self.model, forward_sync_buffers=False, gradient_as_bucket_view=True)
            self.ddp.register_comm_hook(None, _sum_hook)

    def _sync_gradients(self, last: bool):
        """DDP all-reduces during the backward of the last micro-batch only."""
        return contextlib.nullcontext() if self.ddp is None or last else self.ddp.no_sync()

    def train_step(self, micro_batches: list[dict], lr: float, stop: bool = False) -> StepResult:
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        vote = step.stop_vote(stop, self.device)
        tokens = step.global_tokens(micro_batches, self.device)
        n_micro = len(micro_batches) * self.dp_size
        forward = self.ddp or self.model
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # LM loss sum, aux loss sum
        for i, mb in enumerate(micro_batches):
            with self._sync_gradients(i == len(micro_batches) - 1):
                with autocast(self.cfg, self.device):
                    out = forward(**step.move(mb, self.device))
                scaled, row = step.objective(out, tokens, n_micro)
                scaled.backward()
            sums += row
        step.all_reduce(sums)
        result = step.finish(sums, clip_grad_norm(self.params, self.cfg.optimizer.clip_grad), tokens, n_micro, vote)
        if not result.skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return result

    @torch.no_grad()
    def eval_step(self, micro_batches: list[dict]) -> EvalResult:
        self.model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        for mb in micro_batches:
            with autocast(self.cfg, self.device):
                sums += step.eval_row(self.model(**step.move(mb, self.device)))
        return step.eval_result(sums)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def local_optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]
