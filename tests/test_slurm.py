"""`pretrain launch slurm` against a real Slurm cluster of two nodes started on this machine by
tests/slurm/cluster.sh (Debian's slurmctld/slurmd/munge, installed when missing; stopped afterwards).

Each job trains a tiny GPT on 2 nodes x 2 ranks and is compared step by step with a one-process run.
The golden-file test of a 64-node script needs no cluster. The cluster runs in loopback mode by default;
``SLURM_CI_MODE=netns`` gives every node its own network namespace, IP and hostname.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.launch.slurm import job_info, wait
from tests.dist_utils import REPO

CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
GOLDEN = REPO / "tests" / "golden" / "slurm_64node.sbatch"
STEPS = 60
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def slurm_cluster():
    if os.geteuid() != 0:
        pytest.skip("the Slurm tests install and start a private Slurm cluster, which needs root")
    up = subprocess.run([str(CLUSTER), "up"], capture_output=True, text=True, timeout=600)
    if up.returncode == 3:
        pytest.skip(f"Slurm cannot be installed here: {up.stderr.strip()[-500:]}")
    try:
        assert up.returncode == 0, f"cluster.sh up failed:\n{up.stderr[-4000:]}"
        yield
    finally:
        subprocess.run([str(CLUSTER), "down"], capture_output=True, timeout=120)


def _train_args(shard: str, tokenizer: Path, ckpt: Path) -> list[str]:
    return ["train", "configs/gpt_tiny.yaml", f"data.train=[{shard}]", f"data.tokenizer={tokenizer}",
            "model.vocab_size=1000", "model.num_layers=2", "model.hidden_size=64", "data.seq_length=64",
            f"train.steps={STEPS}", "train.global_batch_size=8", "train.micro_batch_size=2", "train.eval_interval=0",
            f"checkpoint.dir={ckpt}", "checkpoint.interval=10", "logging.interval=1", "logging.tensorboard=false"]


def _records(ckpt: Path) -> list[dict]:
    path = ckpt / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _losses(ckpt: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl (a resumed run appends; the last record of a step wins)."""
    return {r["step"]: r["loss"] for r in _records(ckpt) if "loss" in r}


