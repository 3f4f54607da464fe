"""Stopping cleanly: preemption warnings, requeueing, and a watchdog for hangs.

A stop is requested by SIGUSR1, SIGTERM or SIGINT (Ctrl-C) to this process, or by the file named in
``PRETRAIN_STOP_FILE``: the Slurm job script creates it when Slurm sends the time-limit warning, because a signal to
the job does not pass through torchrun's agent to the workers, while a file in the shared run directory reaches them
all. Rank 0 watches the file; the trainer's per-step all-reduce of the flag makes every rank stop at the same step.

A stop waits for the end of the current step, which may never come (a data pipeline looping, a peer that hangs), so:

* a second stop signal ends the process at once, without saving, with exit code ``128 + signal`` (the previous
  checkpoint is intact: saves are atomic);
* with ``can_wait`` given (the trainer's "a step has finished"), a signal that comes while it is false, i.e. before
  the first step of this process, exits at once too: there is nothing new to save. The exit code is 75 when the run
  is ``resumable`` (``--resume auto`` continues from the last checkpoint, or from the start), else ``128 + signal``.

The trainer (``pretrain/train.py``) uses it as::

    handler = install(stop_flag.request)       # or PreemptionHandler.install() and poll handler.should_stop()
    ...                                        # after each step: agree across ranks, save, exit 75
    handler.requeue_if_slurm()                 # no-op unless under Slurm (and not done by the job script)

``python -m pretrain.launch.preemption requeue`` is what the job script runs once all ranks have exited.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable

from pretrain.launch.env import detect

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped with a checkpoint on request; run me again to resume
HUNG_EXIT_CODE = 124  # the watchdog saw no progress (as coreutils `timeout` reports)
LINGER_S = 30.0  # a hung rank's watchdog stays this long (at most its timeout) after dumping its stacks
DEFAULT_REQUEUE_LIMIT = 3


def _log(msg: str) -> None:
    sys.stderr.write(f"[launch] {msg}\n")
    sys.stderr.flush()


class PreemptionHandler:
    """Turns termination signals and the stop file into a "stop requested" flag, checked between steps."""

    def __init__(self, on_stop: Callable[[str], None] | None = None,
                 signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT),
                 stop_file: str | None = None, poll_s: float = 0.5, can_wait: Callable[[], bool] | None = None,
                 resumable: bool = True):
        self.on_stop = on_stop
        self.signals = signals
        self.stop_file = stop_file if stop_file is not None else os.environ.get("PRETRAIN_STOP_FILE")
        self.poll_s = poll_s
        self.can_wait = can_wait
        self.resumable = resumable
        self._signalled = False
        self.reason: str | None = None  # why a stop was requested (signal name or "stop file")
        self._agreed = False
        self._previous: dict[int, object] = {}
        self._closed = threading.Event()

    @classmethod
    def install(cls, on_stop: Callable[[str], None] | None = None, **kwargs) -> "PreemptionHandler":
        """Register the signal handlers (main thread only) and, on rank 0, watch the stop file."""
        handler = cls(on_stop, **kwargs)
        for sig in handler.signals:
            handler._previous[sig] = signal.signal(sig, handler._on_signal)
        if handler.stop_file and detect().rank == 0:
            threading.Thread(target=handler._watch_stop_file, name="pretrain-stop-file", daemon=True).start()
        return handler

    def uninstall(self) -> None:
        self._closed.set()
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _on_signal(self, signum: int, _frame=None) -> None:
        name = signal.Signals(signum).name
        if self._signalled:
            _exit_now(f"second stop signal ({name}): exiting now without saving", 128 + signum)
        self._signalled = True
        if self.can_wait is not None and not self.can_wait():
            self.reason = name
            code = PREEMPTED_EXIT_CODE if self.resumable else 128 + signum
            _exit_now(f"stop requested ({name}) before the first step: exiting now, nothing new to save", code)
        self.request(name)

    def request(self, reason: str) -> None:
        if self.reason is None:
            then = "save a checkpoint and stop" if self.resumable else "stop without saving (no checkpoint.dir)"
            _log(f"stop requested ({reason}): will {then} after this step")
            self.reason = reason
            if self.on_stop is not None:
                self.on_stop(reason)

    def _watch_stop_file(self) -> None:
        while not self._closed.wait(self.poll_s):
            if os.path.exists(self.stop_file):
                self.request(f"stop file {self.stop_file}")
                return

    def should_stop(self) -> bool:
        """True on every rank once any rank was asked to stop. Call it at the same point on all ranks:
        it is a collective (one all-reduce of a single number) when a process group exists."""
        if self._agreed:
            return True
        flag = self.reason is not None
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            import torch

            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            t = torch.tensor([1.0 if flag else 0.0], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item() > 0)
        self._agreed = flag
        return flag

    def requeue_if_slurm(self) -> bool:
        """Requeue this Slurm job (rank 0 only) unless the job script does it (``PRETRAIN_JOB_SCRIPT_REQUEUES``);
        returns True when a requeue was issued."""
        if os.environ.get("PRETRAIN_JOB_SCRIPT_REQUEUES") == "1":
            return False
        return detect().rank == 0 and requeue()


def _exit_now(msg: str, code: int) -> None:
    """End the process from a signal handler, whatever the main thread is waiting for (no cleanup can hang)."""
    os.write(2, f"[launch] {msg} (exit {code})\n".encode())  # not sys.stderr: the main thread may hold its lock
    try:
        sys.stdout.flush()
    except RuntimeError:  # "reentrant call": the main thread was writing to stdout when the signal came
        pass
    os._exit(code)


def install(on_stop: Callable[[str], None] | None = None, **kwargs) -> PreemptionHandler:
    """Shortcut for :meth:`PreemptionHandler.install`: ``on_stop(reason)`` runs when a stop is requested."""
    return PreemptionHandler.install(on_stop, **kwargs)


def requeue(limit: int | None = None) -> bool:
    """``scontrol requeue $SLURM_JOB_ID`` unless the job already restarted ``limit`` times
    (default ``PRETRAIN_REQUEUE_LIMIT`` or 3). Returns True when requeued."""
    denv = detect()
    if denv.job_id is None:
        return False
    limit = int(os.environ.get("PRETRAIN_REQUEUE_LIMIT", DEFAULT_REQUEUE_LIMIT)) if limit is None else limit
    if denv.restart_count >= limit:
        _log(f"job {denv.job_id} already restarted {denv.restart_count} times (limit {limit}): not requeueing")
        return False
    _log(f"requeueing job {denv.job_id} (restart {denv.restart_count + 1} of at most {limit})")
    subprocess.run(["scontrol", "requeue", denv.job_id], check=True)
    return True


class Watchdog:
    """Ends a process that stopped making progress, saying where, instead of waiting silently.

    The trainer calls :meth:`beat` before each phase (``"forward/backward"``, ``"all_reduce grads"``,
    ``"checkpoint save"``); if no beat arrives for ``timeout_s`` the watchdog prints which rank, host, phase
    and last step, dumps every thread's Python stack (faulthandler; also into ``dump_dir/hang_rankNNNNN.txt`` when
    given: every rank's watchdog fires in a hang, so the run directory gets one file per rank) and exits with
    :data:`HUNG_EXIT_CODE` after lingering :data:`LINGER_S` (at most ``timeout_s``), so that the ranks which last
    beat a step later, waiting in a collective for this one, fire and leave their stacks before its exit breaks
    their connections.
    Under Slurm with ``--kill-on-bad-exit`` that ends the whole job.
    """

    def __init__(self, timeout_s: float, exit_code: int = HUNG_EXIT_CODE, dump_dir: str | None = None):
        self.timeout_s = timeout_s
        self.exit_code = exit_code
        self.dump_dir = dump_dir  # each rank also writes its message and stacks to DUMP_DIR/hang_rankNNNNN.txt
        self.step: int | None = None
        self.phase = "start-up"
        self._last = time.monotonic()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pretrain-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._last = time.monotonic()
        self._thread.start()
        return self

    def beat(self, step: int | None = None, phase: str = "train step") -> None:
        self.step, self.phase = step, phase
        self._last = time.monotonic()

    def stop(self) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._done.wait(min(self.timeout_s / 4, 5.0)):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                denv = detect()
                _log(f"WATCHDOG: rank {denv.rank}/{denv.world_size} on {denv.node_name} made no progress for "
                     f"{idle:.0f} s (limit {self.timeout_s:g} s) in '{self.phase}'; last step: {self.step}. "
                     f"Stacks of all threads follow: a stack inside a collective waits for another rank; the "
                     f"stuck rank is the one whose stack is elsewhere or whose last step is lower.")
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                if self.dump_dir:  # the run directory keeps every rank's stacks, whatever the job log keeps
                    self._dump(os.path.join(self.dump_dir, f"hang_rank{denv.rank:05d}.txt"),
                               f"rank {denv.rank} on {denv.node_name}: no progress for {idle:.0f} s in "
                               f"'{self.phase}'; last step: {self.step}\n")
                # the other ranks of a hang wait in a collective since their own last beat, at most about one
                # step after ours: exiting at once would close their connections before their watchdogs fire
                time.sleep(min(self.timeout_s, LINGER_S))
                os._exit(self.exit_code)

    @staticmethod
    def _dump(path: str, message: str) -> None:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(message)
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError as e:  # exit with the hang's code regardless
            _log(f"WATCHDOG: could not write {path}: {e}")


def main(argv: list[str]) -> int:
    if argv != ["requeue"]:
        print("usage: python -m pretrain.launch.preemption requeue", file=sys.stderr)
        return 2
    return 0 if requeue() else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
