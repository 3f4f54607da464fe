"""Engines: who owns the model and optimizer and turns micro-batches into one optimizer step.

The trainer only talks to the :class:`Engine` interface, so parallel layouts (DeepSpeed ZeRO, pipelines,
tensor parallelism; ``pretrain.parallel.engine.build_engine``) plug in without touching the loop.
:class:`LocalEngine` is plain torch: one process, or plain data parallelism (gradients all-reduced over the
default process group when it is initialised).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
import torch.nn as nn

from pretrain.config import Config, is_parallel
from pretrain.optim import build_optimizer, clip_grad_norm


class Engine:
    """Interface. ``train_step`` runs forward/backward over this rank's micro-batches and one update."""

    model: nn.Module
    device: torch.device = torch.device("cpu")
    dp_rank: int = 0
    dp_size: int = 1
    dp_group = None  # process group of this rank's data-parallel peers; None = the whole world
    model_parallel_size: int = 1  # ranks sharing one model replica (tensor x pipeline x expert), for MFU

    def train_step(self, micro_batches: list[dict], lr: float) -> dict:
        """Returns floats: ``loss`` (per-token mean over the global batch, aux losses included),
        ``lm_loss``, ``grad_norm``, ``num_tokens`` (global), ``skipped`` (1.0 when non-finite)."""
        raise NotImplementedError

    def eval_step(self, micro_batches: list[dict]) -> dict:
        """``{"lm_loss_sum", "num_tokens"}`` summed over the data-parallel group, without gradients."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """``{"model": {name: tensor}, "optimizer": plain tensors/containers}`` of this rank."""
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` (on the engine's device, so NCCL can carry it) over the default group; no host sync."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def move(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class LocalEngine(Engine):
    """Plain torch; fp32 or bf16 autocast. The loss is averaged per token over all micro-batches and ranks."""

    def __init__(self, cfg: Config, model: nn.Module, device: torch.device):
        self.cfg, self.model, self.device = cfg, model.to(device), device
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if dist.is_available() and dist.is_initialized():
            self.dp_rank, self.dp_size = dist.get_rank(), dist.get_world_size()
            for p in self.model.parameters():  # identical start on every rank
                dist.broadcast(p.data, 0)

    def _autocast(self):
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, micro_batches, lr):
        """One update with a single host sync: losses and the grad norm stay on the device until the end,
        where one ``tolist()`` fetches them to decide whether the step is finite."""
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # token counts come from the CPU batches (no device sync); the sum over ranks stays on the device
        local_tokens = sum(int(mb["loss_mask"].sum()) for mb in micro_batches)
        tokens = _all_reduce(torch.tensor(float(local_tokens), dtype=torch.float64, device=self.device))
        n_micro = len(micro_batches) * self.dp_size
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # LM loss sum, aux loss sum
        for mb in micro_batches:
            with self._autocast():
                out = self.model(**move(mb, self.device))
            # out.loss = lm_sum / num_tokens + weighted aux losses (MoE); weight the token sum by the global
            # token count (true per-token mean) and the aux part by the number of micro-batches.
            objective = out.lm_loss_sum / tokens.clamp(min=1.0).to(out.lm_loss_sum.dtype)
            aux = torch.zeros((), device=self.device)
            if "aux_loss" in out.metrics:
                aux = out.loss - out.lm_loss_sum / out.num_tokens.clamp(min=1)
                objective = objective + aux / n_micro
            objective.backward()
            sums += torch.stack([out.lm_loss_sum.detach(), aux.detach()]).double()
        if self.dp_size > 1:
            self._all_reduce_grads()
            dist.all_reduce(sums)
        norm = clip_grad_norm(self.params, self.cfg.optimizer.clip_grad)
        lm_sum, aux_sum, grad_norm, total_tokens = torch.cat(
            [sums, norm.reshape(1).to(sums), tokens.reshape(1)]).tolist()  # the step's one host sync
        lm_loss = lm_sum / max(total_tokens, 1.0)
        loss = lm_loss + aux_sum / n_micro
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "lm_loss": lm_loss, "grad_norm": grad_norm, "num_tokens": total_tokens,
                "skipped": float(skipped)}

    def _all_reduce_grads(self) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)

    @torch.no_grad()
    def eval_step(self, micro_batches):
        self.model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # LM loss sum, tokens
        for mb in micro_batches:
            with self._autocast():
                out = self.model(**move(mb, self.device))
            sums += torch.stack([out.lm_loss_sum.double(), out.num_tokens.double()])
        lm_sum, tokens = _all_reduce(sums).tolist()
        return {"lm_loss_sum": lm_sum, "num_tokens": tokens}

    def state_dict(self):
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


def pick_device(cfg: Config) -> torch.device:
    want = cfg.train.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        local_rank = int(__import__("os").environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def build_engine(cfg: Config) -> Engine:
    """The one place that picks an engine: ``parallel``'s for non-trivial layouts, else :class:`LocalEngine`."""
    if is_parallel(cfg):
        from pretrain.parallel.engine import build_engine as build_parallel_engine

        return build_parallel_engine(cfg)
    from pretrain.models import build_model
    from pretrain.models.layers import LocalLayers

    device = pick_device(cfg)
    torch.manual_seed(cfg.train.seed)
    return LocalEngine(cfg, build_model(cfg.family, cfg.model, LocalLayers()), device)
