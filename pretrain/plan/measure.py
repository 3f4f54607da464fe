"""Measured peak memory of a few training steps on CPU, to check :mod:`pretrain.plan.memory` against.

Method: torch's profiler with ``profile_memory=True`` records every allocation and free of the CPU allocator
(c10's ``reportMemoryUsage``, the same hook the CUDA caching allocator's statistics come from), with its
size and time. Summed in time order from before the engine is built, the running total is the bytes of live
tensors on this rank (model, gradients, optimizer state, saved activations, temporaries, communication
buffers), and its maximum is the peak. Unlike RSS it excludes the interpreter, imported libraries and freed
pages the C allocator keeps, which the planner does not model on a GPU either (there: its overhead constant).
"""

from __future__ import annotations

import gc

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from pretrain.config import Config


def peak_bytes(events, window: str | None = None) -> int:
    """Highest running total of the allocator's ``[memory]`` events (bytes, frees negative); with ``window``,
    only while the ``record_function(window)`` region runs (the total still counts everything before it)."""
    spans = [(e.start_ns(), e.end_ns()) for e in events if window and e.name() == window]
    live = peak = 0
    for e in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        live += e.nbytes()
        if not window or any(lo <= e.start_ns() <= hi for lo, hi in spans):
            peak = max(peak, live)
    return peak


def random_batches(cfg: Config, count: int, seed: int = 0) -> list[dict]:
    """``count`` micro-batches of random tokens in the family's batch format."""
    from pretrain.models.registry import family_spec

    g = torch.Generator().manual_seed(seed)
    b, d, vocab = cfg.train.micro_batch_size, cfg.data, cfg.model.vocab_size
    out = []
    for _ in range(count):
        batch = {"input_ids": torch.randint(0, vocab, (b, d.seq_length), generator=g)}
        length = d.seq_length
        if family_spec(cfg.family).dataset == "t5":
            length = d.decoder_seq_length
            batch["decoder_input_ids"] = torch.randint(0, vocab, (b, length), generator=g)
        batch.update(labels=torch.randint(0, vocab, (b, length), generator=g), loss_mask=torch.ones(b, length))
        out.append(batch)
    return out


def measured_peak(cfg: Config, data_parallel: int, steps: int = 2) -> int:
    """Peak live CPU bytes of this rank during the last of ``steps`` training steps of ``cfg``'s engine (the
    steady state: counted from before the engine is built, so the model, optimizer state and everything else
    alive count; the build's and the first step's one-time transients do not: on a GPU the model is drawn on
    the host)."""
    from pretrain.engines import build_engine

    cp = getattr(cfg.parallel, "cp", 1)
    micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * (data_parallel // cp))
    batches = random_batches(cfg, micro)
    gc.collect()  # what earlier runs in this process left behind is freed before counting starts
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        engine = build_engine(cfg)
        for _ in range(steps - 1):  # the first step allocates the optimizer state and lazy buffers
            engine.train_step(batches, lr=1e-3)
        with record_function("pretrain.plan.steps"):
            engine.train_step(batches, lr=1e-3)
        del engine
        gc.collect()
    return peak_bytes(prof.profiler.kineto_results.events(), "pretrain.plan.steps")
