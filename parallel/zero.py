"""This rank's model and ZeRO optimizer state as plain tensors/containers, and back (same layout).

Our checkpoints are loaded with ``weights_only=True``, but DeepSpeed's optimizer state dicts hold objects
(loss scalers, enums, fragment maps). Those are derived from the layout, not learned, so we save only the
plain parts and on load lay them over a freshly built optimizer's own state dict.
"""

from __future__ import annotations

from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

_PLAIN = (torch.Tensor, int, float, bool, str, type(None))


def _plain(obj: Any) -> Any:
    """``obj`` without anything ``torch.load(weights_only=True)`` would refuse (dropped, not converted)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items() if _is_plain(v)}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj if _is_plain(v))
    return obj


def _is_plain(obj: Any) -> bool:
    if isinstance(obj, (dict, list, tuple)):
        return all(_is_plain(v) for v in (obj.values() if isinstance(obj, dict) else obj))
    return type(obj) in _PLAIN or isinstance(obj, torch.Tensor)


def _overlay(fresh: Any, saved: Any) -> Any:
    if isinstance(fresh, dict) and isinstance(saved, dict):
        return {**fresh, **{k: _overlay(fresh.get(k), v) for k, v in saved.items()}}
    return saved


def _is_zero(optimizer) -> bool:
    return isinstance(optimizer, (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3))


def model_state(ds) -> dict[str, torch.Tensor]:
    """Full (tensor-parallel-local) parameters; ZeRO-3 gathers its partitions for the copy."""
    params = list(ds.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=ds.zero_optimization_stage() == 3):
        return {k: v.detach().clone() for k, v in ds.module.state_dict().items()}


def load_model_state(ds, state: dict[str, torch.Tensor]) -> None:
    params = list(ds.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0, enabled=ds.zero_optimization_stage() == 3):
        ds.module.load_state_dict(state)


def optimizer_state(ds) -> dict:
    return _plain(ds.optimizer.state_dict())


def load_optimizer_state(ds, state: dict) -> None:
    merged = _overlay(ds.optimizer.state_dict(), state)
    if _is_zero(ds.optimizer):
        # DeepSpeed takes a list indexed by data-parallel rank and reads only ours (same layout); the fp32
        # master partitions are part of the saved state, so restore them rather than copy the model
        per_rank: list = [None] * ds.dp_world_size
        per_rank[dist.get_rank(ds.optimizer.dp_process_group)] = merged
        ds.optimizer.load_state_dict(per_rank, load_from_fp32_weights=True)
    else:
        ds.optimizer.load_state_dict(merged)
