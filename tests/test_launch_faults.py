"""Faults around a training job, with real processes (issue 13 items 2, 5, 7): the ranks of `pretrain launch
local` die with their launcher, stop signals to the launcher reach the ranks (save, exit 75), the ranks' exit code is
the job's, one writer per checkpoint.dir, and a stop signal ends a step that can never finish."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from pretrain import checkpoint as ckpt
from tests.dist_utils import REPO

pytestmark = pytest.mark.dist


def _train_args(prefix: str, tokenizer, ckpt_dir: Path, *extra: str) -> list[str]:
    return ["train", "configs/gpt_tiny.yaml", f"data.train=[{prefix}]", f"data.tokenizer={tokenizer.path}",
            "model.vocab_size=1000", "model.num_layers=2", "model.hidden_size=32", "data.seq_length=32",
            "train.steps=20000", "train.global_batch_size=4", "train.micro_batch_size=2", "train.eval_interval=0",
            "checkpoint.interval=0", f"checkpoint.dir={ckpt_dir}", "logging.interval=1",
            "logging.tensorboard=false", *extra]


class Jobs:
    """Starts `pretrain ...` processes with output to files; kills what is left of them (and their ranks)."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.procs: list[subprocess.Popen] = []
        self.pids: set[int] = set()

    def start(self, args: list[str], name: str, env: dict | None = None,
              python: tuple[str, ...] = ("-m", "pretrain.cli")) -> subprocess.Popen:
        out, err = open(self.tmp / f"{name}.out", "w"), open(self.tmp / f"{name}.err", "w")
        proc = subprocess.Popen([sys.executable, *python, *args], cwd=REPO, stdout=out, stderr=err,
                                env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        self.procs.append(proc)
        return proc

    def err(self, name: str) -> str:
        return (self.tmp / f"{name}.err").read_text() + (self.tmp / f"{name}.out").read_text()

    def ranks(self, proc: subprocess.Popen) -> list[int]:
        """The training processes under ``proc`` (with torchrun, its children)."""
        pids = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)
                if "pretrain.cli" in " ".join(c.cmdline())]
        self.pids.update(pids)
        return pids

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                self.pids.update(c.pid for c in psutil.Process(proc.pid).children(recursive=True))
                proc.kill()
                proc.wait()
        for pid in self.pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def jobs(tmp_path):
    j = Jobs(tmp_path)
    yield j
    j.kill_all()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_for(what, condition, proc: subprocess.Popen, jobs: Jobs, name: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"{name} ended (exit {proc.returncode}) before {what}:\n{jobs.err(name)[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s:\n{jobs.err(name)[-3000:]}"
        time.sleep(0.2)


def _trained_a_step(ckpt_dir: Path):
    return lambda: '"loss"' in ((ckpt_dir / "metrics.jsonl").read_text() if (ckpt_dir / "metrics.jsonl").exists()
                                else "")


def _training_job(jobs: Jobs, ck: Path, prefix: str, tokenizer) -> tuple[subprocess.Popen, list[int]]:
    """A 2-rank `launch local` job that has trained a step; (launcher, rank pids)."""
    job = jobs.start(["launch", "local", "--nproc", "2", "--", *_train_args(prefix, tokenizer, ck)], "job")
    _wait_for("first step", _trained_a_step(ck), job, jobs, "job")
    ranks = jobs.ranks(job)
    assert len(ranks) == 2
    return job, ranks


def _wait_exit(proc: subprocess.Popen, timeout: float = 180) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"pid {proc.pid} still running {timeout:.0f} s later")


def test_sigusr1_to_the_launcher_saves_and_exits_75_and_a_second_writer_is_refused(
        jobs, tiny_shard_prefix, tiny_tokenizer, tmp_path):
    ck = tmp_path / "ck"
    job, ranks = _training_job(jobs, ck, tiny_shard_prefix, tiny_tokenizer)

    # a second job on the same checkpoint.dir: refused before it writes anything, its ranks' exit code 2 is the job's
    second = jobs.start(["launch", "local", "--nproc", "2", "--",
                         *_train_args(tiny_shard_prefix, tiny_tokenizer, ck), "--resume", "auto"], "second")
    assert _wait_exit(second) == 2, jobs.err("second")[-3000:]
    refusal = [line for line in jobs.err("second").splitlines() if "is in use by pid" in line]
    assert refusal and f"on {socket.gethostname()}" in refusal[0] and "checkpoint.dir" in refusal[0], refusal
    assert job.poll() is None and all(_alive(p) for p in ranks)  # the first job is untouched

    os.kill(job.pid, signal.SIGUSR1)  # the documented save-and-stop signal, to the launcher only
    assert _wait_exit(job) == 75, jobs.err("job")[-3000:]
    assert not any(_alive(p) for p in ranks)
    saved = ckpt.resolve(str(ck))
    assert saved is not None and int(saved.name.removeprefix("step_")) >= 1
    assert "FAILED" not in jobs.err("job")  # a clean preemption is no failure
    from pretrain import run_lock

    run_lock.acquire(ck)  # released when the job ended
    run_lock.release(ck)


