"""``pretrain launch slurm``: write a readable sbatch script into the run directory and submit it.

The script (``RUN_DIR/job.sbatch``, resubmittable by hand) runs one ``srun`` task per node that starts
torchrun with a c10d rendezvous on the allocation's first node (or, with ``--task-per-rank``, one srun task
per rank and no torchrun). ``--kill-on-bad-exit=1`` ends the whole job seconds after any rank dies. srun gets
``--cpus-per-task`` explicitly (it no longer inherits sbatch's): ``--cpus-per-task`` if given, else the job takes
whole nodes (``--exclusive``) and each task gets the node's CPUs / tasks per node.
Slurm sends the batch shell SIGUSR1 ``--signal-seconds`` before the time limit; the script then creates
``RUN_DIR/stop-requested``, the trainer checkpoints and exits (code 75), and the script requeues the job
(at most ``--requeue-limit`` times); the requeued run resumes with ``--resume auto``.

``--array N -- prepare --input FILES... --output PREFIX`` splits the input files into N disjoint groups, one
per array task, each writing ``PREFIX-0000i-of-0000N``.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


class LaunchError(ValueError):
    """The launch request cannot work (bad layout, missing files, Slurm refused it); the message says why."""


@dataclass
class SlurmJob:
    """Everything the job script depends on."""

    command: list[str]  # the pretrain subcommand and its arguments, e.g. ["train", "cfg.yaml", "train.steps=10"]
    run_dir: Path
    nodes: int = 1
    gpus_per_node: int = 1  # ranks per node; also requested as GPUs unless gres is off (CPU clusters)
    request_gpus: bool = True
    job_name: str = "pretrain"
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    mem: str | None = None
    cpus_per_task: int | None = None  # per srun task (per node with torchrun); None: --exclusive, all the CPUs
    requeue_limit: int = 3
    signal_seconds: int = 300
    exit_before_time: float | None = None  # minutes: train.exit_after_minutes = --time minus this (pretrain/exits.py)
    task_per_rank: bool = False
    array: int | None = None
    python: str = sys.executable
    workdir: Path = field(default_factory=Path.cwd)
    check: bool = True  # validate config, layout and data files before submitting

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


def _q(args) -> str:
    return " ".join(shlex.quote(str(a)) for a in args)


def _header(job: SlurmJob) -> list[str]:
    tasks = job.gpus_per_node if job.task_per_rank and not job.array else 1
    opts = [("job-name", job.job_name), ("nodes", job.nodes), ("ntasks-per-node", tasks)]
    if job.request_gpus and job.gpus_per_node and not job.array:
        opts.append(("gpus-per-node", job.gpus_per_node))
    opts += [("cpus-per-task", job.cpus_per_task), ("partition", job.partition), ("time", job.time),
             ("account", job.account), ("qos", job.qos), ("constraint", job.constraint), ("mem", job.mem)]
    lines = [f"#SBATCH --{k}={v}" for k, v in opts if v is not None]
    if job.exclusive or (job.cpus_per_task is None and not job.array):  # no CPU count given: whole nodes
        lines.append("#SBATCH --exclusive")
    if job.array:
        lines += [f"#SBATCH --array=0-{job.array - 1}", f"#SBATCH --output={job.run_dir}/logs/%x-%A_%a.out"]
    else:
        lines += ["# a requeued run appends to the same log; SIGUSR1 to the batch shell before the time limit",
                  f"#SBATCH --output={job.run_dir}/logs/%x-%j.out", "#SBATCH --open-mode=append",
                  "#SBATCH --requeue", f"#SBATCH --signal=B:USR1@{job.signal_seconds}"]
    lines.append(f"#SBATCH --chdir={job.workdir}")
    return lines


_TRAIN_BODY = """\
set -uo pipefail
RUN_DIR={run_dir}
PYTHON={python}
export PRETRAIN_STOP_FILE="$RUN_DIR/stop-requested"  # the trainer's rank 0 watches it (launch/preemption.py)
export PRETRAIN_REQUEUE_LIMIT={requeue_limit}
export PRETRAIN_JOB_SCRIPT_REQUEUES=1                 # this script requeues, once every rank has exited
rm -f "$PRETRAIN_STOP_FILE"                           # left over from the run before a requeue
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
# srun does not inherit sbatch's --cpus-per-task (Slurm >= 22.05): each task gets its share of the node's CPUs
CPUS_PER_TASK=${{SLURM_CPUS_PER_TASK:-$((SLURM_CPUS_ON_NODE / {tasks}))}}
echo "[pretrain] $(date +%T) job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) on $SLURM_JOB_NODELIST," \\
     "{layout}, $CPUS_PER_TASK CPUs per task, rendezvous $MASTER_ADDR:$MASTER_PORT"

