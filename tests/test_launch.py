"""Launcher pieces without Slurm: environment detection, preemption agreement over real gloo ranks, the hang
watchdog, the local (torchrun) launcher, and the checks made before a Slurm job is submitted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pretrain.evals.harness import evaluate_tasks, scalar_metrics
from pretrain.evals.local_data import ensure_local_eval_data
from pretrain.evals.pretrain_model import load_checkpoint_model
from pretrain.launch.env import detect, first_host
from pretrain.launch.local import exit_code, job_exit_code
from pretrain.launch.preemption import PreemptionHandler, requeue
from pretrain.launch.slurm import LaunchError, SlurmJob, check_train_command, render_script
from tests.dist_utils import REPO, free_port, run_distributed


# --- detection ----------------------------------------------------------------------------------------------
def test_detect_single_torchrun_and_slurm():
    single = detect({})
    assert (single.launcher, single.rank, single.world_size, single.job_id) == ("single", 0, 1, None)

    tr = detect({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                 "MASTER_ADDR": "node7", "MASTER_PORT": "1234", "SLURM_JOB_ID": "42", "SLURMD_NODENAME": "gpu9",
                 "SLURM_PROCID": "1", "SLURM_STEP_ID": "0", "SLURM_RESTART_COUNT": "2"})
    assert (tr.launcher, tr.rank, tr.world_size, tr.local_rank, tr.local_world_size) == ("torchrun", 5, 8, 1, 4)
    assert (tr.master_addr, tr.master_port, tr.node_name, tr.job_id, tr.restart_count) == \
        ("node7", 1234, "gpu9", "42", 2)

    step = {"SLURM_JOB_ID": "20005", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
            "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NUM_NODES": "2", "SLURM_NTASKS": "9",
            "SLURM_STEP_NODELIST": "gpu[003-004]", "SLURMD_NODENAME": "gpu004"}
    sl = detect(step)
    assert (sl.launcher, sl.rank, sl.world_size, sl.local_rank, sl.local_world_size) == ("slurm", 3, 4, 1, 2)
    assert (sl.master_addr, sl.master_port, sl.node_name) == ("gpu003", 20005, "gpu004")
    assert detect({**step, "MASTER_ADDR": "ib-gpu003", "MASTER_PORT": "999"}).master_addr == "ib-gpu003"

    # the batch script itself (SLURM_PROCID but no step): one process, still knows its job
    batch = detect({"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_RESTART_COUNT": "1"})
    assert (batch.launcher, batch.world_size, batch.job_id, batch.restart_count) == ("single", 1, "7", 1)

    with pytest.raises(ValueError, match="WORLD_SIZE"):
        detect({"RANK": "0", "WORLD_SIZE": "two"})


def test_first_host_of_slurm_hostlists():
    assert first_host("n[1-2]") == "n1"
    assert first_host("gpu[003-005,9],login1") == "gpu003"
    assert first_host("login1,gpu[1-4]") == "login1"
    assert first_host("r[2-3]n[07,09]") == "r2n07"
    assert first_host("single") == "single"


# --- preemption ---------------------------------------------------------------------------------------------
def _run_until_stop(stop_file: str | None, signal_rank: int | None) -> dict:
    """Rank ``signal_rank`` signals itself during step 3 (or rank 0 creates the stop file then); returns the
    step after which this rank stopped."""
    import torch.distributed as dist

    handler = PreemptionHandler.install(stop_file=stop_file, poll_s=0.05)
    stopped_at = None
    for step in range(1, 200):
        if step == 3:
            if dist.get_rank() == signal_rank:
                os.kill(os.getpid(), signal.SIGUSR1)
            if stop_file and dist.get_rank() == 0:
                Path(stop_file).touch()
                time.sleep(0.3)  # the watcher thread polls every 0.05 s
        if handler.should_stop():
            stopped_at = step
            break
    handler.uninstall()
    return {"stopped_at": stopped_at, "reason": handler.reason or ""}


def worker_agree(args: dict) -> dict:
    by_signal = _run_until_stop(None, signal_rank=1)
    by_file = _run_until_stop(args["stop_file"], signal_rank=None)
    return {f"signal_{k}": v for k, v in by_signal.items()} | {f"file_{k}": v for k, v in by_file.items()}


@pytest.mark.dist
def test_stop_request_is_agreed_by_all_ranks(tmp_path):
    r0, r1 = run_distributed("tests.test_launch:worker_agree", 2, {"stop_file": str(tmp_path / "stop")}, timeout=120)
    assert r0["signal_stopped_at"] == r1["signal_stopped_at"] == 3
    assert r1["signal_reason"] == "SIGUSR1" and r0["signal_reason"] == ""  # rank 0 learnt it by all-reduce
    assert r0["file_stopped_at"] == r1["file_stopped_at"] == 3
    assert r0["file_reason"].startswith("stop file") and r1["file_reason"] == ""


def test_requeue_respects_the_limit(monkeypatch, capsys):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert requeue() is False  # not under Slurm: nothing to do
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    monkeypatch.setenv("PRETRAIN_REQUEUE_LIMIT", "3")
    assert requeue() is False  # the limit is reached before scontrol would run
    assert "already restarted 3 times (limit 3)" in capsys.readouterr().err


# --- watchdog -----------------------------------------------------------------------------------------------
HANG = textwrap.dedent("""
    import datetime, time, torch, torch.distributed as dist
    from pretrain.launch.env import init_distributed
    from pretrain.launch.preemption import Watchdog
    denv = init_distributed(timeout_s=120)
    if denv.rank == 1:
        time.sleep(60)            # never joins the all-reduce
    dog = Watchdog(timeout_s=2.0).start()
    dog.beat(step=41, phase="all_reduce grads")
    dist.all_reduce(torch.ones(1))
