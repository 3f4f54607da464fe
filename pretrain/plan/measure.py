"""Measured peak memory of a few training steps on CPU, to check :mod:`pretrain.plan.memory` against.

Method: torch's profiler with ``profile_memory=True`` records every allocation and free of the CPU allocator
(c10's ``reportMemoryUsage``, the same hook the CUDA caching allocator's statistics come from), with its
size and time. Summed in time order from before the engine is built, the running total is the bytes of live
tensors on this rank (model, gradients, optimizer state, saved activations, temporaries, communication
buffers), and its maximum is the peak. Unlike RSS it excludes the interpreter, imported libraries and freed
pages the C allocator keeps, which the planner does not model on a GPU either (there: its overhead constant).

Frees on other threads: the profiler only records allocator events of threads that carry its thread-local
state (ours and autograd's). A tensor handed to a gloo collective is also referenced by the collective's work
object, which gloo's worker thread drops after running it; when that reference is the last one (a race with
our thread dropping its own), the free happens on the worker thread and is never recorded, so the tensor
would count as live for the rest of the run, by an amount that changes from run to run. Each event carries
the block's address, so such a block is recognised (its address is allocated again, or it is never freed)
and closed when the top-level operation that allocated it (the autograd function, module forward or
collective) ends: only ours dropped it before gloo's worker did, so our thread was done with it by then;
at the latest when its address is handed out again. (This made tensor- and expert-parallel peaks swing by up
to 10 % with timing and sequence-parallel ones, which reduce-scatter and all-gather every block, read 23-42 % high.)
"""

from __future__ import annotations

import gc

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from pretrain.config import Config
from pretrain.plan.memory import micro_batch_count


def _walk(nodes):
    for node in nodes:
        yield node
        yield from _walk(node.children)


def _top_end(node, window: str | None) -> int | None:
    """End time of the outermost operation that encloses ``node`` below the ``window`` region (None: none)."""
    chain = []
    while node.parent is not None:
        node = node.parent
        chain.append(node)
    if chain and chain[-1].name == window:
        chain.pop()
    return chain[-1].end_time_ns if chain else None


def _inside(time: int, spans: list[tuple[int, int]]) -> bool:
    return any(lo <= time <= hi for lo, hi in spans)


def peak_bytes(tree, window: str | None = None) -> int:
    """Highest running total of the allocations in the profiler's event ``tree`` (``experimental_event_tree()``);
    with ``window``, only while the ``record_function(window)`` region runs (the total still counts everything
    before it). A block whose free was not recorded (freed on gloo's worker thread: see the module docstring)
    is closed when the top-level operation that allocated it ended, or when its address is allocated again if
    that is earlier; one never freed that was allocated before the window stays live (DeepSpeed keeps its
    buckets past the engine)."""
    from torch._C._profiler import _EventType

    nodes = list(_walk(tree))
    spans = [(n.start_time_ns, n.end_time_ns) for n in nodes if window and n.name == window]
    allocations = sorted((n.start_time_ns, n.extra_fields.ptr, n.extra_fields.alloc_size, _top_end(n, window))
                         for n in nodes if n.tag == _EventType.Allocation)
    changes, live = [], {}
    for time, ptr, size, top_end in allocations:
        if size < 0 and ptr not in live:  # allocated before counting started
            changes.append((time, size))
            continue
        if ptr in live:  # freed now, or (a new block at a live address) freed unseen before now
            old = live.pop(ptr)  # (size, end of its top-level operation, allocated inside the window)
            changes.append((time if size < 0 else min(time, old[1] or time), -old[0]))
        if size > 0:
            live[ptr] = (size, top_end, _inside(time, spans))
            changes.append((time, size))
    changes += [(v[1], -v[0]) for v in live.values() if v[1] is not None and v[2]]
    total = peak = 0
    for time, delta in sorted(changes):
        total += delta
        if not window or _inside(time, spans):
            peak = max(peak, total)
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

    micro = micro_batch_count(cfg, data_parallel)
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
    return peak_bytes(prof.profiler.kineto_results.experimental_event_tree(), "pretrain.plan.steps")
