"""The arithmetic of one optimizer step, written once for every engine.

The loss every layout optimises is the same number: the LM loss summed over the global batch's loss-masked
tokens divided by the global token count (a true per-token mean, however tokens fall on ranks and
micro-batches), plus each micro-batch's auxiliary losses (Switch load balancing, z-loss) divided by the global
number of micro-batches. So each micro-batch backpropagates :func:`objective`, and gradients are *summed* over
the data-parallel ranks.

Everything stays on the device until :func:`finish`, which reads the step's numbers (losses, grad norm, token
count, the stop vote) in one ``tolist``: the step's single device -> host sync. Token counts come from the CPU
batches and travel to the device without a read.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from pretrain.engine import EvalResult, StepResult


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``t`` in place over ``group`` (default: the world) when it has more than one rank; no host sync."""
    if distributed() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t


def move(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def local_tokens(micro_batches: list[dict], device: torch.device) -> torch.Tensor:
    """Loss-masked tokens of this rank's micro-batches: a float64 scalar on ``device``, counted on the CPU."""
    return torch.stack([mb["loss_mask"].sum() for mb in micro_batches]).sum().double().to(device, non_blocking=True)


def global_tokens(micro_batches: list[dict], device: torch.device, group=None) -> torch.Tensor:
    """Loss-masked tokens of this step over the data-parallel ``group`` (default: the world)."""
    return all_reduce(local_tokens(micro_batches, device), group)


def stop_vote(stop: bool, device: torch.device) -> torch.Tensor:
    """How many ranks asked to stop, summed over the world (a device scalar; read with the step's numbers)."""
    return all_reduce(torch.tensor(float(stop), dtype=torch.float64).to(device, non_blocking=True))


def aux_loss(out) -> torch.Tensor:
    """The micro-batch's weighted auxiliary losses: ``loss`` minus its LM part (zero without Switch layers)."""
    if "aux_loss" not in out.metrics:
        return torch.zeros((), device=out.loss.device)
    return out.loss - out.lm_loss_sum / out.num_tokens.clamp(min=1)


def objective(out, tokens: torch.Tensor, n_micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(what to backpropagate, [LM loss sum, aux loss] float64)`` of one micro-batch's model output.

    ``tokens``: :func:`global_tokens`; ``n_micro``: micro-batches of the step over all data-parallel ranks."""
    aux = aux_loss(out)
    scaled = out.lm_loss_sum / tokens.clamp(min=1.0).to(out.lm_loss_sum.dtype) + aux / n_micro
    return scaled, torch.stack([out.lm_loss_sum.detach(), aux.detach()]).double()


def finish(sums: torch.Tensor, grad_norm: torch.Tensor, tokens: torch.Tensor, n_micro: int,
           stop: torch.Tensor) -> StepResult:
    """The step's numbers from ``sums`` (``[LM loss sum, aux loss sum]`` over the global batch), all read in one
    host sync. Non-finite loss or norm -> ``skipped`` (the same decision on every rank: all inputs are reduced)."""
    parts = [sums.double(), grad_norm.reshape(1).double(), tokens.reshape(1).double(), stop.reshape(1).double()]
    v = dict(zip(("lm_sum", "aux", "norm", "tokens", "stop"), torch.cat([p.to(sums.device) for p in parts]).tolist()))
    lm_loss = v["lm_sum"] / max(v["tokens"], 1.0)
    loss = lm_loss + v["aux"] / n_micro
    skipped = not (math.isfinite(loss) and math.isfinite(v["norm"]))
    return StepResult(loss=loss, lm_loss=lm_loss, grad_norm=v["norm"], num_tokens=v["tokens"], skipped=skipped,
                      stop=v["stop"] > 0)


def eval_row(out) -> torch.Tensor:
    """``[LM loss sum, tokens]`` of one micro-batch's output, float64 on its device."""
    return torch.stack([out.lm_loss_sum.detach().double(), out.num_tokens.detach().double()])


def eval_result(sums: torch.Tensor, group=None) -> EvalResult:
    """Sum the ``[LM loss sum, tokens]`` rows over ``group`` and read them (one host sync)."""
    lm_sum, tokens = all_reduce(sums, group).tolist()
    return EvalResult(lm_loss_sum=lm_sum, num_tokens=tokens)
