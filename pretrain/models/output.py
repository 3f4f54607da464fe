"""What every model's ``forward`` returns: :class:`ModelOutput`, and :func:`lm_output` that builds it from
per-token LM losses plus the Switch layers' auxiliary losses (see docs/design.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ModelOutput:
    """What every ``model(**batch)`` returns (see docs/design.md)."""

    loss: torch.Tensor  # mean LM loss over loss_mask tokens + weighted auxiliary losses
    lm_loss_sum: torch.Tensor  # sum of per-token LM losses (for exact means across ranks / micro-batches)
    num_tokens: torch.Tensor  # number of tokens in that sum
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars: lm_loss, aux_loss, ...


def lm_output(token_loss: torch.Tensor, loss_mask: torch.Tensor | None,
              moe_aux: dict[int, dict[str, torch.Tensor]], aux_weight: float, z_weight: float) -> ModelOutput:
    """Combine per-token LM losses and the Switch layers' auxiliary losses (summed over layers)."""
    if loss_mask is None:
        lm_sum, n = token_loss.sum(), torch.tensor(float(token_loss.numel()), device=token_loss.device)
    else:
        mask = loss_mask.to(token_loss.dtype)
        lm_sum, n = (token_loss * mask).sum(), mask.sum()
    lm_loss = lm_sum / n.clamp(min=1)
    loss, metrics = lm_loss, {"lm_loss": lm_loss.detach()}
    if moe_aux:
        aux = {k: torch.stack([layer[k] for layer in moe_aux.values()]).sum() for k in next(iter(moe_aux.values()))}
        loss = loss + aux_weight * aux["load_balance_loss"] + z_weight * aux["z_loss"]
        metrics.update(aux_loss=aux["load_balance_loss"].detach(), z_loss=aux["z_loss"].detach(),
                       moe_drop_frac=aux["drop_frac"].detach() / len(moe_aux))
    return ModelOutput(loss=loss, lm_loss_sum=lm_sum, num_tokens=n, metrics=metrics)
