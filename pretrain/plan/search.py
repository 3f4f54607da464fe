"""Enumerate the layouts of N GPUs, keep those the stack accepts, estimate each, rank them.

A layout is the config's ``parallel`` section (tp, pp, vpp, ep, sp, zero, offloads) plus
``train.micro_batch_size`` and ``model.activation_checkpointing``. Each candidate is the config with those
values replaced and checked by the same code ``pretrain train`` runs before starting processes
(:meth:`pretrain.config.Config.validate` and :func:`pretrain.parallel.validate.validate_layout`); what they
refuse is kept with its message. Tensor parallelism stays inside a node (``tp <= gpus per node``). Ranking:
layouts that fit the device first, then predicted tokens/s per GPU, then lower peak memory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from itertools import product

from pretrain.config import Config
from pretrain.configlib import ConfigError
from pretrain.plan.hardware import Device
from pretrain.plan.memory import Memory, memory
from pretrain.plan.shapes import Shape, model_shape
from pretrain.plan.timing import Timing, local_params, timing

LAYOUT_KEYS = ("tp", "pp", "vpp", "ep", "sp", "zero", "offload_optimizer", "offload_params")
OFFLOADS = ((False, False), (True, False), (True, True))  # (optimizer, params)


@dataclass
class Estimate:
    layout: dict
    memory: Memory
    timing: Timing
    fits: bool


def layout_of(cfg: Config) -> dict:
    """The searched values of ``cfg``."""
    out = {k: getattr(cfg.parallel, k) for k in LAYOUT_KEYS}
    out.update(micro_batch=cfg.train.micro_batch_size, checkpointing=cfg.model.activation_checkpointing)
    return out


def with_layout(cfg: Config, layout: dict) -> Config:
    """``cfg`` with ``layout``'s values (a copy; ``cfg`` is untouched)."""
    par = dataclasses.replace(cfg.parallel, **{k: layout[k] for k in LAYOUT_KEYS if k in layout})
    train = dataclasses.replace(cfg.train, micro_batch_size=layout.get("micro_batch", cfg.train.micro_batch_size))
    model = dataclasses.replace(cfg.model, activation_checkpointing=layout.get(
        "checkpointing", cfg.model.activation_checkpointing))
    return dataclasses.replace(cfg, parallel=par, train=train, model=model)


def refusal(cfg: Config, world_size: int) -> str | None:
    """Why the stack would refuse ``cfg`` on ``world_size`` ranks (the pre-flight check's message), or None."""
    from pretrain.parallel.validate import validate_layout

    try:
        cfg.validate()
        validate_layout(cfg, world_size)
    except (ConfigError, ValueError) as e:
        return str(e)
    return None


def estimate(cfg: Config, world_size: int, per_node: int, device: Device, efficiency: float | None = None,
             shape: Shape | None = None) -> Estimate:
    """Memory and timing of ``cfg``'s own layout (assumed valid); ``shape``: ``cfg``'s
    :func:`~pretrain.plan.shapes.model_shape` when the caller has it (no layout key changes it)."""
    shape = shape or model_shape(cfg)
    mem = memory(cfg, world_size, shape)
    tim = timing(cfg, world_size, per_node, device, shape, local_params(cfg, shape, mem.stage), efficiency)
    return Estimate(layout_of(cfg), mem, tim, mem.total <= device.memory_bytes)


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def candidates(cfg: Config, world_size: int, per_node: int) -> list[dict]:
    """Every layout to try: sizes that multiply to ``world_size``, with the options that apply to them."""
    moe = cfg.model.moe.enabled
    out = []
    for tp in [k for k in _divisors(world_size) if k <= per_node]:
        for pp in _divisors(world_size // tp):
            dp = world_size // (tp * pp)
            batches = [b for b in (1, 2, 4, 8, 16, 32) if cfg.train.global_batch_size % (b * dp) == 0]
            for vpp, ep, sp, zero, offload, mb, ckpt in product(
                    (1, 2) if pp > 1 else (1,), _divisors(dp) if moe else (1,), (False, True) if tp > 1 else (False,),
                    range(4), OFFLOADS, batches or [cfg.train.micro_batch_size], ("none", "full")):
                if (offload[0] and not zero) or (offload[1] and zero != 3):
                    continue  # never a choice: the options need those stages
                out.append(dict(tp=tp, pp=pp, vpp=vpp, ep=ep, sp=sp, zero=zero, offload_optimizer=offload[0],
                                offload_params=offload[1], micro_batch=mb, checkpointing=ckpt))
    return out


def search(cfg: Config, world_size: int, per_node: int, device: Device, efficiency: float | None = None
           ) -> tuple[list[Estimate], list[tuple[dict, str]]]:
    """(ranked estimates, refused layouts with the reason)."""
    found, refused = [], []
    shape = None  # built at the first estimate: the same for every layout
    for layout in candidates(cfg, world_size, per_node):
        trial = with_layout(cfg, layout)
        reason = refusal(trial, world_size)
        if reason:
            refused.append((layout, reason))
        else:
            shape = shape or model_shape(cfg)
            found.append(estimate(trial, world_size, per_node, device, efficiency, shape))
    found.sort(key=lambda e: (not e.fits, -e.timing.tokens_per_gpu, e.memory.total))
    return found, refused
