"""Our own data-parallel step, for layouts DeepSpeed's engine cannot drive (pipelines, expert parallelism).

* Each micro-batch's LM loss sum is divided by the global token count (and aux losses by the global number of
  micro-batches), so gradients are *summed* over the data group: dense parameters over ``dp``, expert
  parameters (``p.expert_parallel``) only over their expert-data-parallel group ``edp``, since the other data
  ranks hold different experts.
* Clipping by the true global norm: replicated parameters counted once per model replica (tensor rank 0),
  tensor shards summed over the tensor x pipeline group, distinct experts summed over the expert group; a
  pipeline's copy of a tied embedding (``p.pipeline_copy``) is not counted twice.
* ZeRO-1: torch's ``ZeroRedundancyOptimizer`` shards the optimizer state over the data group (expert
  parameters over the expert-data group).
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.optim import ZeroRedundancyOptimizer

from pretrain.parallel.mesh import Mesh
from pretrain.config import Config
from pretrain.engine import Engine, move
from pretrain.optim import build_optimizer


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

    def _global_tokens(self, micro_batches: list[dict]) -> float:
        t = torch.tensor([sum(float(mb["loss_mask"].sum()) for mb in micro_batches)], dtype=torch.float64,
                         device=self.device)
        dist.all_reduce(t, group=self.mesh.group("dp"))
        return t.item()

    def _forward_backward(self, micro_batches: list[dict], total_tokens: float, train: bool) -> torch.Tensor:
        """This rank's ``[LM loss sum, aux loss sum]`` over its micro-batches, kept on the device (no host sync
        between micro-batches); backward when ``train``."""
        n_micro = len(micro_batches) * self.dp_size
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        for mb in micro_batches:
            out = self.model(**move(mb, self.device))
            aux_i = out.loss - out.lm_loss_sum / out.num_tokens.clamp(min=1)
            if train:
                (out.lm_loss_sum / max(total_tokens, 1.0) + aux_i / n_micro).backward()
            sums += torch.stack([out.lm_loss_sum.detach(), aux_i.detach()]).double()
        return sums

    def train_step(self, micro_batches, lr):
        self.model.train()
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr
        total_tokens = self._global_tokens(micro_batches)
        sums = self._forward_backward(micro_batches, total_tokens, train=True)
        dist.all_reduce(sums, group=self.mesh.group("dp"))
        self._all_reduce_grads()
        norm = self._clip(self.cfg.optimizer.clip_grad)
        lm_sum, aux, grad_norm = torch.cat([sums, norm.reshape(1).double()]).tolist()  # the step's one host sync
        lm_loss = lm_sum / max(total_tokens, 1.0)
        loss = lm_loss + aux / (len(micro_batches) * self.dp_size)
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        for opt in self.optimizers:
            if not skipped:
                opt.step()
            opt.zero_grad(set_to_none=True)
        return {"loss": loss, "lm_loss": lm_loss, "grad_norm": grad_norm, "num_tokens": total_tokens,
                "skipped": float(skipped)}

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
    def eval_step(self, micro_batches):
        self.model.eval()
        sums = self._forward_backward(micro_batches, 1.0, train=False)
        sums[1] = sum(float(mb["loss_mask"].sum()) for mb in micro_batches)  # tokens (CPU batches: no sync)
        dist.all_reduce(sums, group=self.mesh.group("dp"))
        lm_sum, tokens = sums.tolist()
        return {"lm_loss_sum": lm_sum, "num_tokens": tokens}

    def _local_optimizers(self) -> list[torch.optim.Optimizer]:
        """This rank's own optimizers (its shards under ZeRO-1): what a same-layout checkpoint saves."""
        return [getattr(opt, "optim", opt) for opt in self.optimizers]

    def state_dict(self):
        return {"model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                "optimizer": [opt.state_dict() for opt in self._local_optimizers()]}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        for opt, saved in zip(self._local_optimizers(), state["optimizer"], strict=True):
            opt.load_state_dict(saved)
