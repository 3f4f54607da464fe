"""Atomic, rank-sharded training checkpoints, verified on load.

Layout of ``DIR/step_00000100/``::

    meta.json                       step, consumed samples, world size, config, format version, and the size
                                    and crc32 of every other file (rank 0)
    model_rank00000.safetensors     this rank's model tensors
    state_rank00000.pt              optimizer state + RNG states (plain tensors/containers, weights_only)

Saving first checks the free space (this rank's bytes x world size), writes everything into
``DIR/.tmp_step_00000100``, fsyncs, renames the directory into place (an existing one of the same step is
renamed aside first and deleted after) and only then points ``DIR/latest`` at it (itself replaced atomically).
A crash at any moment leaves the previous checkpoint intact; if ``latest`` names a missing or incomplete
directory, ``resolve`` falls back to the newest complete checkpoint with a warning. A full disk raises
"no space left on DIR" and removes the partial directory. Every file is checked against its recorded size and
crc32 (~2 GB/s) before it is read. The last ``keep_last`` checkpoints in the order they were saved
(``meta.json["save_order"]``, not their step numbers) are kept.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT_VERSION = 1
LATEST = "latest"
META = "meta.json"
CHECKSUM = "crc32"

log = logging.getLogger("pretrain.checkpoint")


class CheckpointError(RuntimeError):
    """A checkpoint is missing or inconsistent; the message names the path."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def model_file(rank: int) -> str:
    return f"model_rank{rank:05d}.safetensors"


def state_file(rank: int) -> str:
    return f"state_rank{rank:05d}.pt"


def _records_file(rank: int) -> str:
    return f"files_rank{rank:05d}.json"  # a rank's file sizes and checksums, merged into meta.json by rank 0


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def follow_umask(*files: Path) -> None:
    """Give ``files`` the mode every other file we write has (``0o666`` less the umask): safetensors writes its
    files owner-only, which would hide a checkpoint's or an export's weights from the group that reads the rest."""
    umask = os.umask(0)
    os.umask(umask)
    for f in files:
        os.chmod(f, 0o666 & ~umask)


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
        # resumed with fewer GPUs visible than at save time (e.g. one per Slurm task): the visible ones get theirs
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


# --- sizes, checksums, free space ----------------------------------------------------------------------------

def checksum(path: Path) -> str:
    """crc32 of a file, read in 4 MiB chunks."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def nbytes(obj) -> int:
    """Bytes of the tensors in a (nested) container."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    return 0


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds ``path`` (or would, once created)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _no_space(root: Path, needed: int, free: int) -> CheckpointError:
    return CheckpointError(f"no space left on {root} (needed ~{_size(needed)}, free {_size(free)}): free some space "
                           f"or point checkpoint.dir elsewhere; the previous checkpoint is kept")


def _out_of_space(error: BaseException, path: Path, writing: int) -> bool:
    """Whether a failed write ran out of space (torch.save reports it as 'unexpected pos', without an errno)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left" in str(error) or free_bytes(path) < writing


@contextmanager
def _space_errors(root: Path, tmp: Path, rank: int, needed: int, free: int, writing: int):
    """Turn a full disk while writing ``writing`` bytes into "no space left on ROOT", removing what this rank
    wrote (rank 0: the whole temporary directory)."""
    try:
        yield
    except Exception as e:
        if not _out_of_space(e, tmp, writing):
            raise
        for name in (model_file(rank), state_file(rank), _records_file(rank)):
            (tmp / name).unlink(missing_ok=True)
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _no_space(root, needed, free) from None


# --- save ----------------------------------------------------------------------------------------------------

def save_checkpoint(root: str | Path, step: int, model_state: dict[str, torch.Tensor], state: dict,
                    meta: dict, rank: int = 0, world_size: int = 1, keep_last: int = 3,
                    barrier: Callable[[], None] = lambda: None) -> Path:
    """Save this rank's shard; rank 0 publishes the directory once every rank has written.

    ``state`` holds plain tensors and containers (optimizer state, RNG). ``meta`` must be JSON-serialisable.
    """
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / f".tmp_{step_dir_name(step)}"
    writing = nbytes(model_state) + nbytes(state)
    needed, free = writing * world_size, free_bytes(root)
    if needed > free:
        raise _no_space(root, needed, free)
    if rank == 0:
        _remove_leftovers(root)  # of crashed saves
        tmp.mkdir(parents=True)
    barrier()
    names = [model_file(rank), state_file(rank)]
    with _space_errors(root, tmp, rank, needed, free, writing):
        tensors = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
        save_file(tensors, str(tmp / names[0]), metadata={"step": str(step), "rank": str(rank)})
        follow_umask(tmp / names[0])
        torch.save(state, tmp / names[1])
        records = {}
        for name in names:
            _fsync(tmp / name)
            records[name] = {"size": (tmp / name).stat().st_size, CHECKSUM: checksum(tmp / name)}
        (tmp / _records_file(rank)).write_text(json.dumps(records))
    barrier()
    if rank == 0:
        with _space_errors(root, tmp, rank, needed, free, 1 << 20):
            meta = {**meta, "format_version": FORMAT_VERSION, "step": step, "world_size": world_size,
                    "save_order": 1 + max((order for order, _ in _complete(root)), default=0),
                    "files": _merge_records(tmp, world_size)}
            (tmp / META).write_text(json.dumps(meta, indent=1))
            _fsync(tmp / META)
        _fsync(tmp)
        _publish(root, tmp, final)
    barrier()
    if rank == 0:  # after the last barrier: the other ranks go on training while old checkpoints are deleted
        prune(root, keep_last)
    return final


def _merge_records(tmp: Path, world_size: int) -> dict[str, dict]:
    files = {}
    for r in range(world_size):
        files.update(json.loads((tmp / _records_file(r)).read_text()))
        (tmp / _records_file(r)).unlink()
    return dict(sorted(files.items()))


def _publish(root: Path, tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final`` and point ``latest`` at it. An existing ``final`` (re-saving a step, e.g. the
    final save right after an interval save, or after a rollback) is renamed aside first and deleted last."""
    aside = root / f".old_{final.name}"
    if final.exists():
        os.replace(final, aside)
    os.replace(tmp, final)
    _fsync(root)
    write_atomic(root / LATEST, final.name + "\n")
    shutil.rmtree(aside, ignore_errors=True)


