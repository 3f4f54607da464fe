"""DeepSpeed engine: ZeRO 0-3 data parallelism around a tensor/sequence-parallel model.

Built by :func:`pretrain.engines.build_engine` for layouts without pipeline or expert parallelism. What this
adds to the shared step (:mod:`pretrain.step`):

* DeepSpeed's ``mpu`` view of the :class:`~pretrain.parallel.mesh.Mesh` (data-parallel averaging only over the
  data group, tensor-sharded parameters counted once per shard in the gradient norm);
* the sequence-parallel gradient all-reduce hooked in before ZeRO takes the gradients;
* DeepSpeed averages gradients over the data ranks, so each micro-batch's objective is scaled by ``dp``; it
  runs bf16 itself (bf16 weights, fp32 master copies) when ``train.precision=bf16``.
"""

from __future__ import annotations

import dataclasses

import deepspeed
import torch
import torch.nn as nn

from pretrain import step
from pretrain.config import Config
from pretrain.engine import Engine, EvalResult, StepResult
from pretrain.models.layers import LayerFactory, LocalLayers
from pretrain.optim import build_optimizer
from pretrain.parallel.mesh import DeepSpeedMPU, Layout, Mesh
from pretrain.parallel.zero import load_model_state, load_optimizer_state, model_state, optimizer_state


def layer_factory(mesh: Mesh, sequence_parallel: bool, fused_loss: bool = True) -> LayerFactory:
    """The layers of this layout; ``fused_loss`` as in :class:`LocalLayers` (tensor parallelism has its own)."""
    if mesh.layout.tp == 1:
        return LocalLayers(fused_loss)
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
        self.grad_accum = t.global_batch_size // (t.micro_batch_size * mesh.layout.replicas)  # cp ranks share
        optimizer = build_optimizer(model, cfg.optimizer)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, mpu=DeepSpeedMPU(mesh),
            config=deepspeed_config(cfg, mesh.layout, self.grad_accum))
        self.client_optimizer = optimizer

    @property
    def model(self) -> nn.Module:
        return self.ds.module

    def train_step(self, micro_batches: list[dict], lr: float, stop: bool = False) -> StepResult:
        self.ds.train()
        for group in self.client_optimizer.param_groups:
            group["lr"] = lr
        if len(micro_batches) != self.grad_accum:  # batch-size ramp-up changes the accumulation count
            self.grad_accum = len(micro_batches)
            self.ds.set_train_batch_size(self.cfg.train.micro_batch_size * self.grad_accum * self.dp_size)
        vote = step.stop_vote(stop, self.device)
        tokens = step.global_tokens(micro_batches, self.device, self.dp_group)
        n_micro = len(micro_batches) * self.dp_size
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # LM loss sum, aux loss sum
        last = len(micro_batches) - 1
        for i, mb in enumerate(micro_batches):
            # explicit boundary: lets us decide after the last backward whether to step at all
            self.ds.set_gradient_accumulation_boundary(i == last)
            scaled, row = step.objective(self.ds(**step.move(mb, self.device)), tokens, n_micro)
            # DeepSpeed averages over the dp ranks (hence * dp_size); the accumulation is in the objective
            self.ds.backward(scaled * self.dp_size, scale_wrt_gas=False)
            sums += row
            if i < last:
                self.ds.step()  # no update before the boundary, only DeepSpeed's bookkeeping
        step.all_reduce(sums, self.dp_group)
        # ZeRO-1/2/3 report the norm they clipped with after their step; at stage 0 it is ours, on the device
        zero = self.cfg.parallel.zero > 0
        norm = torch.zeros(()) if zero else self._grad_norm()
        result = step.finish(sums, norm, tokens, n_micro, vote)
        if result.skipped:
            self.ds.zero_grad()
            return dataclasses.replace(result, grad_norm=float("nan"))
        self.ds.step()
        return dataclasses.replace(result, grad_norm=float(self.ds.get_global_grad_norm())) if zero else result

    def _grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the (already data-parallel averaged) gradients; replicated parameters counted
        once, tensor-sharded ones summed over the tensor group (what DeepSpeed's clipping uses)."""
        first = self.mesh.tp_rank == 0
        grads = [p.grad.detach().float().pow(2).sum() for p in self.ds.module.parameters()
                 if p.grad is not None and (first or getattr(p, "tensor_model_parallel", False))]
        sq = torch.stack(grads).sum() if grads else torch.zeros((), device=self.device)
        return step.all_reduce(sq, self.mesh.group("tp")).sqrt()

    @torch.no_grad()
    def eval_step(self, micro_batches: list[dict]) -> EvalResult:
        self.ds.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        for mb in micro_batches:
            sums += step.eval_row(self.ds(**step.move(mb, self.device)))
        return step.eval_result(sums, self.dp_group)

    def state_dict(self) -> dict:
        return {"model": model_state(self.ds), "optimizer": optimizer_state(self.ds)}

    def load_state_dict(self, state: dict) -> None:
        load_model_state(self.ds, state["model"])
        load_optimizer_state(self.ds, state["optimizer"])

    def local_optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.ds.optimizer]
