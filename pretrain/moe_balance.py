"""Once per optimizer step: aux-loss-free expert balancing and per-layer expert telemetry (docs/design.md, MoE).

Every MoE layer (:class:`~pretrain.models.moe.SwitchMLP`) sums over its training forwards the selections per
expert and its load-balancing loss, z-loss and dropped fraction. :meth:`ExpertBalance.after_step` gathers
these sums of every layer of the model into one ``[layers, E + 4]`` table, all-reduced over the whole world in
one collective (no host sync): pipeline ranks hold different layers, data and expert ranks route different
tokens, tensor ranks route the same tokens, and so do context ranks (each MoE layer gathers the whole sequence),
so the sum is divided by ``tp x cp`` (the counts are integers, exact).
With ``model.moe.bias_update_rate > 0`` and an applied step, each layer's selection bias then moves by
``rate * sign(mean load - load)`` (DeepSeek-V3): the same update on every rank and in every layout.
:meth:`ExpertBalance.metrics` reads the last table (one host read) for the trainer's log row: per layer
``moe/<layer>/load`` (selections per expert over the step), ``drop_frac``, ``aux_loss``, ``z_loss`` (means over
the step's forwards) and ``bias``, plus ``moe/load_imbalance`` (max / mean load, averaged over layers).
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist

from pretrain import step
from pretrain.models.moe import TOTALS, SwitchMLP


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


class ExpertBalance:
    """The MoE layers of ``engine.model`` under the full model's names, in one order on every rank."""

    def __init__(self, engine):
        moe = getattr(engine.cfg.model, "moe", None)
        self.enabled = moe is not None and moe.enabled
        self.rate = moe.bias_update_rate if self.enabled else 0.0
        # tensor ranks, and context ranks (each routes the whole sequence), route the same tokens
        self.tp = engine.mesh.layout.tp * engine.mesh.layout.cp if engine.mesh is not None else 1
        self.table: torch.Tensor | None = None
        self.layers: dict[str, SwitchMLP] = {}
        if not self.enabled:
            return
        routers = {id(m.router): m for m in engine.model.modules() if isinstance(m, SwitchMLP)}
        mine = {name.removesuffix(".router"): routers[id(p)] for name, p in engine.model.named_parameters()
                if id(p) in routers}
        everyone = [list(mine)]
        if step.distributed():
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, list(mine))
        self.names = sorted({n for names in everyone for n in names}, key=_natural)
        self.layers = mine
        self.num_experts, self.device = moe.num_experts, engine.device
        pp = engine.mesh.layout.pp if engine.mesh is not None else 1
        self.holders = (dist.get_world_size() if step.distributed() else 1) // pp  # ranks holding one layer
        self.bias = torch.zeros(len(self.names), self.num_experts, device=self.device)

    def after_step(self, skipped: bool) -> None:
        """Reduce and reset the layers' step sums; update the selection biases unless the step was ``skipped``.
        Call on every rank after every ``train_step``."""
        if not self.enabled:
            return
        e = self.num_experts
        table = torch.zeros(len(self.names), 2 * e + len(TOTALS), device=self.device)
        for i, name in enumerate(self.names):
            layer = self.layers.get(name)
            if layer is not None:
                table[i, :e + len(TOTALS)] = torch.cat([layer.load, layer.totals])
                layer.load.zero_()
                layer.totals.zero_()
        self.table = step.all_reduce(table) / self.tp
        if self.rate > 0 and not skipped:
            load = self.table[:, :e]
            update = self.rate * torch.sign(load.mean(-1, keepdim=True) - load)
            for i, name in enumerate(self.names):
                if name in self.layers:
                    self.layers[name].expert_bias += update[i]
        if self.rate > 0:  # for the log: each layer's bias from the ranks holding it, averaged
            for i, name in enumerate(self.names):
                if name in self.layers:
                    self.bias[i] = self.layers[name].expert_bias * (self.tp / self.holders)
            self.table[:, e + len(TOTALS):] = step.all_reduce(self.bias.clone()) / self.tp

    def metrics(self) -> dict[str, float | list[float]]:
        """The last step's telemetry (empty before the first step or without MoE layers): one host read."""
        if self.table is None:
            return {}
        e, out, imbalance = self.num_experts, {}, []
        for name, row in zip(self.names, self.table.tolist()):
            load, totals = row[:e], dict(zip(TOTALS, row[e:e + len(TOTALS)]))
            forwards = max(totals.pop("forwards"), 1.0)
            out[f"moe/{name}/load"] = load
            out.update({f"moe/{name}/{key}": value / forwards for key, value in totals.items()})
            if self.rate > 0:
                out[f"moe/{name}/bias"] = row[e + len(TOTALS):]
            imbalance.append(max(load) / max(sum(load) / e, 1e-9))
        out["moe/load_imbalance"] = sum(imbalance) / len(imbalance)
        return out
