"""Optimizers: LAMB against a hand-written formula, decay groups, global-norm clipping."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from pretrain.config import OptimizerConfig
from pretrain.optim import LAMB, build_optimizer, clip_grad_norm, param_groups


def lamb_reference(w, grads, lr, b1, b2, eps, wd):
    """You et al. 2019, Algorithm 2, on Python floats (one tensor = one layer)."""
    m = [0.0] * len(w)
    v = [0.0] * len(w)
    w = list(w)
    for t, g in enumerate(grads, start=1):
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
        r = [(mi / (1 - b1**t)) / (math.sqrt(vi / (1 - b2**t)) + eps) for mi, vi in zip(m, v)]
        u = [ri + wd * wi for ri, wi in zip(r, w)]
        w_norm, u_norm = math.sqrt(sum(x * x for x in w)), math.sqrt(sum(x * x for x in u))
        trust = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
        w = [wi - lr * trust * ui for wi, ui in zip(w, u)]
    return w


def test_lamb_matches_hand_formula():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(6, generator=g, dtype=torch.float64)
    grads = [torch.randn(6, generator=g, dtype=torch.float64) for _ in range(4)]
    p = nn.Parameter(w0.clone())
    opt = LAMB([p], lr=0.05, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01)
    for grad in grads:
        p.grad = grad.clone()
        opt.step()
    want = lamb_reference(w0.tolist(), [x.tolist() for x in grads], 0.05, 0.9, 0.99, 1e-6, 0.01)
    assert p.detach().tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_lamb_trust_ratio_is_one_for_zero_weights():
    p = nn.Parameter(torch.zeros(3))
    opt = LAMB([p], lr=0.1, betas=(0.9, 0.999), eps=0.0)
    p.grad = torch.tensor([1.0, -2.0, 4.0])
    opt.step()
    # first step: m_hat = g, v_hat = g^2, so the update is sign(g) with trust 1
    assert torch.allclose(p.detach(), torch.tensor([-0.1, 0.1, -0.1]))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.norm = nn.LayerNorm(4)
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight  # tied: must appear once


def test_param_groups_exclude_norms_biases_embeddings():
    m = Tiny()
    decay, plain = param_groups(m, 0.1, ["norm", "bias", "embedding"])
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]) == {id(m.proj.weight)} and decay["weight_decay"] == 0.1
    assert ids(plain["params"]) == ids([m.emb.weight, m.norm.weight, m.norm.bias, m.proj.bias])
    assert plain["weight_decay"] == 0.0
    (only,) = param_groups(m, 0.1, [])
    assert len(only["params"]) == 5  # tied weight counted once
    groups = param_groups(m, 0.1, ["bias"])
    assert ids(groups[1]["params"]) == ids([m.norm.bias, m.proj.bias])


def test_build_adamw_fused_and_lamb():
    m = Tiny()
    opt = build_optimizer(m, OptimizerConfig(name="adamw", lr=1e-3))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert isinstance(build_optimizer(m, OptimizerConfig(name="lamb")), LAMB)


def test_clip_grad_norm_global():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    norm = clip_grad_norm([a, b], 1.0)
    assert norm.item() == pytest.approx(5.0)
    assert a.grad.tolist() == pytest.approx([0.6, 0.0], rel=1e-5) and b.grad.item() == pytest.approx(0.8, rel=1e-5)
    assert torch.equal(torch.nn.utils.clip_grad_norm_([a], 10.0), clip_grad_norm([a], 10.0))  # below: unchanged
    a.grad = torch.tensor([float("nan"), 1.0])
    assert math.isnan(clip_grad_norm([a], 1.0).item()) and a.grad[1].item() == 1.0  # reported, not applied
