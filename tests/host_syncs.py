"""Count, on CPU, the host syncs a GPU would pay for: a ``TorchDispatchMode`` that records every
``aten._local_scalar_dense`` (behind ``.item()``, ``int()``, ``float()``, ``bool()`` of a tensor) and every
data-dependent-shape op (``nonzero``, ``masked_select``, ``unique``...). ``.tolist()`` bypasses the dispatcher:
count it separately where it matters. ``torch.compile(fullgraph=True)`` does not prove their absence.

    with HostSyncCounter() as syncs:
        model(**batch).loss.backward()
    assert syncs.ops == []
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
            aten._unique2.default, aten.unique_consecutive.default, aten.unique_dim.default,
            aten.repeat_interleave.Tensor}


class HostSyncCounter(TorchDispatchMode):
    """Records the name of every host-syncing op run inside the ``with`` block (``ops``, in call order)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNC_OPS:
            self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))
