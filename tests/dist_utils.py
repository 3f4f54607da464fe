"""Run a function on N real processes over gloo and collect what each rank returns.

``run_distributed("tests.test_x:worker", 4, {"k": 1})`` starts 4 Python processes (rank/world/master in the
environment, like torchrun), each calls ``worker(args)`` after ``init_process_group("gloo")`` and saves the
returned dict (tensors, numbers, lists) with ``torch.save``; the parent loads them with ``weights_only=True``.
A free port is picked per call so concurrent tests do not collide; a timeout kills the whole group.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pretrain.launch.local import free_port  # noqa: F401  (tests import it from here)

REPO = Path(__file__).resolve().parents[1]


def run_distributed(target: str, world_size: int, args: dict | None = None, timeout: float = 300) -> list[dict]:
    """Run ``module:function`` on ``world_size`` gloo processes; return each rank's result dict, by rank."""
    with tempfile.TemporaryDirectory(prefix="dist_test_") as tmp:
        torch.save(args or {}, Path(tmp) / "args.pt")
        port = free_port()
        procs = []
        for rank in range(world_size):
            # CUDA_VISIBLE_DEVICES="": these are CPU tests, hermetic on a GPU host too (no NCCL, no shared GPU)
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "RANK": str(rank), "LOCAL_RANK": str(rank),
                   "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(port),
                   "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "tests.dist_utils", target, tmp], cwd=REPO, env=env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + timeout
        outputs = []
        try:
            for p in procs:
                out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
                outputs.append(out.decode(errors="replace"))
        except subprocess.TimeoutExpired:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            raise TimeoutError(f"{target} on {world_size} ranks did not finish in {timeout:.0f} s") from None
        failed = [r for r, p in enumerate(procs) if p.returncode != 0]
        if failed:
            log = "\n".join(f"--- rank {r} (exit code {procs[r].returncode}) ---\n{outputs[r][-4000:]}"
                            for r in failed)
            raise RuntimeError(f"{target}: ranks {failed} failed\n{log}")
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=True) for r in range(world_size)]


def _child(target: str, tmp: str) -> None:
    import torch.distributed as dist

    torch.manual_seed(0)
    dist.init_process_group("gloo")
    module, fn = target.split(":")
    args = torch.load(Path(tmp) / "args.pt", weights_only=True)
    result = getattr(importlib.import_module(module), fn)(args)
    part = Path(tmp) / f"rank{dist.get_rank()}.pt.tmp"
    torch.save(result or {}, part)
    part.rename(part.with_suffix(""))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
