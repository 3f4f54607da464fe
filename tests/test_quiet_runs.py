"""Quiet runs (issue 12 item 7, issue 13 item 13): a run prints our lines, not third-party noise once per rank.

A 2-rank tensor-parallel run used to print 33 third-party lines (DeepSpeed's accelerator guess and op build,
gcc command lines, Megatron-FSDP INFO, Apex/Transformer Engine UserWarnings, CUDA_DEVICE_MAX_CONNECTIONS) against
8 of ours, part of it because ``logging.basicConfig(level=INFO)`` enabled every library's INFO on rank 0.
"""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = re.compile(r"^(\[launch\] |\d\d:\d\d:\d\d |pretrain )")  # launcher, our loggers, our one-line errors
THIRD_PARTY = ("Megatron", "DeepSpeed", "gcc ", "Transformer Engine", "Apex", "warn", "Warning", "accelerator",
               "CUDA_DEVICE_MAX_CONNECTIONS")


def third_party_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip() and (
        not OURS.match(line) or any(marker in line for marker in THIRD_PARTY))]


def test_our_logging_leaves_other_loggers_at_warning(monkeypatch):
    from pretrain.console import setup_logging

    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(logging.getLogger(), "handlers", list(logging.getLogger().handlers))  # restored after
    monkeypatch.setattr(logging.getLogger("megatron_fsdp"), "level", logging.NOTSET)
    monkeypatch.setattr(logging.getLogger("pretrain"), "level", logging.NOTSET)
    setup_logging(rank=0)
    logging.getLogger("pretrain.trainer").info("step 1/1")
    logging.getLogger("megatron.core.distributed").info("Detected Megatron Core, using Megatron-FSDP")
    logging.getLogger("some.library").warning("a real warning")  # still shown
    logging.getLogger("megatron_fsdp").setLevel(logging.INFO)  # a library enabling its own INFO: known noise
    logging.getLogger("megatron_fsdp").info("Using Megatron-FSDP without Transformer Engine.")
    lines = [line.split(" ", 1)[1] for line in out.getvalue().splitlines()]
    assert lines == ["step 1/1", "a real warning"]
    setup_logging(rank=1)  # replaces the handler; other ranks log warnings only
    logging.getLogger("pretrain.trainer").info("rank 1 says")
    assert out.getvalue().count("\n") == 2


def test_filtered_stream_drops_known_print_lines_only():
    from pretrain.console import _FilteredStream

    out = io.StringIO()
    stream = _FilteredStream(out)
    print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully", file=stream)
    print("step 1/3 | loss 6.9", file=stream)
    stream.write("progress 50%\r")
    assert out.getvalue() == "step 1/3 | loss 6.9\nprogress 50%\r"


@pytest.mark.dist
def test_two_rank_tensor_parallel_run_prints_at_most_one_third_party_line(tmp_path, tiny_shard_prefix,
                                                                         tiny_tokenizer):
    args = [str(ROOT / "configs" / "gpt_tiny.yaml"), f"data.train=[{tiny_shard_prefix}]",
            f"data.tokenizer={tiny_tokenizer.path}", f"data.cache_dir={tmp_path / 'index'}",
            f"model.vocab_size={tiny_tokenizer.vocab_size}", "model.hidden_size=32", "model.num_layers=1",
            "data.seq_length=32", "train.global_batch_size=4", "train.micro_batch_size=2", "train.steps=3",
            f"checkpoint.dir={tmp_path / 'run'}", "logging.interval=1", "train.eval_interval=0", "parallel.tp=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PRETRAIN_VERBOSE", None)
    out = subprocess.run([sys.executable, "-m", "pretrain.cli", "launch", "local", "--nproc", "2", "--", "train",
                          *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    output = out.stdout + out.stderr
    assert out.returncode == 0, output[-3000:]
    assert "step 3/3 | loss" in output
    noise = third_party_lines(output)
    assert len(noise) <= 1, "\n".join(noise)
