"""Sparse vs dense attention on CPU: time and peak memory of one attention call from 1k to 32k tokens.

Reference: dense causal attention, ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)`` (torch's
fused CPU kernel, which never materialises the scores). Against it, the sliding-window pattern of
:mod:`pretrain.models.patterns` (causal, ``--window`` keys, ``--global-tokens`` global tokens) through both of its
kernels, as the model runs them (:func:`pretrain.models.attention.attention`):

* ``mask``: SDPA with the pattern's boolean ``[S, S]`` mask (what CPU training uses): the same dense work plus
  the mask, so it only shows what the mask costs;
* ``flex``: compiled ``flex_attention`` on the pattern's ``BlockMask`` (built compiled once per length and
  cached; the build is timed separately): work and memory grow with the pattern's nonzeros, ``S * window``
  instead of ``S^2 / 2``.

Forward only, no grad (torch has no CPU backward for flex_attention; on CUDA it trains). Each size runs after a
warm-up call (the compile); times are the median of ``--repeats``. Peak memory is the rise of the process's peak
resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` before each call) above its resident set before
the call, so it counts what the call allocates, inputs excluded. Sizes whose boolean mask would pass
``--max-mask-gib`` are skipped for the ``mask`` kernel.

    python benchmarks/bench_sparse.py [--sizes 1024,2048,...] [--window 512] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import re
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pretrain.models.attention import attention
from pretrain.models.patterns import SparseConfig, attention_mask_for, build_block_mask

STATUS = Path("/proc/self/status")


def _kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", STATUS.read_text()).group(1))


def measure(fn, repeats: int) -> tuple[float, float]:
    """(median seconds, peak MiB allocated by one call) of ``fn()``."""
    fn()  # warm-up: compile, first-touch
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    before = _kib("VmRSS")
    fn()
    return statistics.median(times), (_kib("VmHWM") - before) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1024,2048,4096,8192,16384,32768")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--global-tokens", type=int, default=0)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-mask-gib", type=float, default=0.3, help="skip the mask kernel above this mask size")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pattern = dict(pattern="sliding_window", window=args.window, global_tokens=args.global_tokens)
    print(f"one causal attention call, fp32, batch 1, {args.heads} heads x {args.head_dim}, sliding window "
          f"{args.window}, {args.global_tokens} global tokens, {args.threads} threads, median of {args.repeats}")
    print(f"{'tokens':>7} {'dense ms':>9} {'dense MiB':>9} {'mask ms':>8} {'mask MiB':>8} {'flex ms':>8} "
          f"{'flex MiB':>8} {'blockmask ms':>12} {'flex/dense':>10} {'nonzero':>8}")
    for s in (int(x) for x in args.sizes.split(",")):
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, s, args.heads, args.head_dim, generator=gen) for _ in range(3))

        def dense():
            with torch.no_grad():
                F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)

        dense_t, dense_m = measure(dense, args.repeats)
        mask_cell = f"{'skipped':>8} {'':>8}"
        if s * s / 2**30 <= args.max_mask_gib:
            cfg = SparseConfig(**pattern)

            def masked():
                with torch.no_grad():
                    mask = attention_mask_for(cfg, s, s, causal=True)
                    attention(q, k, v, causal=True, backend="sdpa", mask=mask)

            mask_t, mask_m = measure(masked, args.repeats)
            mask_cell = f"{mask_t * 1e3:8.1f} {mask_m:8.0f}"
        flex_cfg = SparseConfig(**pattern, kernel="flex")
        block = attention_mask_for(flex_cfg, s, s, causal=True)  # compiles the construction; cached for the model
        start = time.perf_counter()
        build_block_mask(flex_cfg, s, True, None, None)
        build_s = time.perf_counter() - start

        def flex():
            with torch.no_grad():
                attention(q, k, v, causal=True, mask=block)

        flex_t, flex_m = measure(flex, args.repeats)
        nonzero = sum(min(i + 1, args.window) for i in range(s)) / (s * s)  # the window's share (globals aside)
        print(f"{s:7d} {dense_t * 1e3:9.1f} {dense_m:9.0f} {mask_cell} {flex_t * 1e3:8.1f} {flex_m:8.0f} "
              f"{build_s * 1e3:12.1f} {flex_t / dense_t:10.2f} {nonzero:8.3f}", flush=True)


if __name__ == "__main__":
    main()
