"""Pipeline parallelism for GPT and T5 with ``torch.distributed.pipelining`` (1F1B; interleaved with ``vpp > 1``).

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

Switch layers: each stage adds its layers' weighted auxiliary losses to the backward through its output
(:class:`_AuxLossGrad`, Megatron's ``MoEAuxLossAutoScaler`` idea), so they reach the gradients without being
carried to the last stage. Tied embeddings: the last stage keeps a copy of the (vocab-sharded) embedding for its
head; the two copies' gradients are summed over the pipeline group before the step (Megatron's embedding group)
and the copy is counted once in the gradient norm, so both stay equal to the single-process matrix.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

from pretrain.parallel.data import DataParallelEngine
from pretrain.parallel.mesh import Mesh
from pretrain.config import Config
from pretrain.models.t5.model import T5Context


def stage_bounds(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` block ranges, balanced by layer count (the first stages get the extra)."""
    base, extra = divmod(num_layers, num_stages)
    bounds, start = [], 0
    for i in range(num_stages):
        end = start + base + (i < extra)
        bounds.append((start, end))
        start = end
    return bounds


class _AuxLossGrad(torch.autograd.Function):
    """Identity on ``h``; its backward also gives the auxiliary loss ``aux`` the gradient ``scale``."""

    @staticmethod
    def forward(ctx, h, aux, scale):
        ctx.save_for_backward(aux)
        ctx.scale = scale
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad):
        (aux,) = ctx.saved_tensors
        return grad, torch.full_like(aux, ctx.scale), None


class _Stage(nn.Module):
    """Common part of a stage: the full model (unregistered) and the Switch auxiliary losses.

    ``aux_scale`` (set per step) weighs this stage's auxiliary losses in the backward; their values are
    appended to ``aux_losses``.
    """

    def __init__(self, model: nn.Module, first: bool, last: bool):
        super().__init__()
        self.first, self.last = first, last
        self._model = [model]  # embed()/context() helpers and RoPE tables; a list keeps it unregistered
        self.seq_shards = model.layers.tp_size if getattr(model.layers, "sp", False) else 1
        self.aux_scale, self.aux_losses = 0.0, []

    @property
    def whole_model(self) -> nn.Module:
        """The model this stage was cut from (its other ranks' blocks replaced by ``nn.Identity``)."""
        return self._model[0]

    def _with_aux(self, h: torch.Tensor, moe_aux: dict) -> torch.Tensor:
        if not moe_aux:
            return h
        moe = self._model[0].cfg.moe
        aux = sum(moe.aux_loss_weight * a["load_balance_loss"] + moe.z_loss_weight * a["z_loss"]
                  for a in moe_aux.values())
        self.aux_losses.append(aux.detach())
        return _AuxLossGrad.apply(h, aux, self.aux_scale) if torch.is_grad_enabled() else h


class GPTStage(_Stage):
    """Blocks ``[start, end)`` of a GPT, plus the embeddings on the first stage and norm + head on the last
    (and a copy of the token embedding for a tied head).

    Input: token ids (first stage) or hidden states; output: hidden states, or logits (this tensor rank's
    vocabulary shard) on the last stage.
    """

    def __init__(self, model: nn.Module, start: int, end: int, first: bool, last: bool):
        super().__init__(model, first, last)
        self.tok_emb = model.tok_emb if first or (last and model.cfg.tie_embeddings) else None
        self.pos_emb = model.pos_emb if first else None
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in range(start, end)})
        self.norm = model.norm if last else None
        self.head = model.head if last else None

    @staticmethod
    def inputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return (batch["input_ids"],)

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
            h = self.head(m.layers.gather_sequence(self.norm(h)))
        return self._with_aux(h, ctx.moe_aux)


class _StackPart(nn.Module):
    """Some blocks of a T5 stack (keeping the stack's parameter names), its bias table, maybe its norm."""

    def __init__(self, stack: nn.Module, blocks: range, with_norm: bool):
        super().__init__()
        self.relative_bias = stack.relative_bias
        self.blocks = nn.ModuleDict({str(i): stack.blocks[i] for i in blocks})
        self.norm = stack.norm if with_norm else None


