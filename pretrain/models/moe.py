"""Mixture-of-experts feed-forward layer: Switch (Fedus et al., 2021) and the top-k styles trained today
(Mixtral, Qwen2/3-MoE, DeepSeek-V3, OLMoE). The default :class:`MoEConfig` is Switch, bit for bit.

Per layer: an fp32 router scores the experts and each token picks ``top_k`` of them
(:mod:`pretrain.models.router`: softmax or sigmoid scores, optional renormalisation of the k weights, an
aux-loss-free selection bias); the layer's output is ``sum_j w_j * expert_{i_j}(x)``, plus an always-applied
shared expert (optionally sigmoid-gated, Qwen2-MoE) when ``shared_ffn_size > 0``. Two ways to run the experts:

* capacity (Switch): each expert takes at most ``capacity = ceil(tokens * k * capacity_factor / num_experts)``
  assignments, first come first served in choice-major order (every token's first choice, then its second, ...);
  the rest are *dropped* (they add zero, so the block's residual carries a fully dropped token unchanged);
* dropless (``dropless=true``): every assignment is computed by a grouped GEMM over assignments sorted by
  expert (:mod:`pretrain.models.dropless`).

Auxiliary losses (returned per layer, weighted by the model): the load-balancing loss (per micro-batch or per
sequence, :func:`pretrain.models.router.balance_loss`; Switch's ``E * sum_i f_i * P_i`` for ``k = 1``), the
router z-loss (ST-MoE) ``mean(logsumexp(router_logits)^2)``, and the dropped fraction. Training forwards also
add their selections per expert and those numbers to the layer's ``load`` / ``totals`` buffers, which
:mod:`pretrain.moe_balance` reads once per step (telemetry, selection-bias update).

Expert weights are batched tensors ``[num_experts, ...]`` so expert parallelism shards dim 0. Moving tokens to
experts is a separate dispatcher; expert parallel swaps in one that all-to-alls the ``[experts, capacity, dim]``
buffer (keeping capacity and dropping decisions local and identical) or the sorted rows (dropless).

Under tensor parallelism the routed experts are not split (Megatron's expert-tensor-parallel size 1): every
tensor rank holds the same experts and routes the same tokens; the shared expert is a tensor-parallel dense MLP.
With sequence parallelism the layer first gathers the sequence shards (``factory.gather_sequence``) so capacity
and dropping are decided over the whole micro-batch, as in one process, and hands back this rank's shard.
Under context parallelism it likewise gathers the context group's chunks in global token order (``factory.cp``),
so routing, capacity, dropping and the aux losses are one process's, and keeps this rank's tokens' outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.models.dropless import SortedDispatcher, grouped_mm, row_groups
from pretrain.models.layers import LayerFactory, LocalLayers, init_normal_
from pretrain.models.mlp import MLP, activate, is_gated
from pretrain.models.router import SCOPES, SCORES, balance_loss, route, scores_of, selection_hot, z_loss

MIN_CAPACITY_FACTOR = 0.1  # below: the experts keep under a tenth of the tokens even when perfectly balanced
TOTALS = ("load_balance_loss", "z_loss", "drop_frac", "forwards")  # per-layer telemetry sums (SwitchMLP.totals)


@dataclass
class MoEConfig:
    num_experts: int = 0  # 0 = dense model
    every: int = 2  # block i uses experts when i % every == every - 1 (Switch: every other block)
    capacity_factor_train: float = 1.25  # capacity = factor x tokens x top_k / experts in training (overflow dropped)
    capacity_factor_eval: float = 2.0  # the same at evaluation
    jitter: float = 0.01  # router input multiplied by U(1 - jitter, 1 + jitter) in training
    aux_loss_weight: float = 0.01  # weight of the load-balancing loss (aux_loss_scope)
    z_loss_weight: float = 0.001  # weight of the router z-loss (ST-MoE)
    top_k: int = 1  # experts per token (1 = Switch; Mixtral 2, DeepSeek-V3 8)
    score: str = "softmax"  # router scores: softmax over experts | sigmoid per expert (DeepSeek-V3)
    normalize_top_k: bool = False  # divide the k selected scores by their sum (Mixtral, Qwen3-MoE, DeepSeek-V3)
    routed_scale: float = 1.0  # routing weights multiplied by this (DeepSeek-V3 routed_scaling_factor)
    expert_ffn_size: int | None = None  # hidden width of each routed expert; null = the model's ffn size
    shared_ffn_size: int = 0  # hidden width of the always-applied shared expert (0 = none)
    shared_gate: bool = False  # scale the shared expert by sigmoid(x . w) (Qwen2-MoE's shared_expert_gate)
    first_dense: int = 0  # blocks before this index stay dense (DeepSeek first_k_dense_replace)
    aux_loss_scope: str = "batch"  # load-balancing loss over the micro-batch | per sequence (DeepSeek-V3)
    bias_update_rate: float = 0.0  # aux-loss-free balancing: per-expert selection bias step after each step (0 = off)
    dropless: bool = False  # compute every routed token (grouped GEMM; capacity factors unused)

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, index: int) -> bool:
        return self.enabled and index >= self.first_dense and index % self.every == self.every - 1

    def expert_hidden(self, ffn: int) -> int:
        """Hidden width of one routed expert: ``expert_ffn_size``, default the model's dense width ``ffn``."""
        return self.expert_ffn_size or ffn

    def validate(self, prefix: str = "model.moe") -> None:
        if self.num_experts < 0 or self.num_experts == 1:
            raise ValueError(f"{prefix}.num_experts={self.num_experts}: use 0 (dense) or at least 2 experts")
        if self.every < 1:
            raise ValueError(f"{prefix}.every={self.every}: must be >= 1 (1 = every block is a Switch layer)")
        for key in ("capacity_factor_train", "capacity_factor_eval"):
            if getattr(self, key) < MIN_CAPACITY_FACTOR:
                raise ValueError(f"{prefix}.{key}={getattr(self, key)}: below {MIN_CAPACITY_FACTOR} the experts drop "
                                 "(nearly) every token; use 1.0-2.0, or model.moe.dropless=true")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"{prefix}.jitter={self.jitter}: must be in [0, 1)")
        for key in ("aux_loss_weight", "z_loss_weight", "bias_update_rate", "shared_ffn_size", "first_dense"):
            if getattr(self, key) < 0:
                raise ValueError(f"{prefix}.{key}={getattr(self, key)}: must be >= 0")
        self._validate_routing(prefix)

    def _validate_routing(self, prefix: str) -> None:
        if self.top_k < 1 or (self.enabled and self.top_k > self.num_experts):
            raise ValueError(f"{prefix}.top_k={self.top_k}: must be between 1 and num_experts={self.num_experts}")
        choices = {"score": SCORES, "aux_loss_scope": SCOPES}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{prefix}.{key}={getattr(self, key)!r}: expected one of {allowed}")
        if self.routed_scale <= 0:
            raise ValueError(f"{prefix}.routed_scale={self.routed_scale}: must be > 0")
        if self.expert_ffn_size is not None and self.expert_ffn_size < 1:
            raise ValueError(f"{prefix}.expert_ffn_size={self.expert_ffn_size}: must be positive or null")
        if self.shared_gate and not self.shared_ffn_size:
            raise ValueError(f"{prefix}.shared_gate=true needs a shared expert: set {prefix}.shared_ffn_size > 0")


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    return max(1, math.ceil(num_tokens * capacity_factor / num_experts))