preempted=0
on_warning() {{
  preempted=1
  echo "[pretrain] $(date +%T) time-limit warning (SIGUSR1): asking the trainer to checkpoint and stop"
  touch "$PRETRAIN_STOP_FILE"
}}
trap on_warning USR1

{srun} bash -c '
  {launch}
  rc=$?
  if [ $rc != 0 ] && [ -e "$PRETRAIN_STOP_FILE" ]; then
    echo "[pretrain] $(date +%T) {who} stopped on request (exit code $rc)" >&2
  elif [ $rc != 0 ]; then
    echo "[pretrain] $(date +%T) {who} failed with exit code $rc$([ $rc -gt 128 ] && echo " (signal $((rc - 128)))")" >&2
  fi
  exit $rc' "$PYTHON" {command} &
srun_pid=$!
wait $srun_pid; rc=$?
while kill -0 $srun_pid 2>/dev/null; do wait $srun_pid; rc=$?; done  # a trapped signal interrupts wait

if {{ [ $preempted = 1 ] || [ -e "$PRETRAIN_STOP_FILE" ]; }} && [ $rc != 0 ]; then
  # the trainer exits 75 after its checkpoint (torchrun reports that as a failure: expected here); it makes the
  # stop file itself when it stops for train.exit_at_step / train.exit_after_minutes
  echo "[pretrain] $(date +%T) stopped on request; requeueing to resume from the checkpoint"
  "$PYTHON" -m pretrain.launch.preemption requeue && exit 0   # at most PRETRAIN_REQUEUE_LIMIT times
