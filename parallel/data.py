"""Our own data-parallel step, for layouts DeepSpeed's engine cannot drive (pipelines, expert parallelism).

* The loss arithmetic is the shared one (:mod:`pretrain.step`), so gradients are *summed* over the data group:
  dense parameters over ``dp``, expert parameters (``p.expert_parallel``) only over their expert-data-parallel
  group ``edp``, since the other data ranks hold different experts.
* Clipping by the true global norm: replicated parameters counted once per model replica (tensor rank 0),
  tensor shards summed over the tensor x pipeline group, distinct experts summed over the expert group; a
  pipeline's copy of a tied embedding (``p.pipeline_copy``) is not counted twice.
* ZeRO-1: torch's ``ZeroRedundancyOptimizer`` shards the optimizer state over the data group (expert
  parameters over the expert-data group).
* ``train.precision=bf16``: forwards run under bf16 autocast, as in the local engine.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.optim import ZeroRedundancyOptimizer

from pretrain import step
from pretrain.config import Config
from pretrain.devices import autocast
from pretrain.engine import Engine, EvalResult, StepResult
from pretrain.optim import build_optimizer
from pretrain.parallel.mesh import Mesh


def _is_expert(p: torch.Tensor) -> bool:
    return getattr(p, "expert_parallel", False)


class DataParallelEngine(Engine):
    """``model`` holds this rank's parameters. Subclasses replace :meth:`_forward_backward` (pipelines)."""

    def __init__(self, cfg: Config, model: nn.Module, mesh: Mesh, device: torch.device):
        self.cfg, self.mesh, self.device, self.model = cfg, mesh, device, model
        self.dp_rank, self.dp_size, self.dp_group = mesh.dp_rank, mesh.layout.dp, mesh.group("dp")
        self.model_parallel_size = mesh.layout.tp * mesh.layout.pp
        if mesh.layout.tp > 1:
            from pretrain.parallel.tensor import register_sequence_parallel_grad_hooks

            register_sequence_parallel_grad_hooks(model, mesh.group("tp"))
        self.optimizers = self._build_optimizers(build_optimizer(model, cfg.optimizer), cfg.parallel.zero)
        self.params = [p for p in model.parameters() if p.requires_grad]

    def _build_optimizers(self, opt: torch.optim.Optimizer, zero: int) -> list[torch.optim.Optimizer]:
        """``opt`` itself, or under ZeRO-1 one ``ZeroRedundancyOptimizer`` for dense parameters over the data
        group and one for expert parameters over the expert-data group (it broadcasts each updated parameter
        to its group, which must hold the same experts)."""
        if zero == 0:
            return [opt]
        accepted = inspect.signature(type(opt)).parameters  # defaults also hold derived entries
        kwargs = {k: v for k, v in opt.defaults.items() if k in accepted}
        out = []
        for expert, group in ((False, "dp"), (True, "edp")):
            groups = [{**g, "params": [p for p in g["params"] if _is_expert(p) == expert]} for g in opt.param_groups]
            groups = [g for g in groups if g["params"]]
            if groups:
                out.append(ZeroRedundancyOptimizer(groups, type(opt), process_group=self.mesh.group(group), **kwargs))
        return out

    def _forward_backward(self, micro_batches: list[dict], tokens: torch.Tensor, train: bool) -> torch.Tensor:
        """This rank's ``[LM loss sum, aux loss sum]`` over its micro-batches, kept on the device (no host sync
        between micro-batches); backward when ``train``."""
        n_micro = len(micro_batches) * self.dp_size
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        for mb in micro_batches:
            with autocast(self.cfg, self.device):
                out = self.model(**step.move(mb, self.device))
            scaled, row = step.objective(out, tokens, n_micro)
            if train:
                scaled.backward()
            sums += row
        return sums

    def train_step(self, micro_batches: list[dict], lr: float, stop: bool = False) -> StepResult:
        self.model.train()
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr
        vote = step.stop_vote(stop, self.device)
        tokens = step.global_tokens(micro_batches, self.device, self.dp_group)
        sums = step.all_reduce(self._forward_backward(micro_batches, tokens, train=True), self.dp_group)
        self._all_reduce_grads()
        norm = self._clip(self.cfg.optimizer.clip_grad)
        result = step.finish(sums, norm, tokens, len(micro_batches) * self.dp_size, vote)
        for opt in self.optimizers:
            if not result.skipped:
                opt.step()
            opt.zero_grad(set_to_none=True)
        return result

    def _all_reduce_grads(self) -> None:
        for expert, group in ((False, "dp"), (True, "edp")):
            grads = [p.grad for p in self.params if p.grad is not None and _is_expert(p) == expert]
            if not grads or dist.get_world_size(self.mesh.group(group)) == 1:
                continue
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=self.mesh.group(group))
            for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                g.copy_(synced)

    def _clip(self, max_norm: float) -> torch.Tensor:
        """Clip to the global norm (over tensor, pipeline and expert shards) and return it, on the device."""
        first = self.mesh.tp_rank == 0
        sq = {False: torch.zeros((), device=self.device), True: torch.zeros((), device=self.device)}
        for p in self.params:
            if p.grad is None or getattr(p, "pipeline_copy", False):  # a tied copy, counted on its first stage
                continue
            if first or getattr(p, "tensor_model_parallel", False):
                sq[_is_expert(p)] += p.grad.float().pow(2).sum()
        dist.all_reduce(sq[True], group=self.mesh.group("ep"))  # each expert rank holds different experts
        total = sq[False] + sq[True]
        dist.all_reduce(total, group=self.mesh.group("mp"))
        norm = total.sqrt()
        grads = [p.grad for p in self.params if p.grad is not None]
        if max_norm > 0 and grads:  # a non-finite norm makes the grads non-finite: that step is skipped anyway
            torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))
        return norm

    @torch.no_grad()
    def eval_step(self, micro_batches: list[dict]) -> EvalResult:
        self.model.eval()
        sums = self._forward_backward(micro_batches, torch.ones((), device=self.device), train=False)
        sums[1] = step.local_tokens(micro_batches, self.device)  # summed over the data group below
        return step.eval_result(sums, self.dp_group)

    def local_optimizers(self) -> list[torch.optim.Optimizer]:
        """This rank's own optimizers (its shards under ZeRO-1): what a same-layout checkpoint saves."""
        return [getattr(opt, "optim", opt) for opt in self.optimizers]

    def state_dict(self) -> dict:
        return {"model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                "optimizer": [opt.state_dict() for opt in self.local_optimizers()]}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        for opt, saved in zip(self.local_optimizers(), state["optimizer"], strict=True):
            opt.load_state_dict(saved)
