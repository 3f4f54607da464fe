"""Runs over an existing checkpoint directory, stop signals without one, and metrics rows after a resume."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from pretrain import checkpoint as ckpt
from pretrain.config import ConfigError
from pretrain.train import build_datasets
from pretrain.trainer import EXIT_OK, EXIT_PREEMPTED, EXIT_STOPPED_UNSAVED, Trainer
from tests.test_trainer import CONFIGS, StopAt, make_cfg, metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHORT = ["train.global_batch_size=4", "train.micro_batch_size=4", "schedule.warmup_steps=1",
         "schedule.warmup_fraction=0"]


def run(cfg, resume=None, overwrite=False, stop=None) -> tuple[Trainer, int]:
    train, valid = build_datasets(cfg)
    trainer = Trainer(cfg, train, valid, stop=stop)
    if stop is not None:
        stop.trainer = trainer
    trainer.resume(resume, overwrite=overwrite)
    return trainer, trainer.fit()


def _steps(root: Path) -> dict[str, int]:
    return {p.name: json.loads((p / ckpt.META).read_text())["save_order"] for p in sorted(root.glob("step_*"))}


def test_rerun_without_resume_is_refused(tmp_path, tiny_shard_prefix, tiny_tokenizer):
    torch.manual_seed(0)
    cfg = make_cfg("gpt_tiny.yaml", tmp_path, tiny_shard_prefix, tiny_tokenizer, *SHORT, "train.steps=4",
                   "checkpoint.interval=2")
    assert run(cfg)[1] == EXIT_OK
    before = _steps(Path(cfg.checkpoint.dir))
    with pytest.raises(ConfigError, match=r"already holds checkpoints.*--resume auto.*--overwrite"):
        run(cfg)
    assert _steps(Path(cfg.checkpoint.dir)) == before and ckpt.resolve(cfg.checkpoint.dir).name == "step_00000004"


def test_overwrite_starts_over_and_keeps_the_new_runs_checkpoints(tmp_path, tiny_shard_prefix, tiny_tokenizer):
    torch.manual_seed(0)
    first = make_cfg("gpt_tiny.yaml", tmp_path, tiny_shard_prefix, tiny_tokenizer, *SHORT, "train.steps=4",
                     "checkpoint.interval=2")
    run(first)
    again = make_cfg("gpt_tiny.yaml", tmp_path, tiny_shard_prefix, tiny_tokenizer, *SHORT, "train.steps=2",
                     "checkpoint.interval=1", "checkpoint.keep_last=2")
    trainer, code = run(again, overwrite=True)
    assert code == EXIT_OK and trainer.step == 2
    assert sorted(_steps(Path(again.checkpoint.dir))) == ["step_00000001", "step_00000002"]  # stale step 4 pruned
    assert ckpt.resolve(again.checkpoint.dir).name == "step_00000002"
    assert [r["step"] for r in metrics(again) if "loss" in r] == [1, 2]  # the earlier run's rows are superseded


def test_cli_refuses_a_rerun_in_one_line(tmp_path, tiny_shard_prefix, tiny_tokenizer, capsys):
    from pretrain.cli import main

    torch.manual_seed(0)
    cfg = make_cfg("gpt_tiny.yaml", tmp_path, tiny_shard_prefix, tiny_tokenizer, *SHORT, "train.steps=2")
    run(cfg)
    args = ["train", str(CONFIGS / "gpt_tiny.yaml"), f"data.train=[{tiny_shard_prefix}]",
            f"data.tokenizer={tiny_tokenizer.path}", f"data.cache_dir={tmp_path / 'index'}",
            f"model.vocab_size={tiny_tokenizer.vocab_size}", f"checkpoint.dir={cfg.checkpoint.dir}",
            "data.seq_length=32", "logging.tensorboard=false", *SHORT, "train.steps=2"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resume auto" in err and "--overwrite" in err
    assert main([*args, "--overwrite"]) == EXIT_OK


def test_stop_without_checkpoint_dir_claims_no_save(tmp_path, tiny_shard_prefix, tiny_tokenizer, caplog):
    torch.manual_seed(0)
    cfg = make_cfg("gpt_tiny.yaml", tmp_path, tiny_shard_prefix, tiny_tokenizer, *SHORT, "train.steps=5",
                   "checkpoint.dir=null", f"logging.dir={tmp_path / 'logs'}")
    with caplog.at_level(logging.INFO):
        trainer, code = run(cfg, stop=StopAt(2))
    assert trainer.step == 2 and code == EXIT_STOPPED_UNSAVED and code != EXIT_PREEMPTED
    assert "no checkpoints will be written" in caplog.text
    assert "checkpoint at step" not in caplog.text and "nothing saved" in caplog.text


def test_metrics_have_one_row_per_step_after_a_resume(tmp_path, tiny_shard_prefix, tiny_tokenizer):
    torch.manual_seed(0)
    cfg = make_cfg("gpt_tiny.yaml", tmp_path, tiny_shard_prefix, tiny_tokenizer, *SHORT, "train.steps=5",
                   "checkpoint.interval=2", "checkpoint.save_final=false", "train.eval_interval=1",
                   "train.eval_steps=1")
    run(cfg)  # "crashes" after step 5, last checkpoint at step 4: step 5 is replayed on resume
    more = make_cfg("gpt_tiny.yaml", tmp_path, tiny_shard_prefix, tiny_tokenizer, *SHORT, "train.steps=6",
                    "checkpoint.interval=2", "train.eval_interval=1", "train.eval_steps=1")
    trainer, code = run(more, resume="auto")
    assert code == EXIT_OK and trainer.step == 6
    rows = metrics(more)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if "val_loss" in r] == [1, 2, 3, 4, 5, 6]


def test_bitflipped_checkpoint_is_not_resumed(tmp_path, tiny_shard_prefix, tiny_tokenizer):
    torch.manual_seed(0)
    cfg = make_cfg("gpt_tiny.yaml", tmp_path, tiny_shard_prefix, tiny_tokenizer, *SHORT, "train.steps=2")
    run(cfg)
    weights = ckpt.resolve(cfg.checkpoint.dir) / ckpt.model_file(0)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    more = make_cfg("gpt_tiny.yaml", tmp_path, tiny_shard_prefix, tiny_tokenizer, *SHORT, "train.steps=3")
    with pytest.raises(ckpt.CheckpointError, match=r"model_rank00000\.safetensors is damaged.*checksum"):
        run(more, resume="auto")