fi
echo "[pretrain] $(date +%T) job $SLURM_JOB_ID finished with exit code $rc"
exit $rc
"""

_PER_NODE = ('"$0" -m torch.distributed.run --nnodes="$SLURM_NNODES" --nproc-per-node={gpus} \\\n'
             '    --rdzv-id="$SLURM_JOB_ID" --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" \\\n'
             '    --max-restarts=0 -m pretrain.cli "$@"')

_ARRAY_BODY = """\
set -euo pipefail
PYTHON={python}
case $SLURM_ARRAY_TASK_ID in
{cases}
esac
echo "[pretrain] array task $SLURM_ARRAY_TASK_ID of {n}: ${{#INPUTS[@]}} input file(s) -> $OUTPUT"
srun --kill-on-bad-exit=1 "$PYTHON" -m pretrain.cli prepare --input "${{INPUTS[@]}}" --output "$OUTPUT" {rest}
"""


def render_script(job: SlurmJob) -> str:
    """The sbatch script text (deterministic: the golden test compares it byte for byte)."""
    if job.array:
        return _render_array(job)
    per_node = not job.task_per_rank
    layout = (f"{job.nodes} nodes x {job.gpus_per_node} ranks = {job.world_size} ranks, "
              + ("one torchrun agent per node" if per_node else "one srun task per rank"))
    tasks = 1 if per_node else job.gpus_per_node
    srun = f'srun --kill-on-bad-exit=1 --ntasks-per-node={tasks} --cpus-per-task="$CPUS_PER_TASK"'
    if per_node:
        launch, who = _PER_NODE.format(gpus=job.gpus_per_node), "node $SLURMD_NODENAME (node rank $SLURM_NODEID)"
    else:
        launch, who = '"$0" -m pretrain.cli "$@"', "rank $SLURM_PROCID on node $SLURMD_NODENAME"
    body = _TRAIN_BODY.format(run_dir=shlex.quote(str(job.run_dir)), python=shlex.quote(job.python),
                              requeue_limit=job.requeue_limit, layout=layout, tasks=tasks, srun=srun, launch=launch,
                              who=who, command=_q(job.command))
    intro = [f"# Written by `pretrain launch slurm`: {layout}.",
             f"# Resubmit with: sbatch {job.run_dir}/job.sbatch"]
    return "\n".join(["#!/bin/bash", *intro, *_header(job), "", body])


def _render_array(job: SlurmJob) -> str:
    inputs, output, rest = split_prepare_inputs(job.command, job.array, job.workdir)
    cases = "\n".join(f"  {i}) INPUTS=({_q(files)}); OUTPUT={shlex.quote(f'{output}-{i:05d}-of-{job.array:05d}')} ;;"
                      for i, files in enumerate(inputs))
    body = _ARRAY_BODY.format(python=shlex.quote(job.python), cases=cases, n=job.array, rest=_q(rest))
    intro = [f"# Written by `pretrain launch slurm --array {job.array}`: one `pretrain prepare` per array task,",
             "# each on its own disjoint share of the input files."]
    return "\n".join(["#!/bin/bash", *intro, *_header(job), "", body])


def split_prepare_inputs(command: list[str], n: int, workdir: Path) -> tuple[list[list[str]], str, list[str]]:
    """``prepare --input A B C --output P ...`` -> (N disjoint input groups, P, the other arguments)."""
    if not command or command[0] != "prepare":
        raise LaunchError("--array splits `prepare` work: give `-- prepare --input FILES... --output PREFIX`")
    patterns, output, rest, i, args = [], None, [], 1, command
    while i < len(args):
        if args[i] == "--input":
            i += 1
            while i < len(args) and not args[i].startswith("--"):
                patterns.append(args[i])
                i += 1
        elif args[i] == "--output" and i + 1 < len(args):
            output, i = args[i + 1], i + 2
        else:
            rest.append(args[i])
            i += 1
    if not patterns or output is None:
        raise LaunchError("prepare needs --input FILES... and --output PREFIX")
    files = []
    for pat in patterns:
        matches = sorted(glob.glob(str(workdir / pat) if not os.path.isabs(pat) else pat))
        if not matches:
            raise LaunchError(f"--input {pat}: no such file")
        files += [os.path.relpath(m, workdir) if not os.path.isabs(pat) else m for m in matches]
    if len(files) < n:
        raise LaunchError(f"--array {n} needs at least {n} input files, got {len(files)}: {files}")
    return [files[i::n] for i in range(n)], output, rest


def check_train_command(job: SlurmJob) -> None:
    """The pre-flight check (:mod:`pretrain.preflight`: config, layout for ``nodes x gpus`` ranks, data files) of
    the job's command, so that what would fail only after the allocation starts fails now."""
    if job.nodes < 1 or job.gpus_per_node < 1:
        raise LaunchError(f"--nodes and --gpus-per-node must be >= 1, got {job.nodes} and {job.gpus_per_node}")
    from pretrain.configlib import ConfigError
    from pretrain.preflight import check_command

    try:
        cfg = check_command(job.command, job.world_size, root=job.workdir)
    except ConfigError as e:
        raise LaunchError(f"{job.nodes} nodes x {job.gpus_per_node} GPUs: {e}") from None
    if cfg is not None and not cfg.checkpoint.dir:
        print("warning: checkpoint.dir is not set: a preempted or failed job cannot resume", file=sys.stderr)


def exit_after_minutes(job: SlurmJob) -> float:
    """``train.exit_after_minutes`` for ``--exit-before-time M``: the ``--time`` limit minus M minutes."""
    from pretrain.exits import slurm_minutes

    if job.command[:1] != ["train"] or not job.time:
        raise LaunchError("--exit-before-time needs --time and a train command (it sets train.exit_after_minutes)")
    minutes = slurm_minutes(job.time) - job.exit_before_time
    if job.exit_before_time <= 0 or minutes <= 0:
        raise LaunchError(f"--exit-before-time {job.exit_before_time:g} must be > 0 and less than --time {job.time} "
                          f"({slurm_minutes(job.time):g} minutes)")
    return round(minutes, 2)


def prepare_job(job: SlurmJob) -> str:
    """Validate, then return the script; ``train`` jobs get ``--resume auto`` so requeued runs continue."""
    if job.command[:1] == ["train"] and "--resume" not in job.command:
        job.command = [*job.command, "--resume", "auto"]
    if job.exit_before_time is not None:
        job.command = [*job.command, f"train.exit_after_minutes={exit_after_minutes(job)}"]
    if job.check and not job.array:
        check_train_command(job)
    return render_script(job)


