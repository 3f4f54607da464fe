"""Planned exits before a time limit (``train.exit_at_step``, ``train.exit_after_minutes``): checkpoint, exit 75, the
stop file the Slurm job script requeues on, exact resume; ``launch slurm --exit-before-time`` derives the minutes
from ``--time``."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from pretrain import checkpoint as ckpt
from pretrain.config import ConfigError
from pretrain.exits import slurm_minutes
from pretrain.launch.slurm import LaunchError, SlurmJob, prepare_job, render_script
from pretrain.trainer import EXIT_OK, EXIT_PREEMPTED
from tests.test_trainer import make_cfg, metrics, run

SHORT = ["train.global_batch_size=2", "train.micro_batch_size=2", "schedule.warmup_steps=1",
         "schedule.warmup_fraction=0", "train.steps=5"]


@pytest.mark.parametrize("limit, minutes", [("90", 90), ("30:30", 30.5), ("2:00:30", 120.5), ("1-2", 1560),
                                            ("1-2:03", 1563), ("2-00:00:00", 2880)])
def test_slurm_time_limits(limit, minutes):
    assert slurm_minutes(limit) == minutes


def test_slurm_time_limit_refuses_garbage():
    with pytest.raises(ValueError, match="not a Slurm time"):
        slurm_minutes("2h")


@pytest.mark.usefixtures("one_torch_thread")
def test_exit_at_step_saves_exits_75_and_resumes_exactly(tmp_path, tiny_shard_prefix, tiny_tokenizer, monkeypatch):
    stop_file = tmp_path / "stop-requested"
    monkeypatch.setenv("PRETRAIN_STOP_FILE", str(stop_file))
    torch.manual_seed(0)
    full = make_cfg("gpt_tiny.yaml", tmp_path / "full", tiny_shard_prefix, tiny_tokenizer, *SHORT)
    assert run(full)[1] == EXIT_OK and not stop_file.exists()
    torch.manual_seed(0)
    cfg = make_cfg("gpt_tiny.yaml", tmp_path / "split", tiny_shard_prefix, tiny_tokenizer, *SHORT,
                   "train.exit_at_step=2")
    trainer, code = run(cfg)
    assert code == EXIT_PREEMPTED and trainer.step == 2 and stop_file.exists()  # the job script requeues on it
    assert ckpt.resolve(cfg.checkpoint.dir).name == "step_00000002"
    stop_file.unlink()
    torch.manual_seed(5)
    cfg = make_cfg("gpt_tiny.yaml", tmp_path / "split", tiny_shard_prefix, tiny_tokenizer, *SHORT,
                   "train.exit_at_step=2")  # the requeued job's command still sets it: the resumed run goes on
    trainer, code = run(cfg, resume="auto")
    assert code == EXIT_OK and trainer.step == 5

    def losses(c):
        return {r["step"]: r["loss"] for r in metrics(c) if "loss" in r}

    assert losses(cfg) == losses(full)


@pytest.mark.usefixtures("one_torch_thread")
def test_exit_after_minutes_saves_and_exits_75(tmp_path, tiny_shard_prefix, tiny_tokenizer, caplog):
    torch.manual_seed(0)
    cfg = make_cfg("gpt_tiny.yaml", tmp_path, tiny_shard_prefix, tiny_tokenizer, *SHORT,
                   "train.exit_after_minutes=0.0001")  # 6 ms: over after the first step (process start counts)
    with caplog.at_level("WARNING", logger="pretrain.train"):
        trainer, code = run(cfg)
    assert code == EXIT_PREEMPTED and trainer.step == 1
    assert ckpt.resolve(cfg.checkpoint.dir).name == "step_00000001"
    assert "stop requested (train.exit_after_minutes=0.0001" in caplog.text


@pytest.mark.parametrize("key", ["train.exit_at_step=0", "train.exit_after_minutes=-1"])
def test_exit_keys_are_validated(key, tmp_path, tiny_shard_prefix, tiny_tokenizer):
    with pytest.raises(ConfigError, match=key.split("=")[0].replace(".", r"\.") + " must be > 0 or null"):
        make_cfg("gpt_tiny.yaml", tmp_path, tiny_shard_prefix, tiny_tokenizer, key)


def test_launch_slurm_derives_exit_after_minutes_from_time(tmp_path):
    job = SlurmJob(command=["train", "c.yaml"], run_dir=tmp_path, time="1-00:00:00", exit_before_time=15,
                   check=False)
    text = prepare_job(job)
    assert job.command == ["train", "c.yaml", "--resume", "auto", "train.exit_after_minutes=1425.0"]
    assert "train.exit_after_minutes=1425.0" in text and '|| [ -e "$PRETRAIN_STOP_FILE" ]' in text
    for bad in ({"time": None}, {"time": "10", "exit_before_time": 10}):
        job = SlurmJob(**{"command": ["train", "c.yaml"], "run_dir": Path(tmp_path), "exit_before_time": 5,
                          "check": False, **bad})
        with pytest.raises(LaunchError, match="--exit-before-time"):
            prepare_job(job)


def test_launch_slurm_cli_takes_exit_before_time(tmp_path, capsys):
    from pretrain.cli import main

    assert main(["launch", "slurm", "--time", "1:00:00", "--exit-before-time", "10", "--run-dir", str(tmp_path),
                 "--no-check", "--dry-run", "--", "train", "c.yaml"]) == 0
    assert "train.exit_after_minutes=50.0" in capsys.readouterr().out


FAKE_PYTHON = """#!/bin/bash
if [ "$2" = pretrain.cli ]; then [ "$PLANNED" = 1 ] && touch "$PRETRAIN_STOP_FILE"; exit 75; fi
if [ "$2" = pretrain.launch.preemption ]; then echo REQUEUED; exit 0; fi
exit 9
"""


@pytest.mark.parametrize("planned, code", [(True, 0), (False, 75)])
def test_job_script_requeues_after_a_planned_exit(planned, code, tmp_path):
    """The trainer's planned exit (exit 75 and the stop file, no SIGUSR1) is requeued by the job script; an exit
    without the stop file is not. Fake srun/scontrol/python on PATH run the real script."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fakes = {"srun": 'while [[ "$1" == --* ]]; do shift; done; exec "$@"\n', "scontrol": "echo node1\n",
             "python": FAKE_PYTHON.split("\n", 1)[1]}
    for name, body in fakes.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    job = SlurmJob(command=["train", "c.yaml", "--resume", "auto"], run_dir=tmp_path, task_per_rank=True,
                   python=str(bin_dir / "python"))
    (tmp_path / "job.sbatch").write_text(render_script(job))
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node1",
           "SLURM_JOB_ID": "42", "SLURM_CPUS_ON_NODE": "2", "PLANNED": str(int(planned))}
    out = subprocess.run(["bash", str(tmp_path / "job.sbatch")], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == code, out.stdout + out.stderr
    assert ("REQUEUED" in out.stdout) == planned, out.stdout
