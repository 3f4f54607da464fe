"""Switch Transformer feed-forward layer (Fedus et al., 2021): top-1 routing with fixed expert capacity.

Per layer: an fp32 router picks one expert per token; each expert takes at most
``capacity = ceil(tokens * capacity_factor / num_experts)`` tokens, first come first served in token order;
the rest are *dropped*: the layer outputs zero for them, so the block's residual carries them through unchanged.
The expert output is scaled by the router probability of the chosen expert.

Auxiliary losses (returned, weighted by the model):

* load balancing ``E * sum_i f_i * P_i`` with ``f_i`` the fraction of tokens whose top choice is expert ``i``
  (before dropping) and ``P_i`` the mean router probability of expert ``i``; equals 1 when perfectly balanced.
* router z-loss (ST-MoE) ``mean(logsumexp(router_logits)^2)``, which keeps the router logits small.

Expert weights are batched tensors ``[num_experts, ...]`` so expert parallelism shards dim 0. Moving tokens to
experts is a separate :class:`TokenDispatcher`; expert parallel swaps in one that all-to-alls the
``[experts, capacity, dim]`` buffer, keeping capacity and dropping decisions local and identical.

Under tensor parallelism the experts are not split (Megatron's expert-tensor-parallel size 1): every tensor
rank holds the same experts and routes the same tokens. With sequence parallelism the layer first gathers the
sequence shards (``factory.gather_sequence``) so capacity and dropping are decided over the whole
micro-batch, as in one process, and hands back this rank's shard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.models.layers import LayerFactory, LocalLayers, init_normal_
from pretrain.models.mlp import activate, is_gated


@dataclass
class MoEConfig:
    num_experts: int = 0  # 0 = dense model
    every: int = 2  # block i uses experts when i % every == every - 1 (Switch: every other block)
    capacity_factor_train: float = 1.25  # expert capacity = factor x tokens / experts in training (overflow is dropped)
    capacity_factor_eval: float = 2.0  # the same at evaluation
    jitter: float = 0.01  # router input multiplied by U(1 - jitter, 1 + jitter) in training
    aux_loss_weight: float = 0.01  # weight of the Switch load-balancing loss
    z_loss_weight: float = 0.001  # weight of the router z-loss (ST-MoE)

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, index: int) -> bool:
        return self.enabled and index % self.every == self.every - 1

    def validate(self, prefix: str = "model.moe") -> None:
        if self.num_experts < 0 or self.num_experts == 1:
            raise ValueError(f"{prefix}.num_experts={self.num_experts}: use 0 (dense) or at least 2 experts")
        if self.every < 1:
            raise ValueError(f"{prefix}.every={self.every}: must be >= 1 (1 = every block is a Switch layer)")
        for key in ("capacity_factor_train", "capacity_factor_eval"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{prefix}.{key}={getattr(self, key)}: must be > 0 (Switch uses 1.0-2.0)")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"{prefix}.jitter={self.jitter}: must be in [0, 1)")
        for key in ("aux_loss_weight", "z_loss_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"{prefix}.{key}={getattr(self, key)}: must be >= 0")


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
    """Top-1 mixture of ``num_experts`` feed-forward experts; ``forward`` returns (output, aux dict)."""

    def __init__(self, cfg: MoEConfig, dim: int, hidden: int, activation: str, bias: bool,
                 in_std: float, out_std: float, router_std: float = 0.02, factory: LayerFactory | None = None):
        super().__init__()
        self.cfg, self.activation, self.factory = cfg, activation, factory or LocalLayers()
        e, width = cfg.num_experts, hidden * (2 if is_gated(activation) else 1)
        self.router = nn.Parameter(init_normal_(torch.empty(e, dim), router_std))
        self.w_in = nn.Parameter(init_normal_(torch.empty(e, dim, width), in_std))
        self.w_out = nn.Parameter(init_normal_(torch.empty(e, hidden, dim), out_std))
        self.bias_in = nn.Parameter(torch.zeros(e, 1, width)) if bias else None
        self.bias_out = nn.Parameter(torch.zeros(e, 1, dim)) if bias else None
        self.dispatcher = TokenDispatcher()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits and probabilities in fp32, whatever the autocast dtype."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.float()
            if self.training and self.cfg.jitter > 0:
                xf = xf * torch.empty_like(xf).uniform_(1 - self.cfg.jitter, 1 + self.cfg.jitter)
            logits = F.linear(xf, self.router.float())
        return logits, logits.softmax(-1)

    def experts(self, buf: torch.Tensor) -> torch.Tensor:
        """All experts at once on ``[experts, tokens, dim]`` (however many experts this rank holds)."""
        h = torch.bmm(buf, self.w_in) if self.bias_in is None else torch.baddbmm(self.bias_in, buf, self.w_in)
        h = activate(h, self.activation)
        return torch.bmm(h, self.w_out) if self.bias_out is None else torch.baddbmm(self.bias_out, h, self.w_out)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = self.factory.gather_sequence(x)  # the whole micro-batch under sequence parallelism
        shape, e = x.shape, self.cfg.num_experts
        x = x.reshape(-1, shape[-1])
        logits, probs = self.route(x)
        gate, expert = probs.max(-1)
        factor = self.cfg.capacity_factor_train if self.training else self.cfg.capacity_factor_eval
        capacity = expert_capacity(x.shape[0], e, factor)
        buf, keep, state = self.dispatcher.dispatch(x, expert, e, capacity)
        y = self.dispatcher.combine(self.experts(buf), state) * gate.unsqueeze(-1).to(x.dtype)
        frac = one_hot(expert, e).float().mean(0)
        aux = {"load_balance_loss": e * (frac * probs.mean(0)).sum(),
               "z_loss": torch.logsumexp(logits, -1).pow(2).mean(),
               "drop_frac": 1.0 - keep.float().mean().detach()}
        return self.factory.scatter_sequence(y.view(shape)), aux
