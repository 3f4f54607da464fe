"""Eval on save (``checkpoint.eval_on_save``): a side process exports the saved checkpoint to HF, checks our logits
against transformers and scores tasks; the results come back into the run's metrics tagged with the step, equal to
scoring the checkpoint directly."""

from __future__ import annotations

import re

import pytest
import torch

from pretrain import checkpoint as ckpt
from pretrain.config import ConfigError
from pretrain.trainer import EXIT_OK
from tests.test_trainer import make_cfg, metrics, run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.slow  # the trainer starts the side process
def test_each_save_is_evaluated_by_a_side_job(tmp_path, tiny_shard_prefix, tiny_tokenizer):
    from pretrain.evals.harness import evaluate_tasks, scalar_metrics
    from pretrain.evals.local_data import ensure_local_eval_data
    from pretrain.evals.pretrain_model import load_checkpoint_model

    ensure_local_eval_data()
    torch.manual_seed(0)
    cfg = make_cfg("gpt_tiny.yaml", tmp_path, tiny_shard_prefix, tiny_tokenizer, "train.steps=2",
                   "train.global_batch_size=2", "train.micro_batch_size=2", "checkpoint.eval_on_save=true",
                   "checkpoint.eval_on_save_tasks=[kjv_cont]", "train.eval_tasks_limit=4")
    trainer, code = run(cfg)
    assert code == EXIT_OK
    rows = [r for r in metrics(cfg) if "eval_on_save/seconds" in r]
    assert [r["step"] for r in rows] == [2], rows
    assert rows[0]["eval_on_save/logit_max_abs_diff"] <= 1e-4  # the export gives transformers our logits
    direct = scalar_metrics(evaluate_tasks(load_checkpoint_model(ckpt.resolve(cfg.checkpoint.dir)), ["kjv_cont"], 0, 4,
                                           progress=False))
    assert direct and {k: rows[0][k] for k in direct} == direct


@pytest.mark.parametrize("override, message", [
    ("checkpoint.keep_last=1", "checkpoint.keep_last >= 2"),
    ("checkpoint.eval_on_save_launcher=slurm", "must be auto, subprocess or sbatch, got 'slurm'"),
    ("checkpoint.eval_on_save_sbatch=[gpus=1]", "sbatch options written --name=value")])
def test_eval_on_save_settings_are_checked(override, message, tmp_path, tiny_shard_prefix, tiny_tokenizer):
    with pytest.raises(ConfigError, match=re.escape(message)):
        make_cfg("gpt_tiny.yaml", tmp_path, tiny_shard_prefix, tiny_tokenizer, "checkpoint.eval_on_save=true",
                 override)


def test_a_side_job_whose_checkpoint_was_pruned_fails_at_once(tmp_path):
    """Training went on and pruned the checkpoint before the (queued, slow to start) side job read it."""
    from pretrain.eval_on_save import _wait_published

    (tmp_path / ckpt.LATEST).write_text("step_00000030")
    with pytest.raises(FileNotFoundError, match="step_00000010 was pruned .*raise checkpoint.keep_last"):
        _wait_published(tmp_path / "step_00000010", timeout_s=1)
    (tmp_path / ckpt.LATEST).write_text("step_00000005")  # a background save of step 10 not published yet: waits
    with pytest.raises(TimeoutError):
        _wait_published(tmp_path / "step_00000010", timeout_s=0)
