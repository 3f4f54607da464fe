"""Checkpoint writes that do not stall training (``checkpoint.async_save``).

The trainer gathers what a checkpoint holds at the step boundary, on the main thread and in the same order on
every rank (engine state, RNG, portable moments, sharding index: the collectives among them run there).
:class:`CheckpointWriter` then copies every tensor of it to host memory (into pinned buffers, reused from save
to save, when the tensor is on a GPU; a clone when it is already on the CPU) and hands the copy to a background
thread that runs :func:`pretrain.checkpoint.save_checkpoint` unchanged: files, fsync, checksums, the barrier of
the save's own gloo group, rename, ``latest``, then keep-last-K pruning. Training goes on meanwhile, so a
checkpoint on disk is the same, byte for byte, as a synchronous save of that step would be, and resharding on
resume reads it like any other.

Contract:

* at most one write in flight: the next :meth:`CheckpointWriter.write` waits for the previous one (and so do
  :meth:`wait` and :meth:`close`; ``background=False`` writes, e.g. the final save and saves on a stop request,
  wait for it and then write on the calling thread before returning);
* a write that fails in the background raises its error on the main thread at the next :meth:`poll` (the trainer
  polls after every step), :meth:`write`, :meth:`wait` or :meth:`close`;
* every layout works: the engines hand over plain tensors and containers (DeepSpeed's own ``save_checkpoint`` is
  not used), so nothing needs a synchronous fallback;
* the background thread is named :data:`THREAD_NAME` (fault tests find it by that name).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import torch

from pretrain import checkpoint as ckpt

log = logging.getLogger("pretrain.checkpoint")

THREAD_NAME = "pretrain-async-save"


class HostCopy:
    """Copies nested containers of tensors to host memory, keeping their structure as ``torch.save`` sees it:
    an object met twice is copied once, and tensors that share a storage (views of one flat buffer) share the
    copied storage, so the file written is the one the live state would give. Storages on a GPU are copied into
    pinned buffers, reused from save to save."""

    def __init__(self) -> None:
        self._pinned: dict[tuple, torch.UntypedStorage] = {}

    def __call__(self, obj: Any) -> Any:
        memo: dict[int, Any] = {}
        storages: dict[tuple, torch.UntypedStorage] = {}
        out = self._copy(obj, (), memo, storages)
        if any(s.is_pinned() for s in storages.values()):
            torch.cuda.synchronize()  # the non-blocking device-to-host copies have landed
        return out

    def _copy(self, obj: Any, key: tuple, memo: dict, storages: dict) -> Any:
        if id(obj) in memo:
            return memo[id(obj)]
        if isinstance(obj, torch.Tensor):
            out = self._tensor(obj, key, storages)
        elif isinstance(obj, dict):
            out = {k: self._copy(v, (*key, k), memo, storages) for k, v in obj.items()}
        elif isinstance(obj, (list, tuple)):
            out = type(obj)(self._copy(v, (*key, i), memo, storages) for i, v in enumerate(obj))
        else:
            return obj  # numbers, strings, None: immutable
        memo[id(obj)] = out
        return out

    def _tensor(self, t: torch.Tensor, key: tuple, storages: dict) -> torch.Tensor:
        source = t.untyped_storage()
        where = (source.device, source.data_ptr(), source.nbytes())
        if where not in storages:
            storages[where] = self._storage(source, key)
        out = torch.empty(0, dtype=t.dtype).set_(storages[where], t.storage_offset(), t.size(), t.stride())
        return out.requires_grad_(t.requires_grad)  # torch.save records the flag (ZeRO's fp32 master partitions)

    def _storage(self, source: torch.UntypedStorage, key: tuple) -> torch.UntypedStorage:
        if source.device.type != "cuda":
            return source.clone()
        buf = self._pinned.get(key)
        if buf is None or buf.nbytes() != source.nbytes():
            buf = self._pinned[key] = torch.UntypedStorage(source.nbytes()).pin_memory()
        buf.copy_(source, non_blocking=True)
        return buf


class CheckpointWriter:
    """Writes checkpoints on the calling thread, or (``background=True``) on one background thread."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._copy = HostCopy()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def write(self, root: str | Path, step: int, model_state: dict, state: dict, meta: dict,
              background: bool = True, **kwargs) -> Path:
        """Save like :func:`pretrain.checkpoint.save_checkpoint` (same arguments); in the background when
        enabled and ``background``, returning the path the checkpoint will be published at."""
        start = time.perf_counter()
        self.wait()
        if not (self.enabled and background):
            path = ckpt.save_checkpoint(root, step, model_state, state, meta, **kwargs)
            log.info("saved checkpoint %s", path)
            return path
        model_state, state = self._copy(model_state), self._copy(state)
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True,
                                        args=((root, step, model_state, state, meta), kwargs))
        self._thread.start()
        log.info("checkpoint of step %d: host copy in %.3f s, writing in the background", step,
                 time.perf_counter() - start)
        return Path(root) / ckpt.step_dir_name(step)

    def _run(self, args: tuple, kwargs: dict) -> None:
        start = time.perf_counter()
        try:
            path = ckpt.save_checkpoint(*args, **kwargs)
            log.info("saved checkpoint %s (written in the background in %.2f s)", path, time.perf_counter() - start)
        except Exception as e:  # re-raised on the main thread by poll / wait
            self._error = e

    def busy(self) -> bool:
        """Whether a background write is in flight."""
        return self._thread is not None and self._thread.is_alive()

    def poll(self) -> None:
        """Raise the error of a finished background write, if any (cheap: call it every step)."""
        if self._thread is not None and not self.busy():
            self.wait()

    def wait(self) -> None:
        """Wait for the write in flight; raise its error, if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise ckpt.CheckpointError(f"the background checkpoint write failed: {error}") from error

    def close(self, raising: bool = True) -> None:
        """Wait for the write in flight; with ``raising=False`` (an error is already on its way) only log its
        error."""
        try:
            self.wait()
        except ckpt.CheckpointError as e:
            if raising:
                raise
            log.error("%s", e)
