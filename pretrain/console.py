"""What a run prints: our own loggers, and known third-party noise filtered out.

:func:`quiet_third_party` runs first thing in the ``pretrain`` entry point (every rank runs it, since
launchers start ``python -m pretrain.cli``), before torch, DeepSpeed or megatron-core are imported. It hides
messages that say nothing about this run and repeat once per rank: Transformer Engine / Apex being absent,
CUDA_DEVICE_MAX_CONNECTIONS advice, DeepSpeed's accelerator guess and op-build lines, FutureWarnings raised
inside libraries. Everything else (real warnings, errors) still shows. ``PRETRAIN_VERBOSE=1`` turns the
filter off.

:func:`setup_logging` sets only the ``pretrain`` loggers' level (INFO on rank 0, WARNING elsewhere); other
libraries' loggers keep Python's default (warnings and errors only), so their INFO lines stay out.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

# warnings (message regex) that only say an optional accelerator library is absent
_WARNINGS = (r"Transformer Engine and Apex are not installed", r".*CUDA_DEVICE_MAX_CONNECTIONS",
             r"Apex is not installed", r"Transformer Engine is not installed")
# lines printed or logged by libraries (DeepSpeed's op builder and accelerator detection, Megatron-FSDP)
NOISE = re.compile(r"^(DeepSpeed \S+ built successfully|Setting accelerator to CPU\.|Setting ds_accelerator to "
                   r"|Using Megatron-FSDP|Detected Megatron Core|gcc |g\+\+ )")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Setting accelerator to CPU"):  # news only on a machine that has a GPU
            torch = sys.modules.get("torch")
            return torch is not None and torch.cuda.is_available()
        return not NOISE.match(message)


_DROP_NOISE = _DropNoise()


class _FilteredStream:
    """A text stream that drops whole ``print`` lines matching :data:`NOISE` (``print`` writes the text, then
    the newline: both are dropped); everything else passes through unchanged, unbuffered."""

    def __init__(self, stream):
        self._stream = stream
        self._drop_newline = False

    def write(self, text: str) -> int:
        if self._drop_newline and text == "\n":
            self._drop_newline = False
            return len(text)
        self._drop_newline = False
        if NOISE.match(text):
            self._drop_newline = not text.endswith("\n")
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def quiet_third_party() -> None:
    """Install the filters (idempotent); a no-op with ``PRETRAIN_VERBOSE=1``."""
    if os.environ.get("PRETRAIN_VERBOSE") == "1" or isinstance(sys.stdout, _FilteredStream):
        return
    for message in _WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(?!pretrain)")
    logging.getLogger("DeepSpeed").addFilter(_DROP_NOISE)  # its own handler; the filter stays when it sets levels
    sys.stdout = _FilteredStream(sys.stdout)


def setup_logging(rank: int = 0, fmt: str = "%(asctime)s %(message)s", stream=None) -> None:
    """Our log lines in ``fmt`` on ``stream`` (default stdout): INFO on rank 0, warnings only on other ranks.

    One root handler, so other libraries' warnings still show; their level stays Python's default (WARNING), so
    their INFO lines stay out, unlike ``logging.basicConfig(level=INFO)``. Calling it again replaces it."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "pretrain"]:
        root.removeHandler(old)
    handler = logging.StreamHandler(sys.stdout if stream is None else stream)
    handler.set_name("pretrain")
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    if os.environ.get("PRETRAIN_VERBOSE") != "1":
        handler.addFilter(_DROP_NOISE)  # a library that sets its own logger to INFO
    root.addHandler(handler)
    logging.getLogger("pretrain").setLevel(logging.INFO if rank == 0 else logging.WARNING)
