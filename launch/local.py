"""``pretrain launch local --nproc N -- train CONFIG ...``: N ranks on this machine, children of this launcher.

The launcher gives each rank the environment torchrun would (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``; ``OMP_NUM_THREADS=1`` unless set; the port is a free one at start, which rank 0's
store then binds) and then only supervises:

* the ranks die with it: each is started with the kernel's parent-death signal (``PR_SET_PDEATHSIG`` = SIGKILL,
  Linux), which holds also when the launcher itself is killed with SIGKILL or by the OOM killer, so no rank is left
  writing checkpoints. Checkpoint saves are atomic, so a kill never damages the previous checkpoint;
* SIGUSR1, SIGTERM and SIGINT (Ctrl-C) to the launcher are forwarded to every rank, once per signal received: the
  first asks them to save and exit 75 at the end of the step, a second ends them at once (``launch.preemption``).
  The ranks run in their own session, so a terminal's Ctrl-C reaches them only through the launcher, once;
* when a rank fails (any exit code but 0 and 75) the launcher names it and stops the others (SIGTERM, then SIGKILL
  after :data:`GRACE_S`);
* the launcher's exit code is the ranks': 0, 75 (stopped with a checkpoint: run again with ``--resume auto``), 2 (bad
  input), 3 (non-finite), 124 (hang), ...: the first failing rank's code, ``128 + N`` for a rank killed by signal N.
"""

from __future__ import annotations

import ctypes
import math
import os
import signal
import socket
import subprocess
import sys
import time

from pretrain.launch.preemption import PREEMPTED_EXIT_CODE

FORWARDED = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
GRACE_S = 10.0  # after a rank failed: how long the others get to exit on SIGTERM before SIGKILL
_PR_SET_PDEATHSIG = 1


def _log(msg: str) -> None:
    print(f"[launch] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, nproc: int, port: int, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of rank ``rank`` of ``nproc`` (what torchrun sets for one node)."""
    env = dict(os.environ if environ is None else environ)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
               GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def exit_code(returncode: int) -> int:
    """A Popen return code as a shell reports it: ``-N`` (killed by signal N) -> ``128 + N``."""
    return 128 - returncode if returncode < 0 else returncode


def job_exit_code(codes: list[int]) -> int:
    """The job's code from its ranks' codes in the order they ended: the first failure's, else 75 if any rank
    stopped on request, else 0."""
    failures = [c for c in codes if c not in (0, PREEMPTED_EXIT_CODE)]
    if failures:
        return failures[0]
    return PREEMPTED_EXIT_CODE if PREEMPTED_EXIT_CODE in codes else 0


def _die_with_launcher(launcher_pid: int):
    """``preexec_fn`` of each rank: SIGKILL me when my parent dies (and if it already did, exit now)."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None

    def preexec() -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)  # blocked by the launcher while it starts the ranks
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != launcher_pid:  # the launcher died between fork and prctl
            os._exit(1)

    return preexec


class LocalJob:
    """The ranks of one ``launch local`` run, supervised until they all ended."""

    def __init__(self, nproc: int, command: list[str], python: str = sys.executable):
        if nproc < 1:
            raise ValueError(f"--nproc must be >= 1, got {nproc}")
        if not command:
            raise ValueError("nothing to run: give the pretrain command after '--', e.g. -- train CONFIG")
        self.nproc, self.cmd = nproc, [python, "-m", "pretrain.cli", *command]
        self.procs: list[subprocess.Popen] = []
        self.codes: list[int] = []  # exit codes in the order the ranks ended
        self.signals = 0  # stop signals forwarded so far
        self._stopping_since: float | None = None

    def start(self) -> None:
        port = free_port()
        _log(f"{self.nproc} rank(s) on 127.0.0.1:{port}: {' '.join(self.cmd)}")
        preexec = _die_with_launcher(os.getpid())
        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)  # a stop signal arriving now reaches all ranks
        try:
            for rank in range(self.nproc):
                self.procs.append(subprocess.Popen(self.cmd, env=rank_env(rank, self.nproc, port),
                                                   preexec_fn=preexec, start_new_session=True))
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)

    def forward(self, signum: int, _frame=None) -> None:
        """Signal handler: pass a stop signal on to every running rank."""
        self.signals += 1
        name = signal.Signals(signum).name
        what = "save and exit 75 at the end of the step" if self.signals == 1 else "stop at once"
        _log(f"{name}: forwarded to the ranks ({what}"
             f"{'; send it again to stop them at once' if self.signals == 1 else ''})")
        for p in self.procs:
            if p.poll() is None:
                os.kill(p.pid, signum)

    def _stop_others(self, rank: int, code: int) -> None:
        _log(f"rank {rank} (pid {self.procs[rank].pid}) failed with exit code {code}: stopping the other ranks")
        self._stopping_since = time.monotonic()
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    def wait(self, poll_s: float = 0.1) -> int:
        """Supervise until every rank ended; returns the job's exit code (:func:`job_exit_code`)."""
        running = set(range(self.nproc))
        while running:
            for rank in sorted(running):
                returncode = self.procs[rank].poll()
                if returncode is None:
                    continue
                running.discard(rank)
                self.codes.append(exit_code(returncode))
                if self.codes[-1] not in (0, PREEMPTED_EXIT_CODE) and self._stopping_since is None and running:
                    self._stop_others(rank, self.codes[-1])
            if running and self._stopping_since is not None and time.monotonic() - self._stopping_since > GRACE_S:
                _log(f"ranks {sorted(running)} still running {GRACE_S:g} s after SIGTERM: killing them")
                for rank in running:
                    self.procs[rank].kill()
                self._stopping_since = math.inf
            time.sleep(poll_s)
        return job_exit_code(self.codes)


def run_local(nproc: int, command: list[str]) -> int:
    """Run the job, forwarding stop signals to its ranks; returns the exit code, with a line saying what it means."""
    job = LocalJob(nproc, command)
    previous = {sig: signal.signal(sig, job.forward) for sig in FORWARDED}
    try:
        job.start()
        code = job.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code == PREEMPTED_EXIT_CODE:
        _log(f"stopped on request with a checkpoint (exit {code}): run again with --resume auto to continue")
    elif code:
        _log(f"exit code {code} (ranks' codes in the order they ended: {job.codes})")
    return code
