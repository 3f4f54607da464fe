"""LR and batch-size schedules against their formulas."""

from __future__ import annotations

import math

import pytest

from pretrain.config import load_config
from pretrain.schedule import Schedule, lr_at, scaled_lr

BASE = ["model.family=gpt", "model.vocab_size=64", "model.hidden_size=16", "model.num_layers=1",
        "model.num_heads=2", "optimizer.lr=0.1"]


def schedule(*overrides: str) -> Schedule:
    return Schedule(load_config(None, [*BASE, *overrides]))


def test_goyal_linear_scaling_with_warmup():
    """Goyal et al.: lr = 0.1 * kn / 256, reached linearly over the warmup (here 5 steps), then constant."""
    s = schedule("train.global_batch_size=8192", "train.micro_batch_size=32", "schedule.scaling=linear",
                 "schedule.base_batch_size=256", "schedule.warmup_steps=5", "schedule.decay=constant",
                 "train.steps=100")
    peak = 0.1 * 8192 / 256
    assert s.peak_lr == pytest.approx(3.2)
    assert [s.lr(k, k * 8192) for k in range(5)] == pytest.approx([peak * (k + 1) / 5 for k in range(5)])
    assert s.lr(5, 0) == s.lr(99, 0) == pytest.approx(peak)


def test_sqrt_scaling_rule():
    assert scaled_lr(1e-3, 1024, 256, "sqrt") == pytest.approx(2e-3)
    assert scaled_lr(1e-3, 1024, 256, "linear") == pytest.approx(4e-3)
    assert scaled_lr(1e-3, 1024, None, "none") == 1e-3


@pytest.mark.parametrize("decay", ["linear", "cosine", "inverse_sqrt", "constant"])
def test_decay_formulas(decay):
    peak, lo, warm, total = 1.0, 0.1, 10, 110
    for p in range(warm + 1, total + 1):
        t = (p - warm) / (total - warm)
        want = {"linear": lo + (peak - lo) * (1 - t),
                "cosine": lo + (peak - lo) * 0.5 * (1 + math.cos(math.pi * t)),
                "inverse_sqrt": max(lo, peak * math.sqrt(warm / p)),
                "constant": peak}[decay]
        assert lr_at(p, total, warm, peak, lo, decay) == pytest.approx(want), p
    assert lr_at(total, total, warm, peak, lo, "cosine") == pytest.approx(lo)


@pytest.mark.parametrize("style", ["linear", "cosine", "sqrt"])
def test_warmup_stable_decay(style):
    # 10 warmup steps, 100 steps after; the last 20% of them (steps 90..110) decay
    values = [lr_at(p, 110, 10, 1.0, 0.0, "wsd", 0.2, style) for p in range(1, 111)]
    assert values[:10] == pytest.approx([(p + 1) / 10 for p in range(10)])
    assert values[10:90] == pytest.approx([1.0] * 80)
    t = 10 / 20  # progress 100: halfway through the decay
    want = {"linear": 1 - t, "cosine": 0.5 * (1 + math.cos(math.pi * t)), "sqrt": 1 - math.sqrt(t)}[style]
    assert values[99] == pytest.approx(want)
    assert values[-1] == pytest.approx(0.0)


def test_warmup_by_fraction_and_by_samples():
    s = schedule("train.steps=200", "schedule.warmup_fraction=0.1", "schedule.decay=constant")
    assert s.warmup == 20 and s.lr(9, 0) == pytest.approx(0.1 * 10 / 20)
    s = schedule("train.steps=100", "train.global_batch_size=8", "train.micro_batch_size=8",
                 "schedule.warmup_samples=64", "schedule.decay=linear")
    assert s.by_samples and s.total == 800
    assert s.lr(0, 0) == pytest.approx(0.1 * 8 / 64)  # after step 0, 8 samples of 64 are done
    assert s.lr(7, 56) == pytest.approx(0.1)
    assert s.lr(99, 792) == pytest.approx(0.0)


def test_gpt3_batch_rampup():
    """Start 32, +32 every (256 - 32) / 32 = 7th of 7000 samples, i.e. every 1000 samples."""
    s = schedule("train.global_batch_size=256", "train.micro_batch_size=32", "schedule.rampup_start=32",
                 "schedule.rampup_increment=32", "schedule.rampup_samples=7000", "train.steps=100")
    assert [s.batch_size(c) for c in (0, 999, 1000, 2500, 6999, 7000, 10**9)] == [32, 32, 64, 96, 224, 256, 256]
    traj = list(s.trajectory())
    assert traj[0] == (0, 0, 32) and all(b2 >= b1 for (_, _, b1), (_, _, b2) in zip(traj, traj[1:]))
    assert all(c2 == c1 + b for (_, c1, b), (_, c2, _) in zip(traj, traj[1:]))
    assert s.total_samples() == sum(b for _, _, b in traj) and traj[-1][2] == 256
