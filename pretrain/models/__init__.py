"""Model families: one folder per family (``gpt``, ``t5``); Switch MoE is a config option of both.

``build_model(family, cfg, layers)`` is the only entry point the trainer needs. Families are imported lazily
so that ``import pretrain.models`` stays cheap.
"""

from __future__ import annotations

import importlib
import typing
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from pretrain.models.layers import LayerFactory

FAMILIES = {"gpt": "pretrain.models.gpt", "t5": "pretrain.models.t5"}


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


def config_class(family: str) -> type:
    """The config dataclass of ``family`` (``GPTConfig`` or ``T5Config``)."""
    return _family(family).CONFIG


def build_model(family: str, cfg: dict | typing.Any, layers: LayerFactory | None = None) -> nn.Module:
    """Validate ``cfg`` (a dict, e.g. the YAML ``model`` section, or the family's dataclass) and build the model.

    ``layers`` is the layer factory (default: single-process torch layers; ``parallel`` passes its own).
    """
    module = _family(family)
    if isinstance(cfg, dict):
        if cfg.get("family", family) != family:
            raise ValueError(f"model.family={cfg['family']!r} contradicts the requested family {family!r}")
        from pretrain.config import dataclass_from_dict

        cfg = dataclass_from_dict(module.CONFIG, {k: v for k, v in cfg.items() if k != "family"}, "model")
    elif not isinstance(cfg, module.CONFIG):
        raise TypeError(f"model config for family {family!r} must be a dict or {module.CONFIG.__name__}, "
                        f"got {type(cfg).__name__}")
    cfg.validate()
    return module.MODEL(cfg, layers)


def _family(family: str):
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; set model.family to one of {sorted(FAMILIES)}")
    return importlib.import_module(FAMILIES[family])
