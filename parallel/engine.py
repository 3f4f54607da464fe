"""Parallel engines: ``build_engine(cfg)`` picks :class:`DeepSpeedEngine` (ZeRO 0-3 data parallelism around a
tensor/sequence-parallel model), with ``pp > 1`` :class:`pretrain.parallel.pipeline.PipelineEngine`, otherwise with
``ep > 1`` :class:`pretrain.parallel.data.DataParallelEngine`; with ``ep > 1`` the model's Switch experts are sharded first
(:mod:`pretrain.parallel.expert`).

Same interface as :class:`pretrain.engine.LocalEngine` (``train_step(micro_batches, lr)`` and friends), so the
trainer does not know the layout. What this adds:

* the :class:`~pretrain.parallel.mesh.Mesh` and DeepSpeed's ``mpu`` view of it (data-parallel averaging only over the
  data group, tensor-sharded parameters counted once per shard in the gradient norm);
* a :class:`~pretrain.parallel.tensor.TensorParallelLayers` factory for the model when ``tp > 1``, with the
  sequence-parallel gradient all-reduce hooked in before ZeRO takes the gradients;
* the same loss as the local engine: LM loss averaged per token over the global batch, auxiliary losses
  averaged over micro-batches (so every layout computes the same number from the same data).
"""

from __future__ import annotations

import math
import os

import deepspeed
import torch
import torch.distributed as dist
import torch.nn as nn

from pretrain.parallel.mesh import DeepSpeedMPU, Layout, Mesh
from pretrain.parallel.validate import validate_layout
from pretrain.parallel.zero import load_model_state, load_optimizer_state, model_state, optimizer_state
from pretrain.config import Config
from pretrain.engine import Engine, move, pick_device
from pretrain.models import build_model
from pretrain.models.layers import LayerFactory, LocalLayers
from pretrain.optim import build_optimizer


def init_distributed(device: torch.device) -> None:
    """Join the process group described by torchrun's environment (a 1-process group when run plainly)."""
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def layer_factory(mesh: Mesh, sequence_parallel: bool) -> LayerFactory:
    if mesh.layout.tp == 1:
        return LocalLayers()
    from pretrain.parallel.tensor import TensorParallelLayers  # megatron-core: imported only when needed

    return TensorParallelLayers(mesh.group("tp"), sequence_parallel)


def deepspeed_config(cfg: Config, layout: Layout, grad_accum: int) -> dict:
    p, t = cfg.parallel, cfg.train
    zero: dict = {"stage": p.zero}
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if p.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": t.micro_batch_size * grad_accum * layout.dp,
        "gradient_clipping": cfg.optimizer.clip_grad,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "zero_allow_untested_optimizer": True,  # our AdamW/LAMB are plain torch optimizers
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # the trainer logs
    }


