"""``pretrain launch local|slurm|status|logs|cancel|wait``.

    pretrain launch local --nproc 2 -- train configs/gpt_tiny.yaml train.micro_batch_size=8 train.steps=100
    pretrain launch slurm --nodes 4 --gpus-per-node 8 --time 24:00:00 -- train configs/gpt_1.3b.yaml
    pretrain launch status runs/gpt_1.3b     # also: logs [-f], cancel, wait
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pretrain.launch import slurm


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = __doc__.split("\n\n", 1)[1]
    sub = p.add_subparsers(dest="mode", required=True)

    loc = sub.add_parser("local", help="N processes on this machine (they die with the launcher)")
    loc.add_argument("--nproc", type=int, default=1, help="number of ranks (default 1)")
    loc.add_argument("--dry-run", action="store_true",
                     help="run the pre-flight checks, print the command, start nothing")
    loc.add_argument("command", nargs=argparse.REMAINDER, help="-- train CONFIG [overrides]")

    s = sub.add_parser("slurm", help="write RUN_DIR/job.sbatch and submit it with sbatch")
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--gpus-per-node", type=int, default=1, help="ranks (GPUs) per node")
    s.add_argument("--no-gres", action="store_true", help="do not request GPUs (CPU-only clusters)")
    for opt in ("partition", "time", "account", "qos", "constraint", "mem"):
        s.add_argument(f"--{opt}")
    s.add_argument("--exclusive", action="store_true", help="whole nodes")
    s.add_argument("--cpus-per-task", type=int, help="CPUs for each srun task (per node with torchrun)")
    s.add_argument("--job-name", default=None, help="default: the config file's name")
    s.add_argument("--run-dir", type=Path, help="job script, logs and job ids (default runs/JOB_NAME)")
    s.add_argument("--requeue-limit", type=int, default=3, help="requeue after preemption at most K times")
    s.add_argument("--signal-seconds", type=int, default=300,
                   help="seconds before the time limit at which to checkpoint and requeue (default 300)")
    s.add_argument("--exit-before-time", type=float, metavar="MINUTES",
                   help="train: save, exit 75 and requeue MINUTES before --time (sets train.exit_after_minutes)")
    s.add_argument("--task-per-rank", action="store_true", help="one srun task per rank instead of torchrun per node")
    s.add_argument("--array", type=int, help="N array tasks for `prepare`, each on a disjoint share of the inputs")
    s.add_argument("--python", default=sys.executable, help="Python on the compute nodes (default: this one)")
    s.add_argument("--workdir", type=Path, default=Path.cwd(), help="directory the job runs in (default: here)")
    s.add_argument("--no-check", action="store_true", help="skip the config/layout/data checks")
    s.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    s.add_argument("command", nargs=argparse.REMAINDER, help="-- train CONFIG [overrides] | -- prepare ...")
    for parser in (loc, s):  # the planner's memory check of a train command (pretrain.plan.guard)
        parser.add_argument("--gpu", help="GPU for the memory check, as in `pretrain plan --gpu` (local default: the "
                                          "visible GPU)")
        parser.add_argument("--strict", action="store_true",
                            help="refuse to launch when the predicted peak memory per GPU exceeds the device")

    for name, text in (("status", "job state of a run"), ("logs", "print the newest log of a run"),
                       ("cancel", "scancel the run's job"), ("wait", "wait until the run's job has finished")):
        c = sub.add_parser(name, help=text)
        c.add_argument("run_dir", type=Path)
        if name == "logs":
            c.add_argument("-f", "--follow", action="store_true")
        if name == "wait":
            c.add_argument("--timeout", type=float, default=24 * 3600.0)


def _command(args: argparse.Namespace) -> list[str]:
    cmd = list(args.command)
    return cmd[1:] if cmd[:1] == ["--"] else cmd


def _job(args: argparse.Namespace) -> slurm.SlurmJob:
    cmd = _command(args)
    if not cmd:
        raise slurm.LaunchError("nothing to run: give the pretrain command after '--', e.g. -- train CONFIG")
    name = args.job_name or (Path(cmd[1]).stem if cmd[0] == "train" and len(cmd) > 1 else cmd[0])
    run_dir = (args.run_dir or Path("runs") / name).absolute()
    return slurm.SlurmJob(
        command=cmd, run_dir=run_dir, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        request_gpus=not args.no_gres, job_name=name, partition=args.partition, time=args.time,
        account=args.account, qos=args.qos, constraint=args.constraint, exclusive=args.exclusive, mem=args.mem,
        cpus_per_task=args.cpus_per_task, requeue_limit=args.requeue_limit, signal_seconds=args.signal_seconds,
        exit_before_time=args.exit_before_time,
        task_per_rank=args.task_per_rank, array=args.array, python=args.python, workdir=args.workdir.absolute(),
        check=not args.no_check)


def _memory_check(cfg, world_size: int, per_node: int, args: argparse.Namespace) -> None:
    if cfg is not None:  # a train command
        from pretrain.plan.guard import check_fits

        line = check_fits(cfg, world_size, per_node, args.gpu, args.strict)
        if line:
            print(line, file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    try:
        if args.mode == "local":
            from pretrain.launch.local import LocalJob, run_local
            from pretrain.preflight import check_command

            cfg = check_command(_command(args), args.nproc)  # once, before any rank starts: one message, exit 2
            _memory_check(cfg, args.nproc, args.nproc, args)
            if args.dry_run:
                print(f"{args.nproc} rank(s): {' '.join(LocalJob(args.nproc, _command(args)).cmd)}")
                return 0
            return run_local(args.nproc, _command(args))
        if args.mode == "slurm":
            job = _job(args)
            if args.gpu and not args.no_check:
                from pretrain.preflight import check_command

                cfg = check_command(job.command, job.world_size, root=job.workdir, data=False)
                _memory_check(cfg, job.world_size, args.gpus_per_node, args)
            if args.dry_run:
                sys.stdout.write(slurm.prepare_job(job))
                return 0
            job_id = slurm.submit(job)
            print(f"submitted job {job_id}: script {job.run_dir}/job.sbatch, logs {job.run_dir}/logs/\n"
                  f"  pretrain launch status {job.run_dir}   # or logs -f / cancel")
            return 0
        if args.mode == "status":
            print(slurm.status(args.run_dir))
        elif args.mode == "logs":
            slurm.logs(args.run_dir, args.follow)
        elif args.mode == "cancel":
            print(f"cancelled job {slurm.cancel(args.run_dir)}")
        elif args.mode == "wait":
            t0 = time.monotonic()
            records = slurm.wait(slurm.last_job_id(args.run_dir), args.timeout)
            if not records:
                print("job no longer known to Slurm (it finished a while ago): see `pretrain launch logs`")
            for r in records:
                print(f"job {r.get('JobId')}: {r.get('JobState')} after {time.monotonic() - t0:.0f} s, "
                      f"exit code {r.get('ExitCode')}")
            return 0 if all(r.get("JobState") == "COMPLETED" for r in records) else 1
        return 0
    except (slurm.LaunchError, ValueError) as e:
        print(f"pretrain launch: {e}", file=sys.stderr)
        return 2
