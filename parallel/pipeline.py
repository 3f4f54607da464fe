"""Pipeline parallelism for GPT with ``torch.distributed.pipelining`` (1F1B; interleaved 1F1B with ``vpp > 1``).

Why not DeepSpeed's pipeline engine: it owns the training loop (``train_batch``), wants the model rewritten as
a ``PipelineModule`` of layer specs, and refuses ZeRO-2/3 anyway; torch's schedules drive our own modules,
compose with the megatron-core tensor-parallel layers and give exact gradients on gloo (see docs/design.md,
"Pipeline choice").

Every rank builds the whole model once from the shared seed (so the initialization equals the single-process
one), keeps the blocks of its stage(s) and drops the rest. Stage ``i`` of ``pp * vpp`` lives on pipeline rank
``i % pp`` (interleaved placement). Stage modules keep the full model's parameter names, so checkpoints of a
pipeline run name tensors like a single-process run.

The loss is the same as every other engine's: per-token mean over the global batch (the token count is
all-reduced before the step, so each micro-batch's summed loss is divided by the global count).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

from parallel.data import DataParallelEngine
from parallel.mesh import Mesh
from pretrain.config import Config


def stage_bounds(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` block ranges, balanced by layer count (the first stages get the extra)."""
    base, extra = divmod(num_layers, num_stages)
    bounds, start = [], 0
    for i in range(num_stages):
        end = start + base + (i < extra)
        bounds.append((start, end))
        start = end
    return bounds


class GPTStage(nn.Module):
    """Blocks ``[start, end)`` of a GPT, plus the embeddings on the first stage and norm + head on the last.

    Input: token ids (first stage) or hidden states; output: hidden states, or logits (this tensor rank's
    vocabulary shard) on the last stage.
    """

    def __init__(self, model: nn.Module, start: int, end: int, first: bool, last: bool):
        super().__init__()
        self.first, self.last = first, last
        self.tok_emb = model.tok_emb if first else None
        self.pos_emb = model.pos_emb if first else None
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in range(start, end)})
        self.norm = model.norm if last else None
        self.head = model.head if last else None
        self._model = [model]  # embed()/context() helpers and RoPE tables; a list keeps it unregistered
        self.seq_shards = model.layers.tp_size if getattr(model.layers, "sp", False) else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self._model[0]
        if self.first:
            ids = x
            h = m.embed(ids)
        else:
            h = x
            ids = torch.zeros(h.shape[0], h.shape[1] * self.seq_shards, dtype=torch.long, device=h.device)
        ctx = m.context(ids)  # positions and RoPE depend only on the (full) sequence length
        for block in self.blocks.values():
            h = block(h, ctx)
        if self.last:
            return self.head(m.layers.gather_sequence(self.norm(h)))
        return h


def _split_model(model: nn.Module, stage_ids: list[int], num_stages: int) -> list[GPTStage]:
    bounds = stage_bounds(len(model.blocks), num_stages)
    stages = [GPTStage(model, *bounds[i], first=i == 0, last=i == num_stages - 1) for i in stage_ids]
    keep = {i for s in stage_ids for i in range(*bounds[s])}
    for i in range(len(model.blocks)):
        if i not in keep:
            model.blocks[i] = nn.Identity()  # free what other ranks own
    if 0 not in stage_ids:
        model.tok_emb = model.pos_emb = None
    if num_stages - 1 not in stage_ids:
        model.norm = model.head = None
    return stages


class PipelineEngine(DataParallelEngine):
    """Pipeline x tensor x data parallel (ZeRO-0 or 1); the data-parallel step is :class:`DataParallelEngine`'s."""

    def __init__(self, cfg: Config, model: nn.Module, mesh: Mesh, device: torch.device):
        pp, vpp = mesh.layout.pp, cfg.parallel.vpp
        self.stage_ids = [mesh.pp_rank + k * pp for k in range(vpp)]
        self.stages = _split_model(model, self.stage_ids, pp * vpp)
        self.factory = model.layers
        self._token_scale = 1.0
        super().__init__(cfg, _StageList(self.stages), mesh, device)

    def _schedule(self, n_micro: int):
        """Built per step: the number of micro-batches may change (batch-size ramp-up)."""
        pp_stages = [PipelineStage(s, i, len(self.stage_ids) * self.mesh.layout.pp, self.device,
                                   group=self.mesh.group("pp")) for s, i in zip(self.stages, self.stage_ids)]
        if len(pp_stages) == 1:
            return Schedule1F1B(pp_stages[0], n_micro, loss_fn=self._loss, scale_grads=False)
        return ScheduleInterleaved1F1B(pp_stages, n_micro, loss_fn=self._loss, scale_grads=False)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels, mask = target[..., 0].long(), target[..., 1].to(torch.float32)
        return (self.factory.cross_entropy(logits, labels) * mask).sum() * self._token_scale

    def _forward_backward(self, micro_batches, total_tokens, train):
        total = max(total_tokens, 1.0)
        self._token_scale = 1.0 / total
        batch = {k: torch.cat([mb[k] for mb in micro_batches]).to(self.device) for k in micro_batches[0]}
        target = torch.stack([batch["labels"].double(), batch["loss_mask"].double()], dim=-1)
        schedule = self._schedule(len(micro_batches))
        losses: list[torch.Tensor] = []
        args = (batch["input_ids"],) if self.stage_ids[0] == 0 else ()
        last = any(s.last for s in self.stages)
        kwargs = {"target": target, "losses": losses} if last else {}
        (schedule.step if train else schedule.eval)(*args, **kwargs)
        lm_sum = torch.tensor([sum(float(x) for x in losses) * total if last else 0.0], dtype=torch.float64,
                              device=self.device)
        dist.all_reduce(lm_sum, group=self.mesh.group("pp"))  # from the last stage to every stage
        return lm_sum.item(), 0.0


class _StageList(nn.ModuleList):
    """This rank's stages; state dict keys and parameter names are the full model's."""

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        for stage in self:
            yield from stage.named_parameters(prefix, recurse, remove_duplicate)

    def state_dict(self, *args, **kwargs):
        out = {}
        for stage in self:
            out.update(stage.state_dict())
        return out

    def load_state_dict(self, state, strict: bool = True):
        for stage in self:
            names = stage.state_dict().keys()
            stage.load_state_dict({k: state[k] for k in names}, strict=strict)