class T5Stage(_Stage):
    """Blocks ``[start, end)`` of a T5, counting the encoder's blocks first, then the decoder's.

    Between stages travels ``(encoder states, encoder padding mask, decoder states)``: the decoder's
    cross-attention needs the encoder output (and sends its gradient back through every decoder stage), the
    mask is a batch input every stage needs. The first stage embeds both the encoder and the decoder input (the
    embedding is shared, and later stages only ever receive float states, never token ids), the last returns
    logits. Stages of one stack each hold a copy of its bias table.
    """

    def __init__(self, model: nn.Module, start: int, end: int, first: bool, last: bool):
        super().__init__(model, first, last)
        n_enc = len(model.encoder.blocks)
        enc, dec = range(start, min(end, n_enc)), range(max(start, n_enc) - n_enc, end - n_enc)
        self.embedding = model.embedding if first or (last and model.cfg.tie_embeddings) else None
        self.encoder = _StackPart(model.encoder, enc, with_norm=start < n_enc <= end) if enc else None
        self.decoder = _StackPart(model.decoder, dec, with_norm=last) if dec else None
        self.head = model.head if last else None

    @staticmethod
    def inputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        mask = batch.get("attention_mask")
        mask = torch.ones_like(batch["input_ids"]) if mask is None else mask
        return batch["input_ids"], mask, batch["decoder_input_ids"]

    def forward(self, enc: torch.Tensor, mask: torch.Tensor, dec: torch.Tensor):
        m, aux = self._model[0], {}
        if self.first:
            enc, dec = m.embed(enc), m.embed(dec)
        if self.encoder is not None:
            s = mask.shape[1]
            ctx = T5Context(bias=m.encoder.position_bias(s, s, enc.device), key_mask=mask, moe_aux=aux)
            for block in self.encoder.blocks.values():
                enc = block(enc, ctx)
            if self.encoder.norm is not None:
                enc = self.encoder.norm(enc)
        if self.decoder is None:
            return self._with_aux(enc, aux), mask, dec
        s = dec.shape[1] * self.seq_shards
        ctx = T5Context(bias=m.decoder.position_bias(s, s, dec.device), key_mask=mask, encoder_out=enc, moe_aux=aux)
        for block in self.decoder.blocks.values():
            dec = block(dec, ctx)
        if not self.last:
            return enc.view_as(enc), mask, self._with_aux(dec, aux)
        h = m.layers.gather_sequence(self.decoder.norm(dec))
        h = h * m.cfg.d_model ** -0.5 if m.cfg.tie_embeddings else h  # as T5.decode
        return self._with_aux(self.head(h), aux)


def split_model(model: nn.Module, stage_ids: list[int], num_stages: int) -> list[_Stage]:
    """This rank's stages; blocks (and GPT embeddings / head) owned by other ranks are dropped."""
    t5 = hasattr(model, "encoder")
    blocks = [*model.encoder.blocks, *model.decoder.blocks] if t5 else list(model.blocks)
    bounds = stage_bounds(len(blocks), num_stages)
    stage_cls = T5Stage if t5 else GPTStage
    stages = [stage_cls(model, *bounds[i], first=i == 0, last=i == num_stages - 1) for i in stage_ids]
    keep = {i for s in stage_ids for i in range(*bounds[s])}
    n_enc = len(model.encoder.blocks) if t5 else len(blocks)
    for i in set(range(len(blocks))) - keep:  # free what other ranks own
        stack, j = (model.encoder if t5 else model, i) if i < n_enc else (model.decoder, i - n_enc)
        stack.blocks[j] = nn.Identity()
    if t5:
        return stages
    if 0 not in stage_ids:
        model.pos_emb = None
        if not (model.cfg.tie_embeddings and num_stages - 1 in stage_ids):
            model.tok_emb = None
    if num_stages - 1 not in stage_ids:
        model.norm = model.head = None
    return stages


class PipelineEngine(DataParallelEngine):
    """Pipeline x tensor x data parallel (ZeRO-0 or 1); the data-parallel step is :class:`DataParallelEngine`'s."""

    def __init__(self, cfg: Config, model: nn.Module, mesh: Mesh, device: torch.device):
        pp, vpp = mesh.layout.pp, cfg.parallel.vpp
        self.stage_ids = [mesh.pp_rank + k * pp for k in range(vpp)]
        self.stages = split_model(model, self.stage_ids, pp * vpp)
        self.factory = model.layers
        self._token_scale = 1.0
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
        for stage in self.stages:
            stage.aux_scale, stage.aux_losses = 1.0 / (len(micro_batches) * self.dp_size), []
        losses: list[torch.Tensor] = []
        args = self.stages[0].inputs(batch) if self.stage_ids[0] == 0 else ()
        last = any(s.last for s in self.stages)
        kwargs = {"target": target, "losses": losses} if last else {}
        (schedule.step if train else schedule.eval)(*args, **kwargs)
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        if last:
            sums[0] = torch.stack([x.detach() for x in losses]).double().sum() * total
        # a new PipelineStage first runs one shape-inference forward (on placeholder inputs): skip its entry
        aux = [a.detach() for stage in self.stages for a in stage.aux_losses[-len(micro_batches):]]
        if aux:
            sums[1] = torch.stack(aux).double().sum()
        dist.all_reduce(sums, group=self.mesh.group("pp"))  # LM loss from the last stage, aux from every stage
        return sums

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
