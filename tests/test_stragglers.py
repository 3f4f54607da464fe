"""Straggler attribution: the slowest rank and section are named against the median of the other ranks; on real
gloo processes, a rank slowed through ``PRETRAIN_SLOW_RANK`` is named in the log and the metrics."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pretrain.stragglers import MIN_GAP_S, slowest
from tests.dist_utils import run_distributed
from tests.test_trainer import make_cfg, metrics


def test_slowest_names_rank_and_section_against_the_median_of_the_others():
    ranks = [{"data": 0.1, "step": 2.0, "other": 0.05}, {"data": 0.12, "step": 2.0, "other": 0.05},
             {"data": 0.9, "step": 2.1, "other": 0.05}, {"data": 0.11, "step": 2.0, "other": 0.05}]
    worst = slowest(ranks, 2.0)
    assert (worst["rank"], worst["section"], worst["median_seconds"]) == (2, "data", 0.11)
    assert worst["ratio"] == pytest.approx(0.9 / 0.11)
    assert slowest(ranks, 10.0) is None  # 8.2x is below the factor
    tiny = [{"data": 0.001}, {"data": 0.001 + MIN_GAP_S / 2}]  # 26x, but a 25 ms gap is noise
    assert slowest(tiny, 2.0) is None


def slow_rank_worker(args: dict) -> dict:
    from pretrain.train import build_datasets
    from pretrain.trainer import Trainer

    tokenizer = SimpleNamespace(path=args["tokenizer"], vocab_size=args["vocab"])
    cfg = make_cfg("gpt_tiny.yaml", Path(args["root"]), args["prefix"], tokenizer, "train.global_batch_size=4",
                   "train.micro_batch_size=2", "train.steps=4", "train.device=cpu", "train.straggler_interval=2",
                   "train.straggler_factor=3", "checkpoint.save_final=false")
    out = {}
    for section in ("data", "forward"):  # rank 1 waits 0.3 s each time it enters this section
        os.environ["PRETRAIN_SLOW_RANK"] = f"1:0.3:{section}"
        torch.manual_seed(0)
        train, valid = build_datasets(cfg)
        trainer = Trainer(cfg, train, valid)
        trainer.resume(None, overwrite=True)
        assert trainer.fit() == 0
        out[section] = [r for r in metrics(cfg) if "straggler/rank" in r]
    return out if trainer.rank == 0 else {}


@pytest.mark.dist
def test_a_slowed_rank_is_named(tmp_path, tiny_shard_prefix, tiny_tokenizer):
    """Rank 1 slowed in its data wait, then in its forward: named in that section, not rank 0, which waits for it
    in its gradient all-reduce (a later section)."""
    result = run_distributed("tests.test_stragglers:slow_rank_worker", 2,
                             {"root": str(tmp_path), "prefix": tiny_shard_prefix,
                              "tokenizer": str(tiny_tokenizer.path), "vocab": tiny_tokenizer.vocab_size},
                             timeout=300)[0]
    for section, rows in result.items():
        assert [(r["step"], r["straggler/rank"], r["straggler/section"]) for r in rows] == \
            [(2, 1, section), (4, 1, section)], (section, rows)
        assert all(r["straggler/seconds"] >= 0.6 and r["straggler/ratio"] > 3 for r in rows), rows