def _slurm(*cmd: str) -> subprocess.CompletedProcess:
    """Run a Slurm client command; a missing one is a clear error, not a traceback."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise LaunchError(f"`{cmd[0]}` not found: run this where Slurm's client commands are installed "
                          f"(a login node), or use --dry-run to see the script") from None


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "(no message)"


def write_script(job: SlurmJob, text: str) -> Path:
    (job.run_dir / "logs").mkdir(parents=True, exist_ok=True)
    path = job.run_dir / "job.sbatch"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    return path


def submit(job: SlurmJob) -> str:
    """Write ``RUN_DIR/job.sbatch``, submit it, record the job id in ``RUN_DIR/jobs.txt``; returns the id."""
    path = write_script(job, prepare_job(job))
    out = _slurm("sbatch", "--parsable", str(path))
    if out.returncode != 0:
        raise LaunchError(f"sbatch refused {path}: {_last_line(out.stderr or out.stdout)}")
    job_id = out.stdout.strip().split(";")[0]
    with open(job.run_dir / "jobs.txt", "a") as f:
        f.write(f"{job_id}\n")
    return job_id


def submit_side_job(argv: list[str], name: str, output: Path, options: list[str]) -> str:
    """``sbatch`` a one-task job running ``argv`` in this process's working directory and environment, with extra
    sbatch ``options``; returns its id. Used for the side jobs of a training job (:mod:`pretrain.eval_on_save`)."""
    out = _slurm("sbatch", "--parsable", f"--job-name={name}", f"--output={output}", "--ntasks=1",
                 f"--chdir={os.getcwd()}", *options, "--wrap", _q(argv))
    if out.returncode != 0:
        raise LaunchError(f"sbatch refused the side job {name}: {_last_line(out.stderr or out.stdout)}")
    return out.stdout.strip().split(";")[0]


# --- status / logs / cancel of a run directory ---------------------------------------------------------------
def last_job_id(run_dir: Path) -> str:
    ids = (run_dir / "jobs.txt").read_text().split() if (run_dir / "jobs.txt").is_file() else []
    if not ids:
        raise LaunchError(f"{run_dir}: no jobs.txt: was it submitted with `pretrain launch slurm`?")
    return ids[-1]


def job_records(job_id: str) -> list[dict[str, str]]:
    """``scontrol show job`` as dicts, one per job (or array task); empty once Slurm forgot the job
    (MinJobAge after it ended)."""
    out = _slurm("scontrol", "show", "job", "-o", job_id)
    if out.returncode != 0 and "Invalid job id" in out.stderr:
        return []
    if out.returncode != 0:
        raise LaunchError(f"scontrol show job {job_id}: {_last_line(out.stderr)}")
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.stdout.splitlines() if line.strip()]


def job_info(job_id: str) -> dict[str, str]:
    records = job_records(job_id)
    return records[0] if records else {}


def status(run_dir: Path) -> str:
    job_id = last_job_id(run_dir)
    records = job_records(job_id)
    if not records:
        return f"job {job_id}: no longer known to Slurm (finished); see `pretrain launch logs {run_dir}`"
    return "\n".join(f"job {r.get('JobId')}: {r.get('JobState')} (reason {r.get('Reason')}), restarts "
                     f"{r.get('Restarts')}, run time {r.get('RunTime')} of {r.get('TimeLimit')}, nodes "
                     f"{r.get('NodeList')}, exit code {r.get('ExitCode')}" for r in records)


def log_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "logs").glob("*.out"), key=lambda p: p.stat().st_mtime)


def logs(run_dir: Path, follow: bool = False) -> None:
    files = log_files(run_dir)
    if not files:
        raise LaunchError(f"{run_dir}/logs: no log files yet (job pending?)")
    if follow:
        os.execvp("tail", ["tail", "-n", "+1", "-F", str(files[-1])])
    sys.stdout.write(files[-1].read_text(errors="replace"))


def cancel(run_dir: Path) -> str:
    job_id = last_job_id(run_dir)
    out = _slurm("scancel", job_id)
    if out.returncode != 0:
        raise LaunchError(f"scancel {job_id} failed: {_last_line(out.stderr)}")
    return job_id


FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


def wait(job_id: str, timeout_s: float, poll_s: float = 0.5) -> list[dict[str, str]]:
    """Poll until the job (every task of an array) has finished; returns the final ``scontrol`` records."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        records = job_records(job_id)
        if all(r.get("JobState") in FINAL_STATES for r in records):
            return records
        time.sleep(poll_s)
    raise TimeoutError(f"job {job_id} not finished after {timeout_s:g} s: {job_records(job_id)}")