def _remove_leftovers(root: Path) -> None:
    for path in (*root.glob(".tmp_step_*"), *root.glob(".old_step_*")):
        shutil.rmtree(path, ignore_errors=True)


def _is_complete(path: Path, meta: dict | None = None) -> bool:
    """``meta.json`` is readable and every file it lists is there with its recorded size."""
    try:
        meta = meta or json.loads((path / META).read_text())
        return all((path / name).stat().st_size == rec["size"] for name, rec in (meta.get("files") or {}).items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _complete(root: Path) -> list[tuple[int, Path]]:
    """``(save_order, path)`` of the complete checkpoints under ``root``, oldest save first (older checkpoints
    without a ``save_order`` count as 0 and sort by step)."""
    done = []
    for path in sorted(Path(root).glob("step_*")):
        try:
            meta = json.loads((path / META).read_text())
        except (OSError, ValueError):
            continue
        if _is_complete(path, meta):
            done.append((int(meta.get("save_order", 0)), path))
    return sorted(done)


def holds_checkpoints(root: str | Path) -> bool:
    """Whether ``root`` holds checkpoints of a run (a ``latest`` pointer or a complete step directory)."""
    return (Path(root) / LATEST).is_file() or bool(_complete(Path(root)))


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the ``keep_last`` most recently saved complete checkpoints (never the one ``latest``
    names). Save order, not step number: a run started over keeps its own checkpoints, not stale higher ones."""
    latest = resolve(root, "auto")
    for _, path in _complete(root)[:-keep_last]:
        if path != latest:
            shutil.rmtree(path, ignore_errors=True)


def resolve(root: str | Path, which: str = "auto") -> Path | None:
    """``auto``: the directory ``ROOT/latest`` names (None if no checkpoint yet), or the newest complete one if
    that is missing or incomplete (a crash while re-saving it, or before ``latest`` was first written), with a
    warning; else ``which`` itself."""
    if which != "auto":
        path = Path(which)
        if (path / LATEST).is_file():  # a checkpoint root was given
            return resolve(path, "auto")
        if not (path / META).is_file():
            raise CheckpointError(f"{path} is not a checkpoint (no {META})")
        return path
    pointer = Path(root) / LATEST
    path = Path(root) / pointer.read_text().strip() if pointer.is_file() else None
    if path is not None and _is_complete(path):
        return path
    done = _complete(Path(root))
    problem = f"{pointer} names {path.name}, which is missing or incomplete" if path else f"{pointer} is missing"
    if not done:
        if path is None:
            return None
        raise CheckpointError(f"{problem}, and {root} holds no complete checkpoint; start over with another "
                              f"checkpoint.dir")
    log.warning("%s (a save was interrupted): using the newest complete checkpoint %s", problem, done[-1][1].name)
    return done[-1][1]


# --- load ----------------------------------------------------------------------------------------------------

def verify_file(path: Path, meta: dict) -> None:
    """Raise naming ``path`` when it is missing or differs from the size and checksum ``meta`` records for it
    (checkpoints saved before checksums were recorded are only checked for presence)."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    rec = (meta.get("files") or {}).get(path.name)
    if rec is None:
        return
    size = path.stat().st_size
    if size != rec["size"]:
        raise CheckpointError(f"{path} is unreadable (truncated?): {size} bytes where {META} records {rec['size']}; "
                              f"resume an earlier checkpoint")
    if checksum(path) != rec[CHECKSUM]:
        raise CheckpointError(f"{path} is damaged: its {CHECKSUM} checksum differs from the one {META} records; "
                              f"resume an earlier checkpoint")


def read_model_file(path: Path, meta: dict, want=lambda name: True) -> dict[str, torch.Tensor | None]:
    """Every tensor name of a verified rank's file; the tensor itself only where ``want(name)`` (else None)."""
    verify_file(path, meta)
    try:
        with safe_open(str(path), framework="pt") as f:  # the header alone already detects truncation
            return {k: f.get_tensor(k) if want(k) else None for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise CheckpointError(f"{path} is unreadable (truncated or corrupt?): {e}") from None


def read_state_file(path: Path, meta: dict) -> dict:
    """A verified rank's optimizer/RNG state, read without unpickling arbitrary objects."""
    verify_file(path, meta)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is unreadable (truncated or corrupt?): {e}") from None


def load_checkpoint(path: str | Path, rank: int = 0) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """``(model tensors, state, meta)`` of this rank, verified and read without unpickling arbitrary objects."""
    path = Path(path)
    meta = json.loads((path / META).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path / META}: format_version {meta.get('format_version')} "
                              f"(this code reads {FORMAT_VERSION})")
    for name in (model_file(rank), state_file(rank)):
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name} is missing (checkpoint saved with world size "
                                  f"{meta.get('world_size')})")
    model_state = read_model_file(path / model_file(rank), meta)
    return model_state, read_state_file(path / state_file(rank), meta), meta
