"""Dense feed-forward blocks shared by every family (and, batched, by the Switch experts).

Gated activations (``swiglu`` for Llama, ``geglu`` for T5 v1.1) use one fused input projection whose local
output is ``[gate; up]`` (Megatron's convention: the projection is built with ``stride=2``, so under tensor
parallelism each rank's shard holds its own ``[gate_r; up_r]`` slices of the single-process halves and no
communication is needed between the two).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.models.layers import LayerFactory

ACTIVATIONS = ("swiglu", "geglu", "gelu", "relu")


def is_gated(activation: str) -> bool:
    return activation in ("swiglu", "geglu")


def activate(x: torch.Tensor, activation: str) -> torch.Tensor:
    """Apply ``activation`` to the output of the input projection (halving its width when gated)."""
    if activation == "swiglu":
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
    if activation == "geglu":
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up
    if activation == "gelu":
        return F.gelu(x, approximate="tanh")
    if activation == "relu":
        return F.relu(x)
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


class MLP(nn.Module):
    def __init__(self, factory: LayerFactory, dim: int, hidden: int, activation: str, bias: bool,
                 in_std: float, out_std: float):
        super().__init__()
        self.activation = activation
        sections = 2 if is_gated(activation) else 1  # [gate; up]: each tensor rank keeps a slice of both
        self.w_in = factory.column(dim, hidden * sections, bias, in_std, stride=sections)
        self.w_out = factory.row(hidden, dim, bias, out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(activate(self.w_in(x), self.activation))