class DeepSpeedEngine(Engine):
    """ZeRO stage ``cfg.parallel.zero`` (0-3) over the mesh's data-parallel group."""

    def __init__(self, cfg: Config, model: nn.Module, mesh: Mesh, device: torch.device):
        self.cfg, self.mesh, self.device = cfg, mesh, device
        self.dp_rank, self.dp_size, self.dp_group = mesh.dp_rank, mesh.layout.dp, mesh.group("dp")
        self.model_parallel_size = mesh.layout.tp * mesh.layout.pp
        if mesh.layout.tp > 1:
            from pretrain.parallel.tensor import register_sequence_parallel_grad_hooks

            register_sequence_parallel_grad_hooks(model, mesh.group("tp"))
        t = cfg.train
        self.grad_accum = t.global_batch_size // (t.micro_batch_size * self.dp_size)
        optimizer = build_optimizer(model, cfg.optimizer)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, mpu=DeepSpeedMPU(mesh),
            config=deepspeed_config(cfg, mesh.layout, self.grad_accum))
        self.client_optimizer = optimizer

    @property
    def model(self) -> nn.Module:
        return self.ds.module

    def _sum_over_dp(self, values: list[float] | torch.Tensor) -> list[float]:
        t = torch.as_tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.mesh.group("dp"))
        return t.tolist()

    def train_step(self, micro_batches, lr):
        self.ds.train()
        for group in self.client_optimizer.param_groups:
            group["lr"] = lr
        if len(micro_batches) != self.grad_accum:  # batch-size ramp-up changes the accumulation count
            self.grad_accum = len(micro_batches)
            self.ds.set_train_batch_size(self.cfg.train.micro_batch_size * self.grad_accum * self.dp_size)
        total_tokens = self._sum_over_dp([sum(float(mb["loss_mask"].sum()) for mb in micro_batches)])[0]
        n_micro = len(micro_batches) * self.dp_size
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # LM loss sum, aux loss sum: no host sync
        last = len(micro_batches) - 1
        for i, mb in enumerate(micro_batches):
            # explicit boundary: lets us decide after the last backward whether to step at all
            self.ds.set_gradient_accumulation_boundary(i == last)
            out = self.ds(**move(mb, self.device))
            aux_i = out.loss - out.lm_loss_sum / out.num_tokens.clamp(min=1)
            # DeepSpeed averages gradients over the dp ranks, hence the factor dp_size; we scale for the
            # accumulation ourselves (scale_wrt_gas=False) to weight by tokens rather than micro-batches.
            objective = (out.lm_loss_sum / max(total_tokens, 1.0) + aux_i / n_micro) * self.dp_size
            self.ds.backward(objective, scale_wrt_gas=False)
            sums += torch.stack([out.lm_loss_sum.detach(), aux_i.detach()]).double()
            if i < last:
                self.ds.step()  # no update before the boundary, only DeepSpeed's bookkeeping
        lm_sum, aux = self._sum_over_dp(sums)
        lm_loss = lm_sum / max(total_tokens, 1.0)
        loss = lm_loss + aux / n_micro
        skipped = not math.isfinite(loss)  # the same decision on every rank
        if skipped:
            self.ds.zero_grad()
            grad_norm = float("nan")
        else:
            # ZeRO-1/2/3 report the norm they clipped with; at stage 0 DeepSpeed does not keep it
            grad_norm = self._grad_norm() if self.cfg.parallel.zero == 0 else None
            self.ds.step()
            if grad_norm is None:
                grad_norm = float(self.ds.get_global_grad_norm())
        return {"loss": loss, "lm_loss": lm_loss, "grad_norm": grad_norm, "num_tokens": total_tokens,
                "skipped": float(skipped)}

    def _grad_norm(self) -> float:
        """Global L2 norm of the (already data-parallel averaged) gradients; replicated parameters counted
        once, tensor-sharded ones summed over the tensor group (what DeepSpeed's clipping uses)."""
        first = self.mesh.tp_rank == 0
        sq = sum(p.grad.detach().float().pow(2).sum() for p in self.ds.module.parameters()
                 if p.grad is not None and (first or getattr(p, "tensor_model_parallel", False)))
        sq = torch.as_tensor(sq, dtype=torch.float32, device=self.device)
        dist.all_reduce(sq, group=self.mesh.group("tp"))
        return sq.sqrt().item()

    @torch.no_grad()
    def eval_step(self, micro_batches):
        self.ds.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # LM loss sum, tokens
        for mb in micro_batches:
            out = self.ds(**move(mb, self.device))
            sums += torch.stack([out.lm_loss_sum.double(), out.num_tokens.double()])
        lm_sum, tokens = self._sum_over_dp(sums)
        return {"lm_loss_sum": lm_sum, "num_tokens": tokens}

    def state_dict(self):
        return {"model": model_state(self.ds), "optimizer": optimizer_state(self.ds)}

    def load_state_dict(self, state):
        load_model_state(self.ds, state["model"])
        load_optimizer_state(self.ds, state["optimizer"])


def build_engine(cfg: Config) -> Engine:
    """Process group, mesh, model (sharded by the layout's factory) and the DeepSpeed engine."""
    device = pick_device(cfg)
    init_distributed(device)
    p = cfg.parallel
    layout = Layout.from_world(dist.get_world_size(), tp=p.tp, pp=p.pp, ep=p.ep)
    validate_layout(cfg, layout.world_size)
    mesh = Mesh(layout)
    torch.manual_seed(cfg.train.seed)  # the same full draw on every rank; each keeps its shard
    model = build_model(cfg.family, cfg.model, layer_factory(mesh, p.sp)).to(device)
    if p.ep > 1:  # expert gradients need their own reduction group: our data-parallel step, not DeepSpeed's
        from pretrain.parallel.expert import shard_experts

        shard_experts(model, mesh.group("ep"))
    if p.pp > 1:
        from pretrain.parallel.pipeline import PipelineEngine

        return PipelineEngine(cfg, model, mesh, device)
    if p.ep > 1:
        from pretrain.parallel.data import DataParallelEngine

        return DataParallelEngine(cfg, model, mesh, device)
    return DeepSpeedEngine(cfg, model, mesh, device)
