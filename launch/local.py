"""``pretrain launch local --nproc N -- train CONFIG ...``: N ranks on this machine through torchrun."""

from __future__ import annotations

import os
import sys


def local_command(nproc: int, command: list[str], python: str = sys.executable) -> list[str]:
    """The torchrun command line running ``pretrain COMMAND...`` in ``nproc`` processes.

    ``--standalone`` gives a private c10d rendezvous on a free port, so concurrent runs do not collide.
    """
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    if not command:
        raise ValueError("nothing to run: give the pretrain command after '--', e.g. -- train CONFIG")
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "--max-restarts=0", "-m", "pretrain.cli", *command]


def run_local(nproc: int, command: list[str]) -> None:
    """Replace this process by torchrun, so signals (Ctrl-C, SIGTERM) reach it directly."""
    cmd = local_command(nproc, command)
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    os.execv(cmd[0], cmd)
