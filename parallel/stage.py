"""Pipeline stages: the real model cut by its family's spec, behind the module ``torch.distributed.pipelining``
runs.

Every rank builds the whole model once from the shared seed (so the initialization equals the single-process
one) and cuts one copy per stage it runs (:func:`split_model`): the family's ``pipeline_stage`` keeps the
stage's blocks (contiguous ``[start, end)`` ranges, :func:`stage_bounds`) and the pieces the first and last
stages need, and the model's own ``stage_forward`` runs it, so no forward is written twice. Stage ``i`` of
``pp * vpp`` lives on pipeline rank ``i % pp`` (interleaved placement). A :class:`Stage` registers the cut
model's pieces under their own names, so checkpoints of a pipeline run name tensors like a single-process run.

Switch layers: each stage adds its layers' weighted auxiliary losses to the backward through its (first)
output (:class:`_AuxLossGrad`, Megatron's ``MoEAuxLossAutoScaler`` idea), so they reach the gradients without
being carried to the last stage.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from pretrain.models.registry import spec_for_config


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


class Stage(nn.Module):
    """One pipeline stage: ``model`` (the model cut by its family's ``pipeline_stage``) with its pieces
    registered under the model's own parameter names; ``forward`` is ``model.stage_forward``.

    ``aux_scale`` (set per step) weighs this stage's Switch auxiliary losses in the backward; their values are
    appended to ``aux_losses``.
    """

    def __init__(self, model: nn.Module, first: bool, last: bool):
        super().__init__()
        self.first, self.last = first, last
        self._model = [model]  # a list keeps it unregistered: its pieces are registered below
        for name, child in model.named_children():
            self.add_module(name, child)
        self.aux_scale, self.aux_losses = 0.0, []

    @property
    def model(self) -> nn.Module:
        """The cut model this stage runs (what evaluation scores through, with its config and factory)."""
        return self._model[0]

    def inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The first stage's inputs from a batch."""
        return spec_for_config(self.model.cfg).stage_inputs(batch)

    def forward(self, *inputs: torch.Tensor):
        out, moe_aux = self.model.stage_forward(*inputs, first=self.first, last=self.last)
        if not moe_aux:
            return out
        moe = self.model.cfg.moe
        aux = sum(moe.aux_loss_weight * a["load_balance_loss"] + moe.z_loss_weight * a["z_loss"]
                  for a in moe_aux.values())
        self.aux_losses.append(aux.detach())
        if not torch.is_grad_enabled():
            return out
        if isinstance(out, tuple):
            return (_AuxLossGrad.apply(out[0], aux, self.aux_scale), *out[1:])
        return _AuxLossGrad.apply(out, aux, self.aux_scale)


def split_model(model: nn.Module, stage_ids: list[int], num_stages: int) -> list[Stage]:
    """This rank's stages ``stage_ids`` of ``num_stages``, each cut from ``model`` (which is left whole: the
    pieces no stage keeps are freed with it)."""
    spec = spec_for_config(model.cfg)
    bounds = stage_bounds(spec.pipeline_blocks(model.cfg), num_stages)
    return [Stage(spec.pipeline_stage(model, range(*bounds[i]), i == 0, i == num_stages - 1),
                  first=i == 0, last=i == num_stages - 1) for i in stage_ids]