def one_hot(expert: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``F.one_hot(expert, num_experts)`` without its range check (``.item()`` of the min and max on CPU)."""
    return (expert[:, None] == torch.arange(num_experts, device=expert.device)).long()


class TokenDispatcher:
    """Single-process dispatch: scatter kept tokens into ``[experts, capacity, dim]`` and gather them back.

    Static shapes, so no host sync: every token has a slot, ``expert * capacity + position`` when kept and
    the spare row ``experts * capacity`` (cut off, never read) when dropped.
    """

    def dispatch(self, x: torch.Tensor, expert: torch.Tensor, num_experts: int, capacity: int):
        """Returns (expert buffer, keep mask ``[tokens]``, the tokens' slots for :meth:`combine`)."""
        hot = one_hot(expert, num_experts)
        position = (hot.cumsum(0) * hot).sum(-1) - 1  # rank of each token within its expert's queue
        keep = position < capacity
        spare = num_experts * capacity
        slot = torch.where(keep, expert * capacity + position, spare)
        buf = x.new_zeros(spare + 1, x.shape[-1]).index_copy(0, slot, x)
        return buf[:spare].view(num_experts, capacity, -1), keep, slot

    def combine(self, y: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """Each token's expert output; zero for dropped tokens (their slot is the spare row)."""
        y = y.reshape(-1, y.shape[-1])
        return torch.cat([y, y.new_zeros(1, y.shape[-1])]).index_select(0, slot)


class SwitchMLP(nn.Module):
    """Mixture of ``num_experts`` feed-forward experts, top-``k`` token choice (Switch: ``k = 1``), plus an optional
    shared expert; ``forward`` returns (output, aux dict). Parameter layout: docs/design.md, MoE."""

    def __init__(self, cfg: MoEConfig, dim: int, hidden: int, activation: str, bias: bool,
                 in_std: float, out_std: float, router_std: float = 0.02, factory: LayerFactory | None = None):
        super().__init__()
        self.cfg, self.activation, self.factory = cfg, activation, factory or LocalLayers()
        e, expert_hidden = cfg.num_experts, cfg.expert_hidden(hidden)
        width = expert_hidden * (2 if is_gated(activation) else 1)
        self.router = nn.Parameter(init_normal_(torch.empty(e, dim), router_std))
        self.w_in = nn.Parameter(init_normal_(torch.empty(e, dim, width), in_std))
        self.w_out = nn.Parameter(init_normal_(torch.empty(e, expert_hidden, dim), out_std))
        self.bias_in = nn.Parameter(torch.zeros(e, 1, width)) if bias else None
        self.bias_out = nn.Parameter(torch.zeros(e, 1, dim)) if bias else None
        shared = cfg.shared_ffn_size
        self.shared = MLP(self.factory, dim, shared, activation, bias, in_std, out_std) if shared else None
        self.shared_gate = nn.Parameter(init_normal_(torch.empty(1, dim), router_std)) if cfg.shared_gate else None
        # aux-loss-free balancing: added to the scores for selection only; updated by pretrain.moe_balance
        self.register_buffer("expert_bias", torch.zeros(e) if cfg.bias_update_rate > 0 else None)
        # training telemetry, summed over forwards until pretrain.moe_balance reads and resets it
        self.register_buffer("load", torch.zeros(e), persistent=False)  # selections per expert
        self.register_buffer("totals", torch.zeros(len(TOTALS)), persistent=False)
        self.dispatcher = SortedDispatcher() if cfg.dropless else TokenDispatcher()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits and scores in fp32, whatever the autocast dtype."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.float()
            if self.training and self.cfg.jitter > 0:
                xf = xf * torch.empty_like(xf).uniform_(1 - self.cfg.jitter, 1 + self.cfg.jitter)
            logits = F.linear(xf, self.router.float())
        return logits, scores_of(logits, self.cfg.score)

    def experts(self, buf: torch.Tensor) -> torch.Tensor:
        """All experts at once on ``[experts, tokens, dim]`` (however many experts this rank holds)."""
        h = torch.bmm(buf, self.w_in) if self.bias_in is None else torch.baddbmm(self.bias_in, buf, self.w_in)
        h = activate(h, self.activation)
        return torch.bmm(h, self.w_out) if self.bias_out is None else torch.baddbmm(self.bias_out, h, self.w_out)

    def grouped_experts(self, rows: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """All experts at once on rows sorted by expert (``offs``: cumulative rows per local expert)."""
        dtype = torch.get_autocast_dtype(rows.device.type) if torch.is_autocast_enabled(rows.device.type) \
            else rows.dtype
        rows = rows.to(dtype)
        groups = None if self.bias_in is None else row_groups(offs, rows.shape[0])
        h = grouped_mm(rows, self.w_in.to(dtype), offs)
        if groups is not None:
            h = h + self.bias_in.squeeze(1).to(dtype).index_select(0, groups)
        y = grouped_mm(activate(h, self.activation), self.w_out.to(dtype), offs)
        return y if groups is None else y + self.bias_out.squeeze(1).to(dtype).index_select(0, groups)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        local = x
        x = self._whole(self.factory.gather_sequence(x))  # the whole micro-batch under sequence/context parallelism
        cfg, shape = self.cfg, x.shape
        e, k = cfg.num_experts, cfg.top_k
        x = x.reshape(-1, shape[-1])
        logits, scores = self.route(x)
        weight, expert = route(scores, k, self.expert_bias, cfg.normalize_top_k, cfg.routed_scale)
        assigned = expert.t().reshape(-1)  # choice-major: every token's first choice, then the second, ...
        xa = x if k == 1 else x.repeat(k, 1)
        if cfg.dropless:
            rows, offs, state = self.dispatcher.dispatch(xa, assigned, e)
            y, dropped = self.dispatcher.combine(self.grouped_experts(rows, offs), state), x.new_zeros(())
        else:
            factor = cfg.capacity_factor_train if self.training else cfg.capacity_factor_eval
            buf, keep, state = self.dispatcher.dispatch(xa, assigned, e, expert_capacity(xa.shape[0], e, factor))
            y, dropped = self.dispatcher.combine(self.experts(buf), state), 1.0 - keep.float().mean()
        y = (y.view(k, -1, shape[-1]) * weight.t().unsqueeze(-1).to(x.dtype)).sum(0)
        batch_shape = shape[:-1] if len(shape) == 3 else (1, x.shape[0])
        aux = {"load_balance_loss": balance_loss(scores, expert, cfg.score, cfg.aux_loss_scope, batch_shape),
               "z_loss": z_loss(logits), "drop_frac": dropped.detach()}
        self._record(expert, aux)
        y = self.factory.scatter_sequence(self._mine(y.view(shape)))
        return (y if self.shared is None else y + self._shared(local, x, shape)), aux

    def _whole(self, x: torch.Tensor) -> torch.Tensor:
        """Under context parallelism: the context group's tokens in global order (``factory.cp``)."""
        return x if self.factory.cp is None else self.factory.cp.whole(x)

    def _mine(self, y: torch.Tensor) -> torch.Tensor:
        """This context rank's tokens of a whole-sequence ``y`` (the inverse of :meth:`_whole`)."""
        return y if self.factory.cp is None else self.factory.cp.mine(y)

    def _shared(self, local: torch.Tensor, x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """The shared expert on this rank's tokens, gated on the gathered ones (identical on tensor ranks)."""
        out = self.shared(local)
        if self.shared_gate is None:
            return out
        gate = torch.sigmoid(F.linear(x, self.shared_gate.to(x.dtype))).view(*shape[:-1], 1)
        return out * self.factory.scatter_sequence(self._mine(gate))

    @torch.no_grad()
    def _record(self, expert: torch.Tensor, aux: dict[str, torch.Tensor]) -> None:
        """Add this training forward to the telemetry (not an activation-checkpoint recomputation in backward;
        compiled graphs run the forward's side effects once anyway)."""
        recomputed = not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1
        if not self.training or recomputed:
            return
        self.load += selection_hot(expert, self.cfg.num_experts).sum(-2)
        self.totals += torch.stack([aux[key].detach().float() for key in TOTALS[:-1]] + [self.totals.new_ones(())])
