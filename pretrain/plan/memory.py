"""Peak memory of one rank, by component, for a config's layout (no process started, nothing allocated).

The rank is the pipeline stage that peaks (every stage is computed; data/tensor/expert ranks are symmetric).
``P`` is this stage's parameters on this rank (:meth:`pretrain.plan.shapes.Part.local`), ``d`` the
data-parallel size, ``L`` the largest module's parameters. Which engine trains the layout decides the model
states (the same rule as :func:`pretrain.engines.build_engine`):

* DeepSpeed (ZeRO 0-3, tensor/sequence parallel), ``train.precision=bf16`` (bf16 weights, fp32 masters):
  DeepSpeed's own accounting (``estimate_zero2/3_model_states_mem_needs``): bf16 weights 2, bf16 gradients 2,
  fp32 gradients 4, masters 4, moments 8 bytes per parameter; ZeRO-1 partitions the 16 fp32 bytes, ZeRO-2
  also the bf16 gradients, ZeRO-3 everything (its bf16 gradients live only for the gathered module) and adds
  the gathered largest module's bf16 weights and gradients, ``4L``. ``offload_optimizer`` moves gradients,
  masters and moments to the CPU, ``offload_params`` the weights too. In fp32 the figures
  ``benchmarks/memory_report.py`` measures: weights ``4P`` (``4P/d`` ZeRO-3), gradients ``4P`` (ZeRO-0/1)
  or ``4P/d``, masters ``4P/d`` (ZeRO-1/2), moments ``8P`` or ``8P/d``, ZeRO-3 gathers ``8L``. ZeRO 1-3
  allocate their gradient reduction bucket whole: ``reduce_bucket_size`` (5e8) elements of the gradient type
  (1 GB in bf16), whatever the model's size; ZeRO-0 all-reduces a flattened copy of the fp32 gradients
  (``allreduce_bucket``), ``4P`` when ``d > 1``.
* Our engines (plain DDP, pipelines, expert parallelism): fp32 weights and gradients ``4P`` each, moments
  ``8P`` (ZeRO-1: dense ``8P/d``, experts ``8P/(d/ep)``), the gradient all-reduce's flattened copy
  (``_all_reduce_grads``: ``4P`` of the dense gradients when ``d > 1``, of the expert ones when ``d/ep > 1``);
  bf16 autocast adds the cast weights (``2P``). Plain data parallelism is torch's DDP
  (``gradient_as_bucket_view``): its buckets, ``4P``, live for good; the gradients are views of them, except
  that the micro-batches accumulated under ``no_sync`` build their own gradient tensors until the last
  backward copies them in: with more than one micro-batch the gradients are held twice (bucket ``4P`` in
  buffers).

The flattened gradient copy exists only after the last micro-batch's backward, when every activation and
workspace buffer is already freed: it adds to the peak only by what it exceeds them by (``max``, not a sum).

Activations: :mod:`pretrain.plan.shapes` elements per sample x micro-batch x bytes per element (2 under bf16
autocast, 4 in fp32) x the micro-batches a pipeline stage keeps in flight: ``min(pp - stage, m)`` for 1F1B,
``min(2 (pp - 1 - stage) + (vpp - 1) pp + 1, m vpp)`` chunks of ``1/vpp`` of the stage for interleaved 1F1B
(Narayanan et al. 2021; for stage 0 this is Korthikanti et al.'s ``pp (1 + (pp - 1) / (pp vpp))``).
Checkpointed blocks keep only their input. Workspace: the larger of one block's backward (its recomputed
activations when checkpointed, plus ``backward_extra``) and, on the last stage, the LM loss (fused fp32 loss:
the ``[tokens, vocab]`` gradient, 4 bytes each; otherwise logits, log-probabilities and their gradient, 12
bytes; a pipeline's last stage outputs the logits and its schedule's loss is torch's plain cross-entropy, whose
backward also holds the log-probabilities' gradient and an autograd buffer: 20 bytes): the loss's buffers are
freed before the blocks' backward. Buffers: ZeRO buckets and gathers, the
all-reduce copies, autocast weight copies, the expert-parallel all-to-all send and receive buffers
(``2 cf tokens d``) and the pipeline schedule's receive buffers: ``torch.distributed.pipelining`` allocates
one per micro-batch for each local stage's incoming activations (all but the first stage) and incoming
gradients (all but the last) when the schedule starts, and keeps them (``m`` messages each; a message is a
micro-batch's hidden states, T5's encoder and decoder states together). The interleaved schedule
(``_PipelineScheduleRuntime``) also waits for its sends only at the end of the step, so the tensors it sent
stay alive: as many again, counted whole (an upper bound: at the peak part of them are not sent yet).
Overhead: a stated constant per rank (CUDA context, NCCL channels, allocator fragmentation).
"""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.config import Config, is_parallel
from pretrain.plan.shapes import Part, Shape, model_shape

