"""Step time, tokens/s per GPU and MFU of a layout, from a stated model (absolute times are approximate; the
model is built so that the *ranking* of layouts is right).

* Compute: the model's training FLOPs per step (:attr:`ModelSpec.batch_flops`, the PaLM/Megatron count MFU
  uses) times ``1 + c/3`` for a share ``c`` of blocks recomputed under activation checkpointing, divided over
  the ranks at ``achieved x peak`` (bf16 peak; fp32 runs TF32 matmuls at half of it).
* Pipeline bubble: ``compute x (pp - 1) / (m vpp)`` (Narayanan et al. 2021) for ``m`` micro-batches.
* Communication, alpha-beta per collective on a ring of ``n`` ranks (Thakur et al. 2005; NCCL's ring):
  all-reduce ``2 (n-1)/n S / B + 2 (n-1) a``, all-gather / reduce-scatter / all-to-all ``(n-1)/n S / B +
  (n-1) a``. ``B, a`` are the NVLink figures when the group fits in one node (ranks are numbered tensor
  fastest, then data, then pipeline: :meth:`pretrain.parallel.mesh.Layout.rank_of`), else the network's.
* Tensor parallel: 4 all-reduces (with sp: all-gathers + reduce-scatters of the same volume) of a micro-batch's
  hidden states per block, 2 more per recomputed block; never overlapped.
* Data parallel, with the overlap each engine has: DDP (local engine) all-reduces during the last
  micro-batch's backward (exposed: what does not fit in it); DeepSpeed ZeRO-0/1/2 reduce without overlap
  (``overlap_comm`` is off by default) and all-gather updated partitions; ZeRO-3 gathers weights twice and
  reduce-scatters gradients every micro-batch, overlapped with compute (prefetching, ``overlap_comm`` on);
  our pipeline/expert engine reduces after the last backward (exposed).
* Expert parallel: 4 all-to-alls of the ``cf x tokens x d`` dispatch buffer per Switch layer per micro-batch.
* Pipeline point-to-point: one activation and one gradient per micro-batch and virtual stage.
* Offload: gradients down and weights up over PCIe (25 GB/s) plus a CPU Adam at 1e9 parameters/s per rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pretrain.config import Config
from pretrain.models.registry import family_spec
from pretrain.plan.hardware import GB, Device
from pretrain.plan.memory import engine_kind, micro_batch_count, stage_parts
from pretrain.plan.shapes import Shape

PCIE_GBS = 25.0  # host <-> GPU per direction (PCIe Gen5 x16 delivers ~25 of its 32 GB/s in practice)
CPU_ADAM_PARAMS_PER_S = 1e9  # DeepSpeed's CPU Adam, per rank (an assumption; it depends on the host's cores)
TIME_PARTS = ("compute", "bubble", "tp_comm", "dp_comm", "ep_comm", "pp_comm", "offload")


@dataclass
class Timing:
    """Seconds per optimizer step by part, and the throughput they give."""

    compute: float = 0.0
    bubble: float = 0.0
    tp_comm: float = 0.0
    dp_comm: float = 0.0
    ep_comm: float = 0.0
    pp_comm: float = 0.0
    offload: float = 0.0
    tokens_per_gpu: float = 0.0  # tokens per second per GPU
    mfu: float = 0.0  # model FLOPs / (step time x GPUs x bf16 peak)

    @property
    def step(self) -> float:
        return sum(getattr(self, k) for k in TIME_PARTS)


class Links:
    """Bandwidth and latency of a group spanning ``span`` consecutive ranks on nodes of ``per_node`` GPUs."""

    def __init__(self, device: Device, per_node: int):
        self.device, self.per_node = device, per_node

    def _link(self, span: int) -> tuple[float, float]:
        d = self.device
        if span <= self.per_node:
            return d.nvlink_gbs * GB, d.nvlink_latency_us * 1e-6
        return d.network_gbs * GB, d.network_latency_us * 1e-6

    def all_reduce(self, n: int, size: float, span: int) -> float:
        return 2 * self.gather(n, size, span)

    def gather(self, n: int, size: float, span: int) -> float:
        """All-gather, reduce-scatter or all-to-all of ``size`` bytes (the full buffer) over ``n`` ranks."""
        if n <= 1:
            return 0.0
        bandwidth, latency = self._link(span)
        return (n - 1) / n * size / bandwidth + (n - 1) * latency


def step_flops(cfg: Config) -> float:
    """Model training FLOPs of one optimizer step (the global batch), from the family's own count."""
    spec, d = family_spec(cfg.family), cfg.data
    batch = {"input_ids": torch.empty(1, d.seq_length, device="meta")}
    if spec.dataset == "t5":
        batch["decoder_input_ids"] = torch.empty(1, d.decoder_seq_length, device="meta")
    return spec.batch_flops(cfg.model, batch) * cfg.train.global_batch_size


