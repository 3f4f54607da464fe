"""Each step's micro-batches, optionally read and collated one step ahead in a background thread.

The step's batch count is a function of the consumed samples (batch ramp-up), so the thread can run ahead on
its own; the batches come out in exactly the order a synchronous read gives, and resuming restarts the sampler
from the trainer's ``consumed_samples``, so read-ahead never shifts the data position. The DataLoader pins
host memory when CUDA is present, so the engine's ``non_blocking`` copies overlap with compute.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator


class StepBatches:
    """``next()`` returns the list of micro-batches of the next step; ``counts`` gives their number per step."""

    def __init__(self, loader: Iterator[dict], counts: Iterable[int], prefetch: bool = True):
        self._loader, self._counts = loader, iter(counts)
        self._thread = None
        if prefetch:
            self._queue: queue.Queue = queue.Queue(maxsize=1)  # one step ahead
            self._done = threading.Event()
            self._thread = threading.Thread(target=self._fill, name="pretrain-prefetch", daemon=True)
            self._thread.start()

    def _read(self, n: int) -> list[dict]:
        return [next(self._loader) for _ in range(n)]

    def _fill(self) -> None:
        try:
            for n in self._counts:
                if not self._put(self._read(n)):
                    return
        except BaseException as e:  # handed to the training thread, which raises it
            self._put(e)

    def _put(self, item) -> bool:
        """Wait for room in the queue; False once :meth:`close` was called."""
        while not self._done.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def next(self) -> list[dict]:
        if self._thread is None:
            return self._read(next(self._counts))
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        if self._thread is not None:
            self._done.set()
            self._thread.join(timeout=10)
        getattr(self._loader, "close", lambda: None)()  # a raw-text stream's workers and bad-input report
