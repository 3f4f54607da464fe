"""Pipeline parallelism for GPT and T5 with ``torch.distributed.pipelining`` (1F1B; interleaved with ``vpp > 1``).

Why not DeepSpeed's pipeline engine: it owns the training loop (``train_batch``), wants the model rewritten as
a ``PipelineModule`` of layer specs, and refuses ZeRO-2/3 anyway; torch's schedules drive our own modules,
compose with the megatron-core tensor-parallel layers and give exact gradients on gloo (see docs/design.md,
"Pipeline choice").

Every rank builds the whole model once from the shared seed (so the initialization equals the single-process
one) and keeps the stage(s) :func:`pretrain.parallel.stage.split_model` cuts from it: the real model with
other stages' blocks removed, under the full model's parameter names (checkpoints of a pipeline run name
tensors like a single-process run). Stage ``i`` of ``pp * vpp`` lives on pipeline rank ``i % pp``.

The loss is the same as every other engine's: per-token mean over the global batch (the token count is
all-reduced before the step, so each micro-batch's summed loss is divided by the global count). A last stage that
returns ``(logits, sentence logits)`` (an encoder's next-sentence / sentence-order head) adds the sentence loss
over the global micro-batch count, as :func:`pretrain.step.objective` adds an auxiliary loss; its label travels
in a third channel of the target. What else travels between stages is the family's (``stage_inputs`` /
``stage_forward``): e.g. a GPT batch's position and document ids ride with the hidden states, so every stage
masks attention within documents (under context parallelism: this rank's chunks of them).

Switch layers: each stage adds its layers' weighted auxiliary losses to the backward through its output
(see :mod:`pretrain.parallel.stage`), so they reach the gradients without being carried to the last stage.
Tied embeddings: the last stage keeps a copy of the (vocab-sharded) embedding for its head; the two copies'
gradients are summed over the pipeline group before the step (Megatron's embedding group) and the copy is
counted once in the gradient norm, so both stay equal to the single-process matrix.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

from pretrain import step
from pretrain.config import Config
from pretrain.devices import autocast
from pretrain.parallel.data import DataParallelEngine
from pretrain.parallel.mesh import Mesh
from pretrain.parallel.stage import split_model


class PipelineEngine(DataParallelEngine):
    """Pipeline x tensor x data parallel (ZeRO-0 or 1); the data-parallel step is :class:`DataParallelEngine`'s.

    Stages and schedule are built once per (micro-batch count, train or eval): a new ``PipelineStage`` runs a
    shape-inference forward and handshakes with its neighbours, so rebuilding them every step would cost an
    extra forward per stage and host syncs. The whole schedule runs under the configured autocast."""

    def __init__(self, cfg: Config, model: nn.Module, mesh: Mesh, device: torch.device):
        pp, vpp = mesh.layout.pp, cfg.parallel.vpp
        self.stage_ids = [mesh.pp_rank + k * pp for k in range(vpp)]
        self.stages = split_model(model, self.stage_ids, pp * vpp)
        self.factory = model.factory
        self._token_scale, self._aux_scale = torch.ones(()), 0.0
        self._lm_losses: list[torch.Tensor] = []  # this step's micro-batch LM losses (last stage)
        self._sentence_losses: list[torch.Tensor] = []  # and sentence-head losses (an encoder's NSP/SOP)
        self._schedules: dict[tuple[int, bool], object] = {}
        super().__init__(cfg, StageList(self.stages), mesh, device)
        self._shared = self._find_shared()

    def _find_shared(self) -> list[tuple[nn.Parameter | None, torch.Size]]:
        """Parameters held by several pipeline ranks (a tied embedding, T5's shared embedding and bias tables),
        as (this rank's copy or None, shape) in one order on every rank. Copies on all but the lowest holding
        rank are marked ``pipeline_copy``, so the gradient norm counts each once."""
        mine = {name: p.shape for name, p in self.model.named_parameters()}
        everyone: list[dict] = [{}] * self.mesh.layout.pp
        dist.all_gather_object(everyone, mine, group=self.mesh.group("pp"))
        params = dict(self.model.named_parameters())
        shared = []
        for name in sorted({n for held in everyone for n in held}):
            holders = [r for r, held in enumerate(everyone) if name in held]
            if len(holders) > 1:
                if name in params and holders[0] != self.mesh.pp_rank:
                    params[name].pipeline_copy = True
                shared.append((params.get(name), everyone[holders[0]][name]))
        return shared

    def _schedule(self, n_micro: int, train: bool):
        """The schedule for ``n_micro`` micro-batches (batch-size ramp-up changes it), built at first use."""
        key = (n_micro, train)
        if key not in self._schedules:
            stages = [PipelineStage(s, i, len(self.stage_ids) * self.mesh.layout.pp, self.device,
                                    group=self.mesh.group("pp")) for s, i in zip(self.stages, self.stage_ids)]
            if len(stages) == 1:
                schedule = Schedule1F1B(stages[0], n_micro, loss_fn=self._loss, scale_grads=False)
            else:
                schedule = ScheduleInterleaved1F1B(stages, n_micro, loss_fn=self._loss, scale_grads=False)
            self._schedules[key] = schedule
        return self._schedules[key]

    def _loss(self, output: torch.Tensor | tuple[torch.Tensor, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """The last stage's objective of one micro-batch: its LM loss sum over the global token count, plus a
        sentence head's loss (BERT's NSP/SOP; the stage returns ``(logits, sentence logits)`` and the label rides
        in ``target``'s third channel) over the global micro-batch count, as :func:`pretrain.step.objective`."""
        logits, sentence_logits = output if isinstance(output, tuple) else (output, None)
        labels, mask = target[..., 0].long(), target[..., 1].to(torch.float32)
        loss = (self.factory.cross_entropy(logits, labels) * mask).sum() * self._token_scale
        self._lm_losses.append(loss.detach())
        if sentence_logits is not None and target.shape[-1] > 2:
            sentence = F.cross_entropy(sentence_logits.float(), target[:, 0, 2].long())
            self._sentence_losses.append(sentence.detach())
            loss = loss + sentence * self._aux_scale
        return loss

    def _forward_backward(self, micro_batches, tokens, train):
        total = tokens.clamp(min=1.0)
        self._token_scale = (1.0 / total).float()
        batch = {k: torch.cat([mb[k] for mb in micro_batches]).to(self.device) for k in micro_batches[0]}
        channels = [batch["labels"].double(), batch["loss_mask"].double()]
        if "next_sentence_label" in batch:  # [b] -> [b, s]: the target is split into micro-batches like them
            channels.append(batch["next_sentence_label"].double()[:, None].expand_as(channels[0]))
        target = torch.stack(channels, dim=-1)
        schedule = self._schedule(len(micro_batches), train)
        self._aux_scale = 1.0 / (len(micro_batches) * self.dp_size)
        for stage in self.stages:
            stage.aux_scale, stage.aux_losses = self._aux_scale, []
        self._lm_losses, self._sentence_losses = [], []
        args = self.stages[0].inputs(batch) if self.stage_ids[0] == 0 else ()
        last = any(s.last for s in self.stages)
        kwargs = {"target": target} if last else {}
        with autocast(self.cfg, self.device):
            (schedule.step if train else schedule.eval)(*args, return_outputs=False, **kwargs)
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        n = len(micro_batches)  # the first use of a schedule runs one shape-inference forward (and loss): skip it
        if last:
            sums[0] = torch.stack(self._lm_losses[-n:]).double().sum() * total
        aux = [a.detach() for stage in self.stages for a in stage.aux_losses[-n:]] + self._sentence_losses[-n:]
        if aux:
            sums[1] = torch.stack(aux).double().sum()
        return step.all_reduce(sums, self.mesh.group("pp"))  # LM loss from the last stage, aux from every stage

    def _all_reduce_grads(self) -> None:
        for param, shape in self._shared:  # sum the copies' gradients (zeros from ranks without a copy)
            grad = param.grad if param is not None else None
            dist.all_reduce(grad if grad is not None else torch.zeros(shape, device=self.device),
                            group=self.mesh.group("pp"))
        super()._all_reduce_grads()


class StageList(nn.ModuleList):
    """This rank's stages; state dict keys and parameter names are the full model's."""

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        seen = set()  # two stages of one rank may share a parameter (a T5 bias table)
        for stage in self:
            for name, p in stage.named_parameters(prefix, recurse, remove_duplicate):
                if not (remove_duplicate and id(p) in seen):
                    seen.add(id(p))
                    yield name, p

    def state_dict(self, *args, **kwargs):
        out = {}
        for stage in self:
            out.update(stage.state_dict())
        return out

    def load_state_dict(self, state, strict: bool = True):
        for stage in self:
            names = stage.state_dict().keys()
            stage.load_state_dict({k: state[k] for k in names}, strict=strict)
