"""``pretrain train`` as a user runs it: a subprocess, a config, overrides, then ``--resume auto``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist_utils import free_port

ROOT = Path(__file__).resolve().parents[1]


def pretrain(*args: str, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *launcher, "-m", "pretrain.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_train_and_resume(tmp_path, tiny_shard_prefix, tiny_tokenizer):
    run_dir = tmp_path / "run"
    common = [str(ROOT / "configs" / "gpt_tiny.yaml"), f"data.train=[{tiny_shard_prefix}]",
              f"data.tokenizer={tiny_tokenizer.path}", f"data.cache_dir={tmp_path / 'index'}",
              f"model.vocab_size={tiny_tokenizer.vocab_size}", "model.hidden_size=32", "model.num_layers=1",
              "data.seq_length=32", "train.global_batch_size=4", "train.micro_batch_size=2",
              f"checkpoint.dir={run_dir}", "checkpoint.interval=2", "logging.interval=1", "train.eval_interval=0"]
    first = pretrain("train", *common, "train.steps=3")
    assert first.returncode == 0, first.stderr + first.stdout
    assert "step 3/3 | loss" in first.stdout and "MFU" in first.stdout
    assert (run_dir / "latest").read_text().strip() == "step_00000003"
    assert (run_dir / "config.yaml").is_file() and list((run_dir / "tensorboard").iterdir())
    shutil.copytree(run_dir, tmp_path / "tp")  # resumed below under another layout

    # the same run extended to 5 steps continues from step 3
    second = pretrain("train", *common, "train.steps=5", "--resume", "auto")
    assert second.returncode == 0, second.stderr + second.stdout
    assert "resumed from" in second.stdout and "step 4/5" in second.stdout and "step 1/5" not in second.stdout
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    from pretrain.plot import plot_run

    assert plot_run(run_dir).stat().st_size > 10_000  # what `pretrain plot RUN_DIR` draws

    # data parallel under torchrun (2 gloo ranks, one micro-batch each): the same global batches, the same
    # per-token mean loss and updates as the single process with 2 accumulated micro-batches
    dp_dir = tmp_path / "dp"
    torchrun = ("-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}")
    dp = pretrain("train", *common, "train.steps=3", f"checkpoint.dir={dp_dir}", launcher=torchrun)
    assert dp.returncode == 0, dp.stderr + dp.stdout
    assert losses(dp_dir) == pytest.approx(losses(run_dir)[:3], abs=1e-5)
    assert sorted(p.name for p in (dp_dir / "step_00000003").glob("model_rank*")) == [
        "model_rank00000.safetensors", "model_rank00001.safetensors"]

    # the single-process checkpoint of step 3 resumed under tensor parallelism (TP2, 2 ranks): resharded on
    # load (weights and Adam moments), steps 4-5 continue as the never-stopped single process did
    tp_dir = tmp_path / "tp"
    tp = pretrain("train", *common, "train.steps=5", f"checkpoint.dir={tp_dir}", "parallel.tp=2",
                  "--resume", "auto", launcher=torchrun[:-1] + (f"--master_port={free_port()}",))
    assert tp.returncode == 0, tp.stderr + tp.stdout
    assert "resharded from layout" in tp.stdout + tp.stderr
    assert losses(tp_dir)[3:] == pytest.approx(losses(run_dir)[3:5], rel=1e-5)


def test_bad_config_fails_before_work(tmp_path):
    out = pretrain("train", str(ROOT / "configs" / "gpt_tiny.yaml"), "train.stpes=3", f"checkpoint.dir={tmp_path}/r")
    assert out.returncode == 2
    assert "unknown key 'train.stpes'; did you mean 'steps'" in out.stderr
    assert not (tmp_path / "r").exists()


def test_schedule_command(tmp_path):
    png = tmp_path / "s.png"
    out = pretrain("schedule", str(ROOT / "configs" / "gpt_125m.yaml"), "train.steps=40000", "--out", str(png))
    assert out.returncode == 0, out.stderr
    assert "end of warmup" in out.stdout and "full batch" in out.stdout
    assert png.stat().st_size > 10_000
