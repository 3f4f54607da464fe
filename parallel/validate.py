"""Check a parallel layout against the model and the world size before any process starts.

``validate(cfg)`` needs no world size; ``validate_layout(cfg, world_size)`` adds the checks that need it. Both
are part of the pre-flight step (:mod:`pretrain.preflight`), which ``pretrain train`` runs with its own world
size and the launchers with ``--nproc`` / ``nodes x gpus`` before starting processes; the parallel engine
checks again when it builds. Every error names the config key and says what would work instead.
"""

from __future__ import annotations

from pretrain.config import Config
from pretrain.configlib import ConfigError, need
from pretrain.models.registry import family_spec


def validate(cfg: Config) -> None:
    """World-size independent checks of ``cfg.parallel`` against ``cfg.model`` and ``cfg.data``."""
    p, spec = cfg.parallel, family_spec(cfg.family)
    if p.tp > 1:
        for key, size in spec.tp_sizes(cfg.model).items():
            need(size % p.tp == 0, f"parallel.tp={p.tp} does not divide {key}={size}: tensor parallelism splits "
                                   f"it across ranks; pick tp among the common divisors, or change {key}")
    need(not p.sp or p.tp > 1, "parallel.sp=true needs parallel.tp > 1 (sequence parallelism shards the "
                               "sequence over the tensor-parallel ranks)")
    if p.sp:
        for key in spec.sequence_keys:
            n = getattr(cfg.data, key.split(".")[1])
            need(n % p.tp == 0, f"parallel.sp with tp={p.tp} needs {key} ({n}) divisible by tp")
    need(p.vpp == 1 or p.pp > 1, f"parallel.vpp={p.vpp} (virtual stages) needs parallel.pp > 1")
    if p.cp > 1:
        from pretrain.parallel.context import validate_context_parallel  # the checks live with the feature

        validate_context_parallel(cfg)
    if p.pp > 1:
        layers = spec.pipeline_blocks(cfg.model)
        need(layers >= p.pp * p.vpp, f"parallel.pp={p.pp} x vpp={p.vpp} stages need at least that many layers; "
                                     f"the model has {layers}")
    moe = cfg.model.moe
    if p.ep > 1:
        need(moe.enabled, f"parallel.ep={p.ep} needs a Switch model (model.moe.num_experts > 0)")
        need(moe.num_experts % p.ep == 0, f"parallel.ep={p.ep} must divide model.moe.num_experts="
                                          f"{moe.num_experts}")
    # DeepSpeed's refusals, explained.
    need(not (p.zero >= 2 and p.pp > 1),
         f"parallel.zero={p.zero} with parallel.pp={p.pp}: ZeRO-2/3 partition gradients (and parameters) across "
         f"data-parallel ranks, which clashes with pipeline micro-batching (DeepSpeed refuses it). Nearest "
         f"supported: parallel.zero=1 with pp={p.pp}, or parallel.pp=1 with zero={p.zero}")
    need(not (p.zero == 3 and moe.enabled and p.ep > 1),
         f"parallel.zero=3 with expert parallelism (parallel.ep={p.ep}): ZeRO-3 would partition expert weights "
         f"that already live on one expert-parallel rank (DeepSpeed-MoE refuses it too). Nearest supported: "
         f"parallel.zero=1 with ep={p.ep}, or parallel.ep=1 with zero=3")
    need(not p.offload_optimizer or p.zero >= 1, "parallel.offload_optimizer needs parallel.zero >= 1 (only a "
                                                 "partitioned optimizer state can live on the CPU)")
    need(not p.offload_params or p.zero == 3, "parallel.offload_params needs parallel.zero=3 (only ZeRO-3 "
                                              "partitions the parameters themselves)")
    # What this version of the engines implements.
    if p.ep > 1:
        need(p.zero <= 1, f"parallel.ep={p.ep} with parallel.zero={p.zero}: the expert-parallel engine shards "
                          f"optimizer state (ZeRO-1) but not gradients or parameters; use parallel.zero=1 with "
                          f"ep={p.ep}, or ep=1 with zero={p.zero}")
    if cfg.train.eval_tasks:
        # data-parallel replicas score different requests, so no collective may span replicas
        pipeline_ok = p.pp == 1 or (spec.pipeline_eval and p.vpp == 1)
        need(pipeline_ok and p.ep == 1 and p.zero < 3,
             f"train.eval_tasks scores the live model, which needs parallel.ep=1, zero<3 and, with pp>1, a "
             f"family evaluation can split over stages (GPT) without interleaving (got family={cfg.family}, "
             f"pp={p.pp}, vpp={p.vpp}, ep={p.ep}, zero={p.zero}); "
             "drop train.eval_tasks and run `pretrain eval --checkpoint` on the saved checkpoints instead")


def validate_layout(cfg: Config, world_size: int) -> None:
    """:func:`validate` plus the checks that need the number of processes."""
    validate(cfg)
    p, t = cfg.parallel, cfg.train
    model_parallel = p.tp * p.pp
    if world_size % model_parallel:
        raise ConfigError(f"{world_size} processes are not divisible by parallel.tp x parallel.pp = {p.tp} x "
                          f"{p.pp}: start a multiple of {model_parallel} processes (e.g. `pretrain launch local "
                          f"--nproc {model_parallel} -- train ...`) or lower parallel.tp/pp")
    dp = world_size // model_parallel
    if dp % p.ep:
        raise ConfigError(f"parallel.ep={p.ep} must divide the data-parallel size {dp} (= {world_size} "
                          f"processes / tp {p.tp} / pp {p.pp}): experts are sharded inside the data dimension")
    if dp % p.cp:
        raise ConfigError(f"parallel.cp={p.cp} must divide the data-parallel size {dp} (= {world_size} processes / "
                          f"tp {p.tp} / pp {p.pp}): start a multiple of {model_parallel * p.cp} processes")
    dp //= p.cp  # data replicas: the context-parallel ranks of one replica read the same samples
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} must be a multiple of "
                          f"train.micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp}")
    micro_batches = t.global_batch_size // (t.micro_batch_size * dp)
    if p.pp > 1 and micro_batches < p.pp:
        raise ConfigError(f"parallel.pp={p.pp} needs at least {p.pp} micro-batches per step, but "
                          f"train.global_batch_size / (micro_batch_size x dp) = {micro_batches}: raise "
                          f"train.global_batch_size or lower train.micro_batch_size")
    if cfg.schedule.rampup_start is not None:
        for key in ("rampup_start", "rampup_increment"):
            n = getattr(cfg.schedule, key)
            if n % (t.micro_batch_size * dp):
                raise ConfigError(f"schedule.{key}={n} must be a multiple of train.micro_batch_size x "
                                  f"data-parallel size = {t.micro_batch_size} x {dp}")
