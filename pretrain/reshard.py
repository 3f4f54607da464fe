"""Layout-independent checkpoints: a tensor index, consolidation to one full state, resharding to any layout.

What a checkpoint needs so that any layout can read it (on top of :mod:`pretrain.checkpoint`'s per-rank files):

* ``meta.json["sharding"]`` (:func:`sharding_meta`): the saving layout, and per tensor its global shape,
  dtype and how it is split: ``tp_dim``/``tp_stride`` (tensor parallel, megatron's ``partition_dim`` /
  ``partition_stride``), ``ep_dim`` (expert parallel, experts along dim 0), plus which tensors each rank
  wrote (pipeline stages own disjoint sets). A rank's coordinates follow from the layout
  (:meth:`pretrain.parallel.mesh.Layout.coords`), so a piece is identified by ``(tp_rank, ep_rank)``.
* ``state["portable"]`` (:func:`optimizer_moments`): Adam's ``exp_avg`` / ``exp_avg_sq`` per parameter, in the
  same shape as the rank's model tensor, plus the optimizer step. Under DeepSpeed ZeRO the moments are not
  copied: ``"zero_index"`` says where each parameter's piece lies in the rank's native flat partitions
  (``state["optimizer"]``, saved anyway), and :func:`consolidate` cuts them out. So a save needs no
  collective per parameter and stores each moment once. The engines' native optimizer states (flat ZeRO
  partitions, ``ZeroRedundancyOptimizer`` shards) load directly only under the same layout.

:func:`consolidate` assembles the full model (and moments) from every rank's files; :func:`reshard` cuts a
full state into one rank's pieces from the *target* engine's own index; :func:`load_into` does both into a
live engine (model, fp32 master weights and moments, whatever its ZeRO stage). The data position is
``consumed_samples`` (the sampler does not depend on the data-parallel size).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.parallel.mesh import Layout
from pretrain import checkpoint as ckpt
from pretrain.checkpoint import CheckpointError
from pretrain.engine import Engine

log = logging.getLogger(__name__)
MOMENTS = ("exp_avg", "exp_avg_sq")
Index = dict[str, dict]  # name -> {"shape", "dtype", "tp_dim", "tp_stride", "ep_dim"}


@dataclass
class Consolidated:
    """A checkpoint as one process sees it: full tensors under the single-process names."""

    model: dict[str, torch.Tensor]
    moments: dict[str, dict[str, torch.Tensor]] | None  # name -> {"exp_avg", "exp_avg_sq"}; None if not saved
    optimizer_step: float
    step: int
    consumed_samples: int
    meta: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------
# The index of a live engine

def _layout(engine) -> dict[str, int]:
    mesh = engine.mesh
    if mesh is not None:
        lay = mesh.layout
        return {"tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "ep": lay.ep}
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return {"tp": 1, "pp": 1, "dp": world, "ep": 1}  # LocalEngine: plain data parallelism


def _coords(layout: dict[str, int], rank: int) -> tuple[int, int]:
    """``(tp_rank, ep_rank)`` of a global rank, as :class:`pretrain.parallel.mesh.Mesh` assigns them."""
    _, dp_rank, tp_rank = Layout(**layout).coords(rank)
    return tp_rank, dp_rank % layout["ep"]


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _params(engine) -> dict[str, torch.nn.Parameter]:
    """Every name a parameter is reachable under (tied weights have several)."""
    return dict(engine.model.named_parameters(remove_duplicate=False))


def _state_tensors(engine) -> dict[str, torch.Tensor]:
    """Model state dict tensors by name without gathering ZeRO-3 partitions (only shapes are used)."""
    return dict(engine.model.state_dict(keep_vars=True))


def local_index(engine) -> Index:
    """This rank's tensors and how each is split (from megatron's / our parameter attributes)."""
    layout, params = _layout(engine), _params(engine)
    out: Index = {}
    for name, tensor in _state_tensors(engine).items():
        p = params.get(name)
        shape = list(getattr(p, "ds_shape", None) or tensor.shape)  # ZeRO-3 partitions the local tensor
        spec = {"dtype": str(tensor.dtype).removeprefix("torch."), "tp_dim": None, "tp_stride": 1, "ep_dim": None}
        if p is not None and getattr(p, "tensor_model_parallel", False) and layout["tp"] > 1:
            spec["tp_dim"], spec["tp_stride"] = int(p.partition_dim), int(getattr(p, "partition_stride", 1))
            shape[spec["tp_dim"]] *= layout["tp"]
        if p is not None and getattr(p, "expert_parallel", False) and layout["ep"] > 1:
            spec["ep_dim"] = 0
            shape[0] *= layout["ep"]
        out[name] = {"shape": shape, **spec}
    return out


def sharding_meta(engine) -> dict:
    """``meta.json["sharding"]``: layout, the union of every rank's index, and which tensors each rank wrote
    (``name_sets[rank_names[rank]]``).

    Collective over the default group when it is initialised (every rank must call it)."""
    index = local_index(engine)
    per_rank = [index]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, index)
    tensors: Index = {}
    for idx in per_rank:
        tensors.update(idx)
    name_sets = sorted({tuple(sorted(idx)) for idx in per_rank})  # data-parallel replicas share one set
    return {"layout": _layout(engine), "tensors": tensors, "name_sets": [list(n) for n in name_sets],
            "rank_names": [name_sets.index(tuple(sorted(idx))) for idx in per_rank]}


# --------------------------------------------------------------------------------------------------------
# Optimizer moments of a live engine, and back

def _deepspeed_zero(engine):
    """DeepSpeed's partitioned optimizer of ``engine`` (ZeRO-1/2/3, or its bf16 optimizer), or None.

    These keep fp32 master weights and Adam state in flat partitions and map each parameter onto them."""
    ds = engine.ds
    if ds is None:
        return None
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    return ds.optimizer if isinstance(ds.optimizer, ZeROOptimizer) else None


def _flat_partitions(zero) -> list[torch.Tensor]:
    """The fp32 flat partitions Adam steps on (ZeRO-1/2, bf16 optimizer, ZeRO-3 naming)."""
    for attr in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition", "fp32_partitioned_groups_flat"):
        if hasattr(zero, attr):
            return getattr(zero, attr)
    raise TypeError(f"unsupported DeepSpeed optimizer {type(zero).__name__}")


def _torch_optimizers(engine: Engine) -> list[torch.optim.Optimizer]:
    """The per-parameter torch optimizers (``ZeroRedundancyOptimizer`` -> its local shard's optimizer)."""
    return engine.local_optimizers()


def optimizer_moments(engine) -> dict:
    """``{"step": float, "moments": {name: {"exp_avg", "exp_avg_sq"}}}`` shaped like this rank's model tensors;
    local (no collective).

    Under DeepSpeed ZeRO-1/2/3 ``moments`` is empty and ``"zero_index"`` (:func:`_zero_index`) locates each
    parameter's piece in the native partitions saved with the rank's optimizer state. With
    ``ZeroRedundancyOptimizer`` each rank has its partition's tensors.
    """
    zero = _deepspeed_zero(engine)
    moments: dict[str, dict[str, torch.Tensor]] = {}
    step = 0.0
    if zero is not None:
        base_state = list(zero.optimizer.state.values())
        if not base_state or "step" not in base_state[0]:
            return {"step": 0.0, "moments": {}}
        return {"step": float(base_state[0]["step"]), "moments": {}, "zero_index": _zero_index(engine, zero)}
    names = {id(p): n for n, p in engine.model.named_parameters()}
    for opt in _torch_optimizers(engine):
        for group in opt.param_groups:
            for p in group["params"]:
                state = opt.state.get(p)
                if state:
                    step = float(state["step"])
                    moments[names[id(p)]] = {k: state[k].detach().cpu().clone() for k in MOMENTS}
    return {"step": step, "moments": moments}


def _zero_index(engine, zero) -> dict[str, dict]:
    """Where this rank's piece of each parameter lies in DeepSpeed's flat fp32 partitions: ``{name: {"group",
    "flat_start", "param_start", "numel", "shape"}}`` (``group``: the index of the flat partition; ``param_start``:
    where the piece starts in the flattened parameter; ``shape``: the rank's full, tensor-parallel-local shape).
    ZeRO-3 partitions every parameter on its own; ZeRO-1/2 and the bf16 optimizer cut one flat buffer per group
    (DeepSpeed's fragment map; a parameter may have no piece on this rank)."""
    out = {}
    for name, p in engine.model.named_parameters():
        if hasattr(p, "ds_id"):  # ZeRO-3: the rank's partition of the parameter, padded at the end
            group, flat_start = zero.grad_position[zero.get_param_id(p)][:2]
            size = p.partition_numel()
            param_start = zero._get_param_partition_rank(p) * size
            numel, shape = max(0, min(size, p.ds_numel - param_start)), list(p.ds_shape)
        else:
            fragment = getattr(p, "_hp_mapping", None)
            if fragment is None:
                continue
            group, flat_start = fragment.param_group_index, fragment.hp_fragment_address.start
            param_start, numel = fragment.lp_fragment_address.start, fragment.hp_fragment_address.numel
            shape = list(p.shape)
        if numel == 0:  # ZeRO-3: this rank's partition is all padding
            continue
        out[name] = {"group": int(group), "flat_start": int(flat_start), "param_start": int(param_start),
                     "numel": int(numel), "shape": shape}
    return out


def _zero_fragments(state: dict, index: dict[str, dict], where: Path):
    """``(name, moment, param_start, piece)`` for each parameter piece of a rank's saved ZeRO state."""
    if not index:
        return
    native = state.get("optimizer") or {}
    base = native.get("base_optimizer_state") or native.get("optimizer_state_dict")  # ZeRO-1/2 | ZeRO-3
    if base is None:
        raise CheckpointError(f"{where}: 'portable' indexes ZeRO partitions, but the optimizer state has none")
    ids = [i for group in base["param_groups"] for i in group["params"]]  # one flat partition per entry
    for name, spec in index.items():
        flat = base["state"][ids[spec["group"]]]
        for k in MOMENTS:
            yield name, k, spec["param_start"], flat[k].narrow(0, spec["flat_start"], spec["numel"]).clone()


def _join(pieces: dict[int, torch.Tensor], shape: list[int], what: str) -> torch.Tensor:
    """A parameter's flat pieces (by start offset, from the data-parallel ranks) as one tensor of ``shape``."""
    flat, end = [], 0
    for start in sorted(pieces):
        if start != end:
            raise CheckpointError(f"{what}: no rank file holds elements {end}..{start} of the ZeRO partitions")
        flat.append(pieces[start])
        end += pieces[start].numel()
    if end != math.prod(shape):
        raise CheckpointError(f"{what}: the ZeRO partitions hold {end} elements, the tensor has {math.prod(shape)}")
    return torch.cat(flat).view(shape)


def _set_torch_moments(engine, moments: dict[str, dict[str, torch.Tensor]], step: float) -> None:
    names = {id(p): n for n, p in engine.model.named_parameters()}
    for opt in _torch_optimizers(engine):
        for group in opt.param_groups:
            on_device = group.get("fused") or group.get("capturable")
            for p in group["params"]:
                m = moments[names[id(p)]]
                opt.state[p] = {"step": torch.tensor(step, dtype=torch.float32,
                                                     device=p.device if on_device else "cpu"),
                                **{k: m[k].to(p.device, p.dtype).clone() for k in MOMENTS}}


def _link_moments(zero) -> None:
    """(Re)build the per-parameter views into Adam's flat state that ``safe_get/set_full_optimizer_state`` read
    (ZeRO-1/2, bf16 optimizer; ZeRO-3 reads the flat state directly). DeepSpeed links them once after its
    first step, and on our fp32 ZeRO-1/2 runs finds no state then, so link now."""
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def _set_zero_state(engine, zero, model: dict[str, torch.Tensor], moments: dict | None, step: float) -> None:
    """fp32 master weights and moments of DeepSpeed's partitions, from this rank's (tensor-parallel) tensors."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if moments is not None:
        # ZeRO creates Adam's state over its flat fp32 partitions lazily at the first step; make it now
        for flat in _flat_partitions(zero):
            if MOMENTS[0] not in zero.optimizer.state.get(flat, {}):
                zero.optimizer.state[flat] = {k: torch.zeros_like(flat) for k in MOMENTS}
        _link_moments(zero)
    for name, p in engine.model.named_parameters():
        safe_set_full_fp32_param(p, model[name].to(p.device))
        if moments is not None:
            for k in MOMENTS:
                safe_set_full_optimizer_state(p, moments[name][k].to(p.device), k)
    if moments is not None:
        for state in zero.optimizer.state.values():
            ref = state[MOMENTS[0]]
            fused = any(g.get("fused") for g in zero.optimizer.param_groups)
            state["step"] = torch.tensor(step, dtype=torch.float32, device=ref.device if fused else "cpu")


# --------------------------------------------------------------------------------------------------------
# Consolidation: every rank's pieces -> full tensors

def _merge_tp(parts: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """Inverse of :func:`pretrain.parallel.tensor.shard` over all ranks' slices (rank order)."""
    per_rank = [p.chunk(stride, dim) for p in parts]
    return torch.cat([torch.cat([r[s] for r in per_rank], dim) for s in range(stride)], dim)


def _assemble(name: str, spec: dict, pieces: dict[tuple[int, int], torch.Tensor], layout: dict, where: Path
              ) -> torch.Tensor:
    """Full tensor from ``{(tp_rank, ep_rank): piece}``; checks coverage and shapes against the index."""
    tp = layout["tp"] if spec["tp_dim"] is not None else 1
    ep = layout["ep"] if spec["ep_dim"] is not None else 1
    missing = [(t, e) for t in range(tp) for e in range(ep) if (t, e) not in pieces]
    if missing:
        raise CheckpointError(f"{where}: no rank file holds {name} (tensor rank, expert rank) {missing}")
    slices = [_merge_tp([pieces[t, e] for t in range(tp)], spec["tp_dim"], spec["tp_stride"]) if tp > 1
              else pieces[0, e] for e in range(ep)]
    full = torch.cat(slices, spec["ep_dim"]) if ep > 1 else slices[0]
    if list(full.shape) != list(spec["shape"]):
        raise CheckpointError(f"{where}: {name} assembles to shape {list(full.shape)}, "
                              f"but meta.json says {spec['shape']}")
    return full


def read_meta(path: str | Path) -> tuple[Path, dict]:
    """``(step dir, meta)`` of a checkpoint root or step directory."""
    step_dir = ckpt.resolve(path, str(path))
    try:
        return step_dir, json.loads((step_dir / ckpt.META).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{step_dir / ckpt.META} is not valid JSON: {e}") from None


def _split_axes(meta: dict) -> list[str]:
    """The config keys over which the saving run split the model (empty for one process or pure DP)."""
    par = (meta.get("config") or {}).get("parallel") or {}
    split = [f"parallel.{k}={par[k]}" for k in ("tp", "pp", "ep") if par.get(k, 1) != 1]
    if par.get("zero", 0) >= 3:
        split.append(f"parallel.zero={par['zero']}")
    return split


def consolidate(path: str | Path, optimizer: bool = True) -> Consolidated:
    """Full model (and, with ``optimizer``, Adam moments) of a checkpoint saved under any layout."""
    step_dir, meta = read_meta(path)
    meta_file = step_dir / ckpt.META
    sharding = meta.get("sharding")
    if sharding is None:
        split = _split_axes(meta)
        if meta.get("world_size", 1) != 1 and split:
            raise CheckpointError(f"{meta_file} has no 'sharding' index: a {meta.get('world_size')}-rank "
                                  f"checkpoint split over {', '.join(split)} saved without it can only be "
                                  f"resumed under its own layout")
        model = ckpt.read_model_file(step_dir / ckpt.model_file(0), meta)  # one process, or replicas (pure DP)
        return Consolidated(model, None, 0.0, meta["step"], meta.get("consumed_samples", 0), meta)
    layout, tensors = sharding["layout"], sharding["tensors"]
    ranks = [sharding["name_sets"][i] for i in sharding["rank_names"]]
    if len(ranks) != meta.get("world_size", len(ranks)):
        raise CheckpointError(f"{meta_file}: 'sharding' lists {len(ranks)} ranks, world_size is {meta['world_size']}")
    model_pieces: dict[str, dict] = {n: {} for n in tensors}
    moment_pieces: dict[str, dict] = {}
    zero_pieces: dict[tuple, dict] = {}  # (name, moment, piece) -> {param_start: flat piece}
    shapes: dict[str, list[int]] = {}
    optimizer_step = 0.0
    progress = _Progress(len(ranks))
    for rank, names in enumerate(ranks):
        file = step_dir / ckpt.model_file(rank)
        coords = _coords(layout, rank)
        local = ckpt.read_model_file(file, meta,
                                     lambda n: n in tensors and _piece(tensors[n], coords) not in model_pieces[n])
        if set(local) != set(names):
            diff = sorted(set(local) ^ set(names))[:5]
            raise CheckpointError(f"{file} holds different tensors than {meta_file} lists for rank {rank}: {diff}")
        for name, t in local.items():
            if t is not None:  # None: a replica of a piece already read
                model_pieces[name][_piece(tensors[name], coords)] = t
        if optimizer:
            state_path = step_dir / ckpt.state_file(rank)
            state = ckpt.read_state_file(state_path, meta)
            portable = state.get("portable")
            if portable is None:
                raise CheckpointError(f"{state_path} has no portable optimizer state; consolidate the model only")
            optimizer_step = max(optimizer_step, portable["step"])
            for name, k, start, piece in _zero_fragments(state, portable.get("zero_index"), state_path):
                zero_pieces.setdefault((name, k, _piece(tensors[name], coords)), {})[start] = piece
                shapes[name] = portable["zero_index"][name]["shape"]
            for name, m in portable["moments"].items():
                for k in MOMENTS:
                    moment_pieces.setdefault((name, k), {}).setdefault(_piece(tensors[name], coords), m[k])
        progress.update(rank + 1)
    model = {n: _assemble(n, tensors[n], p, layout, step_dir / "model_rank*.safetensors")
             for n, p in model_pieces.items()}
    for (name, k, piece), pieces in zero_pieces.items():
        moment_pieces.setdefault((name, k), {})[piece] = _join(pieces, shapes[name], f"{step_dir}: {name} ({k})")
    moments = None
    if optimizer:
        moments = {}
        for (name, k), p in moment_pieces.items():
            moments.setdefault(name, {})[k] = _assemble(f"{name} ({k})", tensors[name], p, layout,
                                                        step_dir / "state_rank*.pt")
    return Consolidated(model, moments, optimizer_step, meta["step"], meta.get("consumed_samples", 0), meta)


class _Progress:
    """A log line every few seconds with the rate and ETA of reading rank files."""

    def __init__(self, total: int, every: float = 5.0):
        self.total, self.every, self.start = total, every, time.monotonic()
        self.last = self.start

    def update(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last < self.every and done < self.total:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        log.info("consolidate: %d/%d rank files (%.1f/s, ETA %.0f s)", done, self.total, rate,
                 (self.total - done) / rate)


def _piece(spec: dict, coords: tuple[int, int]) -> tuple[int, int]:
    """Which piece a rank holds: its tensor/expert coordinate along split dims, 0 along replicated ones."""
    tp_rank, ep_rank = coords
    return (tp_rank if spec["tp_dim"] is not None else 0, ep_rank if spec["ep_dim"] is not None else 0)


# --------------------------------------------------------------------------------------------------------
# Resharding: full tensors -> one rank's pieces

def reshard(full: dict[str, torch.Tensor], index: Index, layout: dict[str, int], rank: int,
            aliases: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """This rank's tensors under ``layout`` from full ones; ``index`` is the target rank's
    :func:`local_index` (which tensors it holds and how they are split). ``aliases`` maps a tied name to the
    name it shares storage with (a checkpoint of a tensor-parallel run stores a tied head once)."""
    from pretrain.parallel.tensor import shard  # the cut the tensor-parallel layers make

    tp_rank, ep_rank = _coords(layout, rank)
    out = {}
    for name, spec in index.items():
        source = name if name in full else (aliases or {}).get(name)
        if source not in full:
            raise CheckpointError(f"the checkpoint has no tensor {name} that this model needs")
        t = full[source]
        if list(t.shape) != list(spec["shape"]):
            raise CheckpointError(f"{name}: checkpoint shape {list(t.shape)}, this model {spec['shape']}")
        if spec["ep_dim"] is not None:
            t = shard(t, spec["ep_dim"], ep_rank, layout["ep"])
        if spec["tp_dim"] is not None:
            t = shard(t, spec["tp_dim"], tp_rank, layout["tp"], spec["tp_stride"])
        out[name] = t.contiguous()
    return out


def _aliases(engine) -> dict[str, str]:
    first: dict[int, str] = {}
    out = {}
    for name, p in engine.model.named_parameters(remove_duplicate=False):
        out[name] = first.setdefault(id(p), name)
    return out


def same_layout(meta: dict, engine) -> bool:
    """Whether the checkpoint of ``meta`` was saved under ``engine``'s layout and ZeRO stage, i.e. whether each
    rank can load its own files (the engines' native optimizer states differ across both)."""
    saved = (meta.get("sharding") or {}).get("layout")
    if saved is None:  # saved without an index: only its own layout can read it
        return True
    return saved == _layout(engine) and _stages(meta.get("config") or {}) == _stages(engine.cfg.to_dict())


def _stages(config: dict) -> dict:
    """The layout choices beyond the mesh sizes that change what each rank stores."""
    parallel = config.get("parallel") or {}
    return {"zero": parallel.get("zero", 0), "vpp": parallel.get("vpp", 1)}


def _check_all_used(state: Consolidated, used: set[str]) -> None:
    """Refuse a checkpoint with tensors that no rank of this model takes (weights would be dropped silently).
    Collective: pipeline stages each take their own part."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        per_rank: list = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, sorted(used))
        used = set().union(*per_rank)
    unused = sorted(set(state.model) - used)
    if unused:
        raise CheckpointError(f"step {state.step}: the checkpoint has tensors this model does not: {unused[:5]}")


def load_into(engine, state: Consolidated, optimizer: bool = True) -> None:
    """Load a consolidated checkpoint into a live engine of any layout: model, and (with ``optimizer``) the
    Adam moments and step, fp32 ZeRO master weights included. Every rank calls it."""
    layout, rank = _layout(engine), _rank()
    index, aliases = local_index(engine), _aliases(engine)
    model = reshard(state.model, index, layout, rank, aliases)
    _check_all_used(state, {aliases.get(n, n) for n in index} | set(index))
    ds = engine.ds
    if ds is not None:
        from pretrain.parallel.zero import load_model_state

        load_model_state(ds, model)
    else:
        engine.model.load_state_dict(model)
    moments = None
    if optimizer:
        if state.moments is None:
            raise CheckpointError(f"step {state.step}: the checkpoint holds no portable optimizer state")
        params = [n for n, _ in engine.model.named_parameters()]
        full = {k: {aliases.get(n, n): state.moments[aliases.get(n, n)][k] for n in params} for k in MOMENTS}
        local = {k: reshard(full[k], {n: index[n] for n in params}, layout, rank) for k in MOMENTS}
        moments = {n: {k: local[k][n] for k in MOMENTS} for n in params}
    zero = _deepspeed_zero(engine)
    if zero is not None:
        _set_zero_state(engine, zero, model, moments, state.optimizer_step)
    elif moments is not None:
        _set_torch_moments(engine, moments, state.optimizer_step)