def test_sigkill_of_the_launcher_takes_its_ranks_down(jobs, tiny_shard_prefix, tiny_tokenizer, tmp_path):
    ck = tmp_path / "ck"
    job, ranks = _training_job(jobs, ck, tiny_shard_prefix, tiny_tokenizer)
    job.kill()  # SIGKILL, as the OOM killer does
    job.wait()
    deadline = time.monotonic() + 30  # a bound on "never", not a speed requirement
    while any(_alive(p) for p in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in ranks if _alive(p)], "ranks outlived their launcher"


# Rank 1 stalls in its first optimizer step (a global optimizer hook, installed at interpreter start through a
# sitecustomize module on PYTHONPATH): the hang watchdog must fire, whatever the speed of the machine. Rank 0's
# first optimizer step takes 2 s, as on a loaded machine: its last beat (the next step's) comes 2 s after rank
# 1's, so its watchdog fires after rank 1's, which must not exit before rank 0 has left its stacks.
STALL = textwrap.dedent("""
    import os
    import time
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    if os.environ.get("RANK") == "1":
        register_optimizer_step_pre_hook(lambda *args: time.sleep(3600))
    else:
        first = []
        register_optimizer_step_pre_hook(lambda *args: first or first.append(time.sleep(2)))
""")


def test_the_ranks_exit_code_is_the_jobs(jobs, tiny_shard_prefix, tiny_tokenizer, tmp_path):
    """The hang watchdog's 124 (rank 1 never finishes its first step) is not turned into 1."""
    ck, hooks = tmp_path / "ck", tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(STALL)
    env = {"PRETRAIN_WATCHDOG_TIMEOUT": "5", "PYTHONPATH": os.pathsep.join([str(hooks), str(REPO)])}
    job = jobs.start(["launch", "local", "--nproc", "2", "--", *_train_args(tiny_shard_prefix, tiny_tokenizer, ck)],
                     "job", env=env)
    assert _wait_exit(job, 300) == 124, jobs.err("job")[-3000:]
    assert "WATCHDOG" in jobs.err("job")
    # every rank's stacks in the run directory: rank 1 in its optimizer hook, rank 0 waiting for it
    stacks = {r: (ck / f"hang_rank{r:05d}.txt").read_text() for r in (0, 1)}
    assert "in <lambda>" in stacks[1] and "'train step'; last step: 0" in stacks[1], stacks[1]
    assert stacks[0].startswith("rank 0 on ") and "trainer.py" in stacks[0], stacks[0]


# A training process whose data never arrives after the first `ok` samples (as a data pipeline looping forever
# does): the dataset touches FLAG when it starts looping.
STUCK = textwrap.dedent("""
    import sys
    from pathlib import Path
    import pretrain.train as train_mod
    from pretrain.cli import main

    FLAG, OK = Path(sys.argv[1]), int(sys.argv[2])
    build = train_mod.build_datasets

    class Stuck:
        def __init__(self, data):
            self.data, self.calls = data, 0
        def __len__(self):
            return len(self.data)
        def __getitem__(self, i):
            self.calls += 1
            if self.calls > OK:
                FLAG.touch()
                while True:
                    pass
            return self.data[i]

    def stuck_datasets(cfg):
        train, valid = build(cfg)
        return Stuck(train), valid

    train_mod.build_datasets = stuck_datasets
    sys.exit(main(sys.argv[3:]))
""")


def test_a_stop_signal_before_the_first_step_exits_at_once(jobs, tiny_shard_prefix, tiny_tokenizer, tmp_path):
    ck, flag = tmp_path / "ck", tmp_path / "looping"
    proc = jobs.start([str(flag), "0", *_train_args(tiny_shard_prefix, tiny_tokenizer, ck)], "job",
                      python=("-c", STUCK))
    _wait_for("looping data", flag.exists, proc, jobs, "job")
    os.kill(proc.pid, signal.SIGTERM)
    assert _wait_exit(proc, 60) == 75, jobs.err("job")[-3000:]  # nothing new to save: resume from where it was
    assert "before the first step" in jobs.err("job") and ckpt.resolve(str(ck)) is None


def test_a_second_stop_signal_ends_a_step_that_never_finishes(jobs, tiny_shard_prefix, tiny_tokenizer, tmp_path):
    ck, flag = tmp_path / "ck", tmp_path / "looping"
    proc = jobs.start([str(flag), "4", *_train_args(tiny_shard_prefix, tiny_tokenizer, ck)], "job",
                      python=("-c", STUCK))
    _wait_for("first step", _trained_a_step(ck), proc, jobs, "job")
    _wait_for("looping data", flag.exists, proc, jobs, "job")
    os.kill(proc.pid, signal.SIGTERM)  # waits for the end of the step, which never comes
    _wait_for("stop request", lambda: "stop requested (SIGTERM)" in jobs.err("job"), proc, jobs, "job")
    os.kill(proc.pid, signal.SIGTERM)
    assert _wait_exit(proc, 60) == 128 + signal.SIGTERM, jobs.err("job")[-3000:]
    assert "second stop signal" in jobs.err("job")