OVERHEAD_BYTES = 2.0 * 2**30  # CUDA context ~0.5 GiB + NCCL buffers ~0.5 GiB + ~1 GiB allocator slack, per GPU
DEEPSPEED_REDUCE_BUCKET = 500_000_000  # elements: DeepSpeedZeroConfig.reduce_bucket_size, which we leave at its default
COMPONENTS = ("weights", "grads", "optimizer", "masters", "activations", "workspace", "buffers", "overhead")


@dataclass
class Memory:
    """Bytes on one rank's device at its peak, by component; ``cpu``: bytes offloaded to host memory."""

    weights: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    masters: float = 0.0
    activations: float = 0.0
    workspace: float = 0.0
    buffers: float = 0.0
    overhead: float = 0.0
    zero3_gather: float = 0.0  # part of buffers: ZeRO-3's gathered largest module
    cpu: float = 0.0
    stage: int = 0  # the pipeline rank this is

    @property
    def total(self) -> float:
        return sum(getattr(self, k) for k in COMPONENTS)

    @property
    def model_states(self) -> float:
        """Weights, gradients, optimizer states, masters and ZeRO-3 gathers: what DeepSpeed's estimators count."""
        return self.weights + self.grads + self.optimizer + self.masters + self.zero3_gather


def engine_kind(cfg: Config) -> str:
    """``local`` | ``pipeline`` | ``expert`` | ``deepspeed``: which engine trains ``cfg`` (as build_engine)."""
    p = cfg.parallel
    if not is_parallel(cfg):
        return "local"
    return "pipeline" if p.pp > 1 else "expert" if p.ep > 1 else "deepspeed"


def stage_parts(shape: Shape, pp: int, vpp: int, stage: int) -> list[tuple[int, Part]]:
    """(global block index, part) of pipeline rank ``stage``; the embeddings are index -1, the head -2."""
    from pretrain.parallel.stage import stage_bounds

    bounds = stage_bounds(len(shape.blocks), pp * vpp)
    parts = [(i, shape.blocks[i]) for chunk, (lo, hi) in enumerate(bounds) if chunk % pp == stage
             for i in range(lo, hi)]
    if stage == 0:
        parts.insert(0, (-1, shape.pre))
    if stage == pp - 1:
        parts.append((-2, shape.post))
        if pp > 1 and shape.tied_copy:
            parts.append((-2, Part(tp=shape.tied_copy)))
    return parts


def in_flight(pp: int, vpp: int, stage: int, micro_batches: int) -> float:
    """Micro-batches of this stage's activations alive at once (in units of the whole stage)."""
    if pp == 1:
        return 1.0
    if vpp == 1:
        return float(min(pp - stage, micro_batches))
    return min(2 * (pp - 1 - stage) + (vpp - 1) * pp + 1, micro_batches * vpp) / vpp