@pytest.fixture(scope="module")
def data(tiny_shard_prefix, tiny_tokenizer):
    return tiny_shard_prefix, Path(tiny_tokenizer.path)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> dict[int, float]:
    """The same training in one plain process."""
    ckpt = tmp_path_factory.mktemp("reference") / "ckpt"
    out = subprocess.run([sys.executable, "-m", "pretrain.cli", *_train_args(*data, ckpt)], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    losses = _losses(ckpt)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def _submit(run_dir: Path, args: list[str], *options: str) -> str:
    """``pretrain launch slurm`` 2 nodes x 2 ranks; returns the job id. (Later tests pass --no-check: the
    pre-submit checks import torch, which costs seconds on a busy machine, and the first test covers them.)"""
    cmd = [sys.executable, "-m", "pretrain.cli", "launch", "slurm", "--nodes", "2", "--gpus-per-node", "2",
           "--run-dir", str(run_dir), "--workdir", str(REPO), *options, "--", *args]
    out = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return re.search(r"submitted job (\d+)", out.stdout).group(1)


def _log(run_dir: Path, job_id: str) -> str:
    return (run_dir / "logs" / f"gpt_tiny-{job_id}.out").read_text(errors="replace")


def _wait_for_step(ckpt: Path, job_id: str, step: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while max(_losses(ckpt), default=0) < step:
        assert time.monotonic() < deadline, f"job {job_id} did not reach step {step}: {job_info(job_id)}"
        info = job_info(job_id)
        assert info.get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), info
        assert info.get("Reason") in ("None", "Resources", "Priority", "BeginTime"), f"job {job_id} cannot run: {info}"
        time.sleep(0.1)


def _assert_same_losses(got: dict[int, float], want: dict[int, float]) -> float:
    assert sorted(got) == sorted(want)
    worst = max(abs(got[s] - want[s]) for s in want)
    assert worst < 1e-4, f"largest loss difference to the one-process run: {worst}"
    return worst


@pytest.mark.slurm
def test_two_node_job_matches_local_run(slurm_cluster, data, reference, tmp_path):
    """Also eval on save: each evaluation is an sbatch job of its own (``--cpus-per-task 1`` leaves a CPU per node
    free for it), whose results come back into the run's metrics and TensorBoard tagged with the step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t0, ckpt = time.monotonic(), tmp_path / "ckpt"
    args = [*_train_args(*data, ckpt), "checkpoint.eval_on_save=true", "checkpoint.keep_last=6",  # none pruned
            "logging.tensorboard=true"]
    job_id = _submit(tmp_path, args, "--cpus-per-task", "1")
    [info] = wait(job_id, 300)
    log = _log(tmp_path, job_id)
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert "2 nodes x 2 ranks = 4 ranks, one torchrun agent per node" in log
    assert re.search(r"rank 0/4 .* via torchrun", log)
    worst = _assert_same_losses(_losses(ckpt), reference)
    evals = dict(re.findall(r"eval on save: Slurm job (\d+) evaluates step_(\d+)", log))
    assert evals, log[-4000:]
    for eval_job, step in evals.items():
        assert job_info(eval_job)["JobState"] == "COMPLETED" and job_info(eval_job)["JobName"] == f"eval-step_{step}"
    rows = {r["step"]: r for r in _records(ckpt) if "eval_on_save/seconds" in r}
    assert sorted(rows) == sorted(int(step) for step in evals.values())  # every side job's row, tagged with its step
    assert all(r["eval_on_save/logit_max_abs_diff"] < 1e-4 for r in rows.values())
    board = EventAccumulator(str(ckpt / "tensorboard"))
    board.Reload()
    assert [e.step for e in board.Scalars("train/eval_on_save/logit_max_abs_diff")] == sorted(rows)
    print(f"2x2 job {job_id}: {time.monotonic() - t0:.1f} s, max |loss diff| vs one process {worst:.2e}; "
          f"{len(rows)} eval-on-save sbatch jobs (steps {sorted(rows)})")


def _release_requeued(run_dir: Path, job_id: str, restarts: int) -> None:
    """Wait until the job is requeued for the ``restarts``-th time, then let it start again at once."""
    deadline = time.monotonic() + 180
    while not (job_info(job_id).get("Restarts") == str(restarts) and job_info(job_id).get("JobState") == "PENDING"):
        assert time.monotonic() < deadline, f"job {job_id} was not requeued: {job_info(job_id)}"
        assert job_info(job_id).get("JobState") not in ("COMPLETED", "FAILED"), _log(run_dir, job_id)[-4000:]
        time.sleep(0.2)
    # skip Slurm's 2-minute hold of a requeued job, but not within the second of the requeue: slurmd refuses a
    # launch credential issued in the same second as the revoked one ("Job credential revoked")
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)


@pytest.mark.slurm
def test_preempted_job_requeues_and_resumes(slurm_cluster, data, reference, tmp_path):
    """Two stops in one job: a planned exit (``train.exit_at_step``: exit 75 and the stop file, no signal), then
    Slurm's time-limit warning (SIGUSR1); each is requeued and resumes exactly. ``--exit-before-time`` reaches the
    trainer as ``train.exit_after_minutes`` (--time 60 minus 50 minutes: not due in this test)."""
    ckpt = tmp_path / "ckpt"
    job_id = _submit(tmp_path, [*_train_args(*data, ckpt), "train.exit_at_step=3"], "--requeue-limit", "2",
                     "--time", "60", "--exit-before-time", "50", "--no-check")
    assert "train.exit_at_step=3 --resume auto train.exit_after_minutes=10.0" in (tmp_path / "job.sbatch").read_text()
    assert job_info(job_id)["TimeLimit"] == "01:00:00"
    _release_requeued(tmp_path, job_id, 1)  # the planned exit at step 3
    _wait_for_step(ckpt, job_id, 5)  # the requeued run, resumed at step 3, trains on past it
    # what Slurm sends --signal-seconds before the time limit (--signal=B:USR1@S): USR1 to the batch shell
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
    _release_requeued(tmp_path, job_id, 2)
    [info] = wait(job_id, 300)
    log = _log(tmp_path, job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "2", log[-4000:]
    assert "stop requested (train.exit_at_step=3): checkpoint at step 3" in log
    assert "time-limit warning (SIGUSR1)" in log and "requeueing job" in log
    assert len(re.findall(r"node n[12] \(node rank \d\) stopped on request", log)) >= 2  # both stops, both nodes
    stop_step = int(re.search(r"stop requested \(stop file .*\): checkpoint at step (\d+)", log).group(1))
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", log)]
    assert resumed == [3, stop_step] and 5 <= stop_step < STEPS
    assert "(restart 1)" in log and "(restart 2)" in log
    worst = _assert_same_losses(_losses(ckpt), reference)
    print(f"exit at step 3 and preempted at step {stop_step}, resumed both times; max |loss diff| {worst:.2e}")


def _rank_pid(job_id: str, rank: int) -> int | None:
    """PID of the Python process of Slurm task ``rank`` in job ``job_id`` (from /proc/*/environ)."""
    for proc in Path("/proc").iterdir():
        try:
            if b"pretrain.cli" not in (proc / "cmdline").read_bytes() or (proc / "comm").read_text().strip() == "bash":
                continue
            env = dict(v.split(b"=", 1) for v in (proc / "environ").read_bytes().split(b"\0") if b"=" in v)
        except OSError:
            continue
        if env.get(b"SLURM_JOB_ID") == job_id.encode() and env.get(b"SLURM_PROCID") == str(rank).encode():
            return int(proc.name)
    return None


@pytest.mark.slurm
def test_killed_rank_ends_job_fast_and_relaunch_resumes(slurm_cluster, data, reference, tmp_path):
    ckpt, args = tmp_path / "ckpt", _train_args(*data, tmp_path / "ckpt")
    job_id = _submit(tmp_path, args, "--task-per-rank", "--no-check")
    _wait_for_step(ckpt, job_id, 12)  # past the step-10 checkpoint
    pid = _rank_pid(job_id, 1)
    assert pid is not None
    os.kill(pid, 9)
    t0 = time.monotonic()
    [info] = wait(job_id, 60)
    ended_after = time.monotonic() - t0
    log = _log(tmp_path, job_id)
    assert info["JobState"] == "FAILED" and ended_after < 30, (ended_after, log[-4000:])
    assert re.search(r"rank 1 on node n[12] failed with exit code 137 \(signal 9\)", log), log[-4000:]
    assert max(_losses(ckpt)) < STEPS

    relaunch = _submit(tmp_path, args, "--task-per-rank", "--no-check")
    [info] = wait(relaunch, 300)
    log2 = _log(tmp_path, relaunch)
    assert info["JobState"] == "COMPLETED", log2[-4000:]
    assert int(re.search(r"resumed from \S+ at step (\d+)", log2).group(1)) >= 10
    worst = _assert_same_losses(_losses(ckpt), reference)
    print(f"job ended {ended_after:.1f} s after SIGKILL of rank 1; relaunch matched, max |loss diff| {worst:.2e}")


@pytest.mark.slurm
def test_prepare_array_job_splits_inputs_across_tasks(slurm_cluster, tiny_corpus, tiny_tokenizer, tmp_path):
    lines = tiny_corpus.read_text().splitlines(keepends=True)
    for i in range(3):
        (tmp_path / f"part{i}.jsonl").write_text("".join(lines[i::3]))
    cmd = [sys.executable, "-m", "pretrain.cli", "launch", "slurm", "--array", "2", "--run-dir", str(tmp_path / "run"),
           "--workdir", str(tmp_path), "--", "prepare", "--input", "part*.jsonl", "--tokenizer",
           str(tiny_tokenizer.path), "--output", "out/web", "--append-eod", "--no-progress"]
    out = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    records = wait(re.search(r"submitted job (\d+)", out.stdout).group(1), 120)
    assert [r["JobState"] for r in records] == ["COMPLETED", "COMPLETED"], records
    metas = [json.loads((tmp_path / f"out/web-0000{i}-of-00002.json").read_text()) for i in range(2)]
    assert sum(m["documents"] for m in metas) == len(lines)  # every document once, split over the 2 tasks
    assert all(m["documents"] > 0 for m in metas)


def test_dry_run_script_for_64_nodes_matches_golden_file():
    cmd = [sys.executable, "-m", "pretrain.cli", "launch", "slurm", "--nodes", "64", "--gpus-per-node", "8",
           "--partition", "gpu", "--time", "2-00:00:00", "--account", "llm", "--qos", "high", "--constraint", "h100",
           "--exclusive", "--mem", "0", "--cpus-per-task", "96", "--requeue-limit", "5", "--signal-seconds", "600",
           "--python", "/opt/pretrain/venv/bin/python", "--workdir", "/shared/pretrain",
           "--run-dir", "/shared/pretrain/runs/gpt_7b", "--no-check", "--dry-run", "--",
           "train", "configs/gpt_7b.yaml", "parallel.tp=8", "data.train=[/shared/data/web_text_document]"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    if os.environ.get("PRETRAIN_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(out.stdout)
    assert out.stdout == GOLDEN.read_text(), f"regenerate with PRETRAIN_UPDATE_GOLDEN=1 if intended:\n{out.stdout}"
    assert subprocess.run(["bash", "-n", str(GOLDEN)]).returncode == 0  # the script parses


@pytest.mark.parametrize("task_per_rank, cpus, env, want", [
    (False, None, {"SLURM_CPUS_ON_NODE": "96"}, 96),  # default: whole node, all its CPUs to the torchrun task
    (True, None, {"SLURM_CPUS_ON_NODE": "96"}, 12),  # one task per rank: the node's CPUs / 8
    (True, 10, {"SLURM_CPUS_ON_NODE": "96", "SLURM_CPUS_PER_TASK": "10"}, 10)])
def test_srun_gets_cpus_per_task(task_per_rank, cpus, env, want, tmp_path):
    """srun does not inherit sbatch's --cpus-per-task (Slurm >= 22.05): without it one CPU feeds 8 ranks."""
    from pretrain.launch.slurm import SlurmJob, render_script

    job = SlurmJob(command=["train", "c.yaml"], run_dir=tmp_path, nodes=2, gpus_per_node=8, cpus_per_task=cpus,
                   task_per_rank=task_per_rank)
    text = render_script(job)
    header = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert ("#SBATCH --exclusive" in header) == (cpus is None)  # no CPU count given: take whole nodes
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    assert '--cpus-per-task="$CPUS_PER_TASK"' in srun
    assign = next(line for line in text.splitlines() if line.startswith("CPUS_PER_TASK="))
    out = subprocess.run(["bash", "-c", f'{assign}\necho "$CPUS_PER_TASK"'], env={"PATH": os.environ["PATH"], **env},
                         capture_output=True, text=True)
    assert int(out.stdout) == want, out.stderr