def _recomputed_share(cfg: Config, blocks: int) -> float:
    mode = cfg.model.activation_checkpointing
    if mode == "none":
        return 0.0
    if mode == "full":
        return 1.0
    return len(range(0, blocks, cfg.model.checkpoint_every)) / blocks


def timing(cfg: Config, world_size: int, per_node: int, device: Device, shape: Shape, local_params: float,
           efficiency: float | None = None) -> Timing:
    """:class:`Timing` of ``cfg``'s layout; ``local_params``: parameters on the peak rank (for gradients)."""
    p, t = cfg.parallel, cfg.train
    dp = world_size // (p.tp * p.pp)
    m = micro_batch_count(cfg, dp)
    links, out = Links(device, per_node), Timing()
    peak = device.bf16_tflops * 1e12
    rate = peak * (efficiency or device.achieved) / (1 if t.precision == "bf16" else 2)
    flops = step_flops(cfg)
    recomputed = _recomputed_share(cfg, len(shape.blocks))
    out.compute = flops * (1 + recomputed / 3) / world_size / rate
    out.bubble = out.compute * (p.pp - 1) / (m * p.vpp)
    act = 2 if t.precision == "bf16" else 4
    hidden_bytes = act * t.micro_batch_size / p.cp * shape.loss_tokens * shape.hidden
    blocks = len(shape.blocks) / p.pp
    out.tp_comm = m * blocks * (4 + 2 * recomputed) * links.all_reduce(p.tp, hidden_bytes, p.tp)
    kind = engine_kind(cfg)
    grad_bytes = local_params * (2 if kind == "deepspeed" and t.precision == "bf16" else 4)
    dp_span = p.tp * dp
    if kind == "deepspeed" and p.zero == 3:
        per_micro = 3 * links.gather(dp, grad_bytes, dp_span)
        out.dp_comm = max(0.0, m * per_micro - out.compute)
    else:
        reduce = links.all_reduce(dp, grad_bytes, dp_span)
        last_backward = out.compute / m * 2 / 3
        out.dp_comm = max(0.0, reduce - last_backward) if kind == "local" else reduce
    moe_layers = sum(1 for b in shape.blocks if b.expert) / p.pp
    if p.ep > 1 and moe_layers:
        dispatch = cfg.model.moe.capacity_factor_train * hidden_bytes
        out.ep_comm = m * moe_layers * 4 * links.gather(p.ep, dispatch, p.tp * p.ep)
    if p.pp > 1:
        bandwidth_span = p.tp * dp * 2  # neighbouring stages are tp x dp ranks apart
        send = hidden_bytes / (p.tp if p.sp else 1)
        out.pp_comm = 2 * m * p.vpp * links.gather(2, 2 * send, bandwidth_span)
    if p.offload_optimizer:
        shard = local_params / (dp if p.zero else 1)
        out.offload = shard * 6 / (PCIE_GBS * GB) + shard / CPU_ADAM_PARAMS_PER_S
    tokens = t.global_batch_size * (cfg.data.seq_length + (cfg.data.decoder_seq_length
                                                           if family_spec(cfg.family).dataset == "t5" else 0))
    out.tokens_per_gpu = tokens / out.step / world_size
    out.mfu = flops / (out.step * world_size * peak)
    return out


def local_params(cfg: Config, shape: Shape, stage: int) -> float:
    """Parameters pipeline rank ``stage`` holds under ``cfg``'s tensor and expert sizes."""
    p = cfg.parallel
    return sum(part.local(p.tp, p.ep) for _, part in stage_parts(shape, p.pp, p.vpp, stage))
