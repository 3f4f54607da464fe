"""The engine factory: :func:`build_engine` is the one place that decides which engine trains a config.

It sits above every engine it picks (they import the interface :mod:`pretrain.engine`, never this module):

* plain layouts (one process, or data parallelism without ZeRO) -> :class:`~pretrain.local_engine.LocalEngine`;
* ``pp > 1`` -> :class:`~pretrain.parallel.pipeline.PipelineEngine`;
* else ``ep > 1`` -> :class:`~pretrain.parallel.data.DataParallelEngine` (experts sharded first);
* else (tensor/sequence parallelism, ZeRO) -> :class:`~pretrain.parallel.engine.DeepSpeedEngine`.
* ``cp > 1``: that engine inside :class:`~pretrain.parallel.context_engine.ContextParallelEngine`.

The parallel engines are imported only when a layout needs them (DeepSpeed and megatron-core are slow
imports). Device, backend and matmul precision come from :mod:`pretrain.devices`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pretrain.config import Config, is_parallel
from pretrain.devices import join_process_group, pick_device
from pretrain.engine import Engine
from pretrain.local_engine import LocalEngine
from pretrain.models import build_model
from pretrain.models.layers import LocalLayers


def build_engine(cfg: Config, parallel: bool | None = None) -> Engine:
    """The engine for ``cfg``. ``parallel``: force the process-mesh engines (True) or the local one (False);
    default: whatever the layout needs (:func:`pretrain.config.is_parallel`)."""
    device = pick_device(cfg)
    if not (is_parallel(cfg) if parallel is None else parallel):
        torch.manual_seed(cfg.train.seed)
        factory = LocalLayers(fused_loss=not cfg.train.compile)  # inductor fuses the plain loss itself
        return LocalEngine(cfg, build_model(cfg.family, cfg.model, factory), device)
    from pretrain.parallel.data import DataParallelEngine
    from pretrain.parallel.engine import DeepSpeedEngine, layer_factory
    from pretrain.parallel.expert import shard_experts
    from pretrain.parallel.mesh import Layout, Mesh
    from pretrain.parallel.pipeline import PipelineEngine
    from pretrain.parallel.validate import validate_layout

    join_process_group(device)
    p = cfg.parallel
    layout = Layout.from_world(dist.get_world_size(), tp=p.tp, pp=p.pp, ep=p.ep, cp=p.cp)
    validate_layout(cfg, layout.world_size)
    mesh = Mesh(layout)
    torch.manual_seed(cfg.train.seed)  # the same full draw on every rank; each keeps its shard
    fused_loss = p.zero < 3 and not cfg.train.compile  # ZeRO-3 gathers the head's weight inside its forward only
    factory = layer_factory(mesh, p.sp, fused_loss)
    if p.cp > 1:  # each sequence split over a context group: pretrain.parallel.context
        from pretrain.parallel.context import ContextParallel

        factory.cp = ContextParallel(mesh.group("cp"), p.cp_comm)
    model = build_model(cfg.family, cfg.model, factory).to(device)
    if p.ep > 1:  # expert gradients need their own reduction group: our data-parallel step, not DeepSpeed's
        shard_experts(model, mesh.group("ep"))
    engine = (PipelineEngine if p.pp > 1 else DataParallelEngine if p.ep > 1 else DeepSpeedEngine)(
        cfg, model, mesh, device)
    if p.cp > 1:
        from pretrain.parallel.context_engine import ContextParallelEngine

        return ContextParallelEngine(engine, factory.cp)
    return engine