def _model_states(m: Memory, cfg: Config, dense: float, experts: float, largest: float, dp: int,
                  micro_batches: int) -> float:
    """Fill ``m``'s model states and persistent buffers; return the bytes of the flattened gradient copy the
    step's all-reduce makes after the backward passes."""
    p, bf16 = cfg.parallel, cfg.train.precision == "bf16"
    total = dense + experts
    if engine_kind(cfg) != "deepspeed":
        m.weights, m.grads = 4 * total, 4 * total
        m.optimizer = 8 * (dense / dp + experts / max(dp // p.ep, 1)) if p.zero else 8 * total
        m.buffers += 2 * total if bf16 else 0  # autocast's bf16 copies of the weights
        if engine_kind(cfg) == "local":  # DDP's buckets, beside the gradients accumulated under no_sync
            m.buffers += 4 * total if dp > 1 and micro_batches > 1 else 0
            return 0.0
        return 4 * (dense * (dp > 1) + experts * (dp // p.ep > 1))
    z, d = p.zero, dp if p.zero else 1
    if bf16:
        m.weights = 2 * total / (d if z == 3 else 1)
        # bf16 gradients (ZeRO-3: only the gathered module's, counted in 4L) and their fp32 partition
        m.grads = (0 if z == 3 else 2 * total / (d if z == 2 else 1)) + 4 * total / d
        m.masters, m.optimizer = 4 * total / d, 8 * total / d
        m.zero3_gather = 4 * largest if z == 3 else 0  # bf16 weights and gradients of the largest module
    else:
        m.weights = 4 * total / (d if z == 3 else 1)
        m.grads = 4 * total / (d if z >= 2 else 1)
        m.masters = 4 * total / d if z in (1, 2) else 0
        m.optimizer = 8 * total / d
        m.zero3_gather = 8 * largest if z == 3 else 0
    if p.offload_optimizer:
        m.cpu += m.grads + m.masters + m.optimizer
        m.grads, m.masters, m.optimizer = 0.0, 0.0, 0.0
    if p.offload_params:
        m.cpu += m.weights
        m.weights = 0.0
    m.buffers += m.zero3_gather
    if z:  # the gradient bucket ZeRO reduces through (contiguous_gradients), allocated whole whatever the model
        m.buffers += DEEPSPEED_REDUCE_BUCKET * (2 if bf16 else 4)
        return 0.0
    return 4 * total if dp > 1 and not p.offload_optimizer else 0.0  # ZeRO-0: a flat fp32 copy of the gradients


def _activations(cfg: Config, parts: list[tuple[int, Part]], tp: int, sp: bool) -> tuple[float, float]:
    """(saved elements per sample of the stage, elements a block's backward adds at most: its recomputed
    activations when checkpointed, and the gradient it holds beyond them)."""
    mode, every = cfg.model.activation_checkpointing, cfg.model.checkpoint_every
    saved, backward = 0.0, 0.0
    for index, part in parts:
        full = part.activations(tp, sp)
        extra = part.backward_extra / (1 if part.act_moe else tp)
        if index >= 0 and (mode == "full" or (mode == "every_n" and index % every == 0)):
            saved += part.checkpoint_input / (tp if sp else 1)
            backward = max(backward, full + extra)
        else:
            saved += full
            backward = max(backward, extra)
    return saved, backward


def micro_batch_count(cfg: Config, data_parallel: int) -> int:
    """Micro-batches per optimizer step on each rank: the global batch over the micro-batch and the data replicas
    (``data_parallel / cp``: the context ranks of a replica read the same samples)."""
    t = cfg.train
    return t.global_batch_size // (t.micro_batch_size * (data_parallel // cfg.parallel.cp))


def stage_memory(cfg: Config, world_size: int, stage: int, shape: Shape | None = None) -> Memory:
    """:class:`Memory` of pipeline rank ``stage`` of ``cfg``'s layout on ``world_size`` ranks (``shape``:
    default :func:`~pretrain.plan.shapes.model_shape` of ``cfg``)."""
    p, t = cfg.parallel, cfg.train
    shape = shape or model_shape(cfg)
    dp = world_size // (p.tp * p.pp)
    micro_batches = micro_batch_count(cfg, dp)
    parts = stage_parts(shape, p.pp, p.vpp, stage)
    m = Memory(stage=stage, overhead=OVERHEAD_BYTES)
    dense = sum(part.tp / p.tp + part.rep for _, part in parts)
    experts = sum(part.expert for _, part in parts) / p.ep
    largest = max(part.largest for _, part in parts) / p.tp
    reduce = _model_states(m, cfg, dense, experts, largest, dp, micro_batches)
    act_bytes = 2 if t.precision == "bf16" else 4
    saved, backward = _activations(cfg, parts, p.tp, p.sp)
    samples = t.micro_batch_size / p.cp
    m.activations = act_bytes * samples * saved * in_flight(p.pp, p.vpp, stage, micro_batches)
    loss = 0.0
    if stage == p.pp - 1:
        fused = t.precision == "fp32" and p.tp == 1 and not t.compile and p.zero < 3 and p.pp == 1
        per_logit = 4 if fused else 20 if p.pp > 1 else 12
        loss = per_logit * samples * shape.loss_tokens * shape.vocab / p.tp
    m.workspace = max(loss, act_bytes * samples * backward)  # the loss's buffers are gone before blocks' backward
    moe = cfg.model.moe
    if p.ep > 1 and any(part.expert for _, part in parts):
        tokens = samples * shape.loss_tokens
        m.buffers += 2 * act_bytes * moe.capacity_factor_train * tokens * shape.hidden
    if p.pp > 1:  # the schedule's receive buffers, one per micro-batch and local stage, kept all along
        message = act_bytes * samples * (shape.boundary_tokens or shape.loss_tokens) * shape.hidden
        chunks = [chunk * p.pp + stage for chunk in range(p.vpp)]
        ends = sum((g > 0) + (g < p.pp * p.vpp - 1) for g in chunks)  # activations in, gradients in
        held = 2 if p.vpp > 1 else 1  # the interleaved (runtime) schedule also keeps what it sent to the end
        m.buffers += held * ends * micro_batches * message / (p.tp if p.sp else 1)
    m.buffers += max(0.0, reduce - m.activations - m.workspace)  # after the backward passes: instead of them
    return m


def memory(cfg: Config, world_size: int, shape: Shape | None = None) -> Memory:
    """The peak rank's :class:`Memory` (the pipeline stage with the largest total; ``shape`` as
    :func:`stage_memory`'s)."""
    shape = shape or model_shape(cfg)
    return max((stage_memory(cfg, world_size, s, shape) for s in range(cfg.parallel.pp)), key=lambda m: m.total)
