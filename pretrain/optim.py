"""Optimizers: AdamW (torch's fused/foreach kernels), LAMB (You et al. 2019), decay groups, clipping."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from pretrain.config import OptimizerConfig


class LAMB(torch.optim.Optimizer):
    """Layer-wise Adaptive Moments (You et al., "Large Batch Optimization for Deep Learning", Alg. 2).

    Per parameter tensor: Adam moments with bias correction, ``u = m_hat / (sqrt(v_hat) + eps) + wd * w``,
    then ``w -= lr * trust * u`` with ``trust = ||w|| / ||u||`` (1 when either norm is 0).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0):
        if lr < 0 or eps < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid LAMB hyperparameters lr={lr} betas={betas} eps={eps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            params, updates = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)  # on the CPU: reading it is no sync
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                step = state["step"].item()
                m, v = state["exp_avg"], state["exp_avg_sq"]
                g = p.grad.float() if p.grad.dtype != m.dtype else p.grad
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                update = (m / (1 - beta1 ** step)) / ((v / (1 - beta2 ** step)).sqrt_().add_(group["eps"]))
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                params.append(p)
                updates.append(update)
            if not params:
                continue
            # trust ratios stay on the device: no host sync per parameter
            w_norms = torch._foreach_norm([p.float() if p.dtype != u.dtype else p for p, u in zip(params, updates)])
            u_norms = torch._foreach_norm(updates)
            for p, update, w, u in zip(params, updates, w_norms, u_norms):
                trust = torch.where((w > 0) & (u > 0), w / u, torch.ones_like(w))
                p.add_((update * trust).to(p.dtype), alpha=-group["lr"])
        return loss


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d)) or "norm" in type(module).__name__.lower()


def _is_embedding(module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding) or "embedding" in type(module).__name__.lower()


def param_groups(model: nn.Module, weight_decay: float, no_decay: Iterable[str]) -> list[dict]:
    """Two groups: with and without weight decay. ``no_decay`` names categories: norm, bias, embedding.

    Parameters shared between modules (tied embeddings) are listed once.
    """
    no_decay = set(no_decay)
    decay, plain, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            skip = (("bias" in no_decay and name == "bias")
                    or ("norm" in no_decay and _is_norm(module))
                    or ("embedding" in no_decay and _is_embedding(module)))
            (plain if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW (fused kernel when every parameter is on one supported device, else foreach) or LAMB."""
    groups = param_groups(model, cfg.weight_decay, cfg.no_decay)
    lr = cfg.lr if lr is None else lr
    if cfg.name == "lamb":
        return LAMB(groups, lr=lr, betas=cfg.betas, eps=cfg.eps)
    if cfg.name != "adamw":
        raise ValueError(f"optimizer.name must be 'adamw' or 'lamb', got {cfg.name!r}")
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = len(devices) == 1 and devices <= {"cuda", "cpu"}
    kwargs = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, **kwargs)


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Global L2 norm of all gradients (fp32 tensor on the gradients' device), clipped to ``max_norm`` when > 0.

    Never synchronises with the host: a non-finite norm leaves the gradients as they are (scale 1), and the
    caller decides to skip the step when it reads the norm.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
    norm = torch.linalg.vector_norm(torch.stack([n.to(grads[0].device) for n in norms]))
    if max_norm > 0:
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        scale = torch.where(torch.isfinite(norm), scale, torch.ones_like(scale))
        torch._foreach_mul_(grads, scale)
    return norm
