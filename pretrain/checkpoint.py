"""Atomic, rank-sharded training checkpoints.

Layout of ``DIR/step_00000100/``::

    meta.json                       step, consumed samples, world size, config, format version (rank 0)
    model_rank00000.safetensors     this rank's model tensors
    state_rank00000.pt              optimizer state + RNG states (plain tensors/containers, weights_only)

Saving writes everything into ``DIR/.tmp_step_00000100``, fsyncs, renames the directory into place and
only then points ``DIR/latest`` at it (itself replaced atomically). A crash at any moment leaves the
previous checkpoint and pointer intact. The last ``keep_last`` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
LATEST = "latest"
META = "meta.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing or inconsistent; the message names the path."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def model_file(rank: int) -> str:
    return f"model_rank{rank:05d}.safetensors"


def state_file(rank: int) -> str:
    return f"state_rank{rank:05d}.pt"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write a small text file so readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def rng_state() -> dict:
    """Python, numpy and torch (CPU + CUDA) RNG states, as JSON strings and tensors only."""
    state = {"python": json.dumps(random.getstate()),
             "numpy": json.dumps(_numpy_state()),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state() -> dict:
    state = np.random.get_state(legacy=False)
    state["state"]["key"] = state["state"]["key"].tolist()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    np_state = json.loads(state["numpy"])
    np_state["state"]["key"] = np.asarray(np_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: str | Path, step: int, model_state: dict[str, torch.Tensor], state: dict,
                    meta: dict, rank: int = 0, world_size: int = 1, keep_last: int = 3,
                    barrier: Callable[[], None] = lambda: None) -> Path:
    """Save this rank's shard; rank 0 publishes the directory once every rank has written.

    ``state`` holds plain tensors and containers (optimizer state, RNG). ``meta`` must be JSON-serialisable.
    """
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / f".tmp_{step_dir_name(step)}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
        tmp.mkdir(parents=True)
    barrier()
    tensors = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
    save_file(tensors, str(tmp / model_file(rank)), metadata={"step": str(step), "rank": str(rank)})
    torch.save(state, tmp / state_file(rank))
    for name in (model_file(rank), state_file(rank)):
        _fsync(tmp / name)
    barrier()
    if rank == 0:
        meta = {**meta, "format_version": FORMAT_VERSION, "step": step, "world_size": world_size}
        (tmp / META).write_text(json.dumps(meta, indent=1))
        _fsync(tmp / META)
        _fsync(tmp)
        if final.exists():  # re-saving the same step (e.g. final save right after an interval save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)
        write_atomic(root / LATEST, final.name + "\n")
        prune(root, keep_last)
    barrier()
    return final


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (never the one ``latest`` names)."""
    latest = resolve(root, "auto")
    done = sorted(p for p in root.glob("step_*") if (p / META).is_file())
    for path in done[:-keep_last]:
        if path != latest:
            shutil.rmtree(path, ignore_errors=True)


def resolve(root: str | Path, which: str = "auto") -> Path | None:
    """``auto``: the directory ``ROOT/latest`` names (None if no checkpoint yet); else ``which`` itself."""
    if which != "auto":
        path = Path(which)
        if (path / LATEST).is_file():  # a checkpoint root was given
            return resolve(path, "auto")
        if not (path / META).is_file():
            raise CheckpointError(f"{path} is not a checkpoint (no {META})")
        return path
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not (path / META).is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which has no {META}")
    return path


def load_checkpoint(path: str | Path, rank: int = 0) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """``(model tensors, state, meta)`` of this rank, read without unpickling arbitrary objects."""
    path = Path(path)
    meta = json.loads((path / META).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path / META}: format_version {meta.get('format_version')} "
                              f"(this code reads {FORMAT_VERSION})")
    for name in (model_file(rank), state_file(rank)):
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name} is missing (checkpoint saved with world size "
                                  f"{meta.get('world_size')})")
    model_state = load_file(str(path / model_file(rank)))
    state = torch.load(path / state_file(rank), map_location="cpu", weights_only=True)
    return model_state, state, meta