""")


@pytest.mark.dist
def test_watchdog_names_rank_phase_and_step_of_a_hung_collective():
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", HANG], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stderr=subprocess.PIPE, text=True, cwd=REPO) for r in range(2)]
    try:
        t0 = time.monotonic()
        _, err = procs[0].communicate(timeout=90)
        waited = time.monotonic() - t0
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert procs[0].returncode == 124, err
    assert "WATCHDOG: rank 0/2" in err and "'all_reduce grads'" in err and "last step: 41" in err
    assert "in all_reduce" in err or "all_reduce(" in err  # the faulthandler stack shows where it hangs
    assert waited < 60  # well before the 120 s collective timeout


# --- local launcher -----------------------------------------------------------------------------------------
@pytest.mark.dist
@pytest.mark.parametrize("layout", ["parallel.pp=1", "parallel.pp=2"], ids=["dp2", "pp2"])
def test_launch_local_runs_two_ranks(layout, tiny_shard_prefix, tiny_tokenizer, tmp_path):
    """Two ranks under torchrun: train, and score a task on the live model at the last step (two data-parallel
    replicas split the requests, or two pipeline stages pass hidden states)."""
    ckpt = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "pretrain.cli", "launch", "local", "--nproc", "2", "--", "train",
           "configs/gpt_tiny.yaml", f"data.train=[{tiny_shard_prefix}]", f"data.tokenizer={tiny_tokenizer.path}",
           "model.vocab_size=1000", "model.num_layers=2", "model.hidden_size=32", "data.seq_length=32",
           "train.steps=2", "train.global_batch_size=4", "train.micro_batch_size=2", "train.eval_interval=2",
           "train.eval_steps=1", "train.eval_tasks=kjv_cont", "train.eval_tasks_limit=10",
           f"checkpoint.dir={ckpt}", "logging.interval=1", "logging.tensorboard=false", layout]
    ensure_local_eval_data()
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "rank 0/2" in out.stderr and "[launch] 2 rank(s) on 127.0.0.1:" in out.stderr
    records = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    # what one process scores on the saved checkpoint
    during = next(r for r in records if "eval/kjv_cont/0shot/acc" in r)
    model = load_checkpoint_model(ckpt)
    assert scalar_metrics(evaluate_tasks(model, ["kjv_cont"], 0, 10, progress=False)) == \
        {k: v for k, v in during.items() if k != "step"}


def test_the_job_exit_code_is_the_first_failing_ranks():
    assert job_exit_code([0, 0]) == 0
    assert job_exit_code([75, 75]) == job_exit_code([0, 75]) == 75  # stopped with a checkpoint: resume me
    assert job_exit_code([75, 1]) == 1 and job_exit_code([124, 1]) == 124  # the root cause, not its echo
    assert job_exit_code([2, 2]) == 2 and job_exit_code([exit_code(-9), 1]) == 137  # SIGKILL: 128 + 9


# --- checks before submitting -------------------------------------------------------------------------------
def test_bad_layouts_and_missing_data_are_refused_before_submit(tiny_shard_prefix, tiny_tokenizer, tmp_path):
    def job(nodes, gpus, *overrides):
        return SlurmJob(["train", "configs/gpt_tiny.yaml", f"data.train=[{tiny_shard_prefix}]",
                         f"data.tokenizer={tiny_tokenizer.path}", *overrides],
                        tmp_path, nodes=nodes, gpus_per_node=gpus, workdir=REPO)

    check_train_command(job(2, 2, "train.global_batch_size=16", "train.micro_batch_size=4"))  # fine
    with pytest.raises(LaunchError, match=r"3 processes are not divisible by parallel.tp x parallel.pp = 2 x 1"):
        check_train_command(job(1, 3, "parallel.tp=2"))
    with pytest.raises(LaunchError, match="global_batch_size=16 must be a multiple of .* = 16 x 2"):
        check_train_command(job(2, 1))
    with pytest.raises(LaunchError, match=r"data.train: shard .*nowhere\.bin.* not found"):
        check_train_command(job(1, 1, f"data.train=[{tmp_path}/nowhere]"))
    with pytest.raises(LaunchError, match="unknown key 'train.stepz'"):
        check_train_command(job(1, 1, "train.stepz=3"))


def test_array_job_gives_each_task_a_disjoint_share_of_inputs(tmp_path):
    for i in range(5):
        (tmp_path / f"part{i}.jsonl").write_text("{}\n")
    job = SlurmJob(["prepare", "--input", "part*.jsonl", "--tokenizer", "tok.model", "--output", "out/web",
                    "--append-eod"], tmp_path / "run", array=2, workdir=tmp_path)
    text = render_script(job)
    assert "#SBATCH --array=0-1" in text
    assert "0) INPUTS=(part0.jsonl part2.jsonl part4.jsonl); OUTPUT=out/web-00000-of-00002 ;;" in text
    assert "1) INPUTS=(part1.jsonl part3.jsonl); OUTPUT=out/web-00001-of-00002 ;;" in text
    assert 'prepare --input "${INPUTS[@]}" --output "$OUTPUT" --tokenizer tok.model --append-eod' in text
    with pytest.raises(LaunchError, match="--array 9 needs at least 9 input files"):
        render_script(SlurmJob(job.command, tmp_path / "run", array=9, workdir=tmp_path))
