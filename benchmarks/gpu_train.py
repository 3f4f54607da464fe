"""GPU training speed and numerics of our GPT (Llama flavour) on one device, in one run.

Times real training steps of :class:`pretrain.engine.LocalEngine` (the trainer's engine) for the 125M, 350M
and 1.3B configs over attention backend (sdpa, flash_attn) x ``torch.compile`` x activation checkpointing and
prints tokens/s, achieved TFLOP/s (PaLM count, ``pretrain.models.flops``), MFU against the device's bf16 dense
peak and against a measured large bf16 matmul, peak memory, host syncs per step and the step-time breakdown
(data / forward / backward / optimizer, from CUDA events recorded by hooks: no extra syncs inside the step).
Before timing it checks numerics: attention backends vs the fp32 reference, the bf16 loss curve vs fp32 on a
tiny model, and DeepSpeed ZeRO-1/2 (``pretrain.parallel.engine``) vs the plain engine.

    python benchmarks/gpu_train.py --out results.json                       # one GPU: checks + matrix
    python benchmarks/gpu_train.py --device cpu --dry-run --out dry.json    # same code path, tiny, CPU

Results are rewritten (JSON + markdown next to it) after every run, so a run stopped by ``--budget-s`` or a
time limit keeps what it measured; ``--resume`` continues a results file, skipping runs already in it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.checkpoint import write_atomic
from pretrain.config import Config, load_config
from pretrain.engines import build_engine
from pretrain.local_engine import LocalEngine
from pretrain.models import attention as attn_mod
from pretrain.models import build_model
from pretrain.models.flops import flops_per_token, gpt_param_count
from pretrain.models.layers import LocalLayers

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, also when loaded by path
from gpu_common import (ROOT, best_time, count_host_syncs, matmul_tflops, peak_tflops, step_batches,  # noqa: E402
                        sync, synthetic_samples, tiny_config)

MODELS = {"125m": "configs/gpt_125m.yaml", "350m": "configs/gpt_350m.yaml", "1.3b": "configs/gpt_1.3b.yaml"}
BACKENDS = ("sdpa", "flash_attn")  # timed; "reference" is the checks' yardstick only
MICRO_BATCH = {"125m": 16, "350m": 8, "1.3b": 4}  # seq 2048; estimated to fit 80 GB without checkpointing
TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.vocab_size=256"]
ATTN_TOL = {"out": 2e-2, "grad": 5e-2}  # max |err| / max |ref|, bf16 inputs (bf16 eps = 2^-8 ~ 4e-3)
BF16_LOSS_ATOL = 0.1  # nats: bf16 autocast vs fp32 loss, every step of the tiny run (loss 5.5 -> ~2)
ZERO_RTOL = {"fp32": 1e-4, "bf16": 2e-2}  # ZeRO vs plain loss; DeepSpeed bf16 keeps bf16 weights, we autocast


# --- configs ----------------------------------------------------------------------------------------------
def bench_config(name: str, args, backend: str, checkpointing: bool, precision: str) -> Config:
    """The model section of ``configs/gpt_<name>.yaml`` in Llama flavour, with the benchmark's batch layout."""
    micro = args.micro_batch or (2 if args.dry_run else MICRO_BATCH[name])
    overrides = ["model.flavour=llama", f"model.attention_backend={backend}",
                 f"model.activation_checkpointing={'full' if checkpointing else 'none'}",
                 f"data.seq_length={args.seq}", f"train.micro_batch_size={micro}",
                 f"train.global_batch_size={micro * args.accum}", f"train.precision={precision}",
                 f"train.device={args.device}", "train.seed=0", "schedule.rampup_start=null", "parallel.zero=0",
                 "checkpoint.dir=null", "optimizer.lr=1e-4", *(TINY if args.dry_run else ()),
                 f"model.max_seq_len={args.seq}"]
    return load_config(ROOT / MODELS[name], overrides)


# --- timing -----------------------------------------------------------------------------------------------
class PhaseTimer:
    """Marks on the device timeline (CUDA events; wall clock on CPU), read once after the timed steps."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = []

    def mark(self, name: str) -> None:
        value = torch.cuda.Event(enable_timing=True) if self.cuda else time.perf_counter()
        if self.cuda:
            value.record()
        self.marks.append((name, value))

    def _ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def breakdown(self) -> dict[str, float]:
        """Mean ms per step: data (step start to first forward: host-to-device copies), forward, backward (incl.
        clipping and the engine's host syncs), optimizer, other (zero_grad, bookkeeping)."""
        steps: list[dict[str, list]] = []
        for name, value in self.marks:
            if name == "start":
                steps.append({})
            steps[-1].setdefault(name, []).append(value)
        totals = dict.fromkeys(("data", "forward", "backward", "optimizer", "other"), 0.0)
        for marks in steps:
            fwd = sum(self._ms(a, b) for a, b in zip(marks["fwd_start"], marks["fwd_end"]))
            opt_start = marks.get("opt_start", marks["end"])[0]
            opt_end = marks.get("opt_end", marks["end"])[0]
            totals["data"] += self._ms(marks["start"][0], marks["fwd_start"][0])
            totals["forward"] += fwd
            totals["backward"] += self._ms(marks["fwd_start"][0], opt_start) - fwd
            totals["optimizer"] += self._ms(opt_start, opt_end)
            totals["other"] += self._ms(opt_end, marks["end"][0])
        return {k: v / max(len(steps), 1) for k, v in totals.items()}


def top_ops(device: torch.device, fn, n: int = 12) -> list[dict]:
    """The ``n`` ops/kernels with the most self time (device time on CUDA) in ``fn()``: where a step goes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])) \
            as prof:
        fn()
        sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    total = sum(getattr(e, attr) for e in events) or 1.0
    top = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:n]
    return [{"name": e.key[:90], "calls": e.count, "ms": getattr(e, attr) / 1e3, "share": getattr(e, attr) / total}
            for e in top]


def time_training(cfg: Config, args, compile_backend: str | None, matmul: float, peak: float | None,
                  profile: bool = False) -> dict:
    """Warm up, then time ``args.steps`` engine steps with one sync at the end; breakdown from the hooks."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    with device:  # parameters are initialised where they live
        model = build_model(cfg.family, cfg.model, LocalLayers(fused_loss=not compile_backend))
    n_params = gpt_param_count(cfg.model)
    torch._dynamo.reset()  # drop the previous run's compiled graphs (and the weights they hold)
    torch._dynamo.utils.counters.clear()
    if compile_backend:
        model = torch.compile(model, backend=compile_backend)
    engine = LocalEngine(cfg, model, device)
    timer = PhaseTimer(device)
    engine.model.register_forward_pre_hook(lambda *_: timer.mark("fwd_start"))
    engine.model.register_forward_hook(lambda *_: timer.mark("fwd_end"))
    engine.optimizer.register_step_pre_hook(lambda *_: timer.mark("opt_start"))
    engine.optimizer.register_step_post_hook(lambda *_: timer.mark("opt_end"))
    t = cfg.train
    accum = t.global_batch_size // t.micro_batch_size
    pool = synthetic_samples(2 * t.global_batch_size, args.seq, cfg.model.vocab_size, seed=1)
    data_s, losses = 0.0, []

    def step(i: int) -> None:
        nonlocal data_s
        t0 = time.perf_counter()
        batches = step_batches(pool, i, t.micro_batch_size, accum)
        data_s += time.perf_counter() - t0
        timer.mark("start")
        losses.append(engine.train_step(batches, cfg.optimizer.lr).loss)
        timer.mark("end")

    warm0 = time.perf_counter()
    for i in range(args.warmup):
        step(i)
    sync(device)
    warmup_s = time.perf_counter() - warm0
    timer.marks.clear()
    data_s = 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i)
    sync(device)
    wall = (time.perf_counter() - t0) / args.steps
    parts_ms = timer.breakdown()
    parts_ms["data"] += 1e3 * data_s / args.steps  # + collating on the host
    syncs = count_host_syncs(device, lambda: step(args.warmup + args.steps))
    ops = top_ops(device, lambda: step(args.warmup + args.steps + 1)) if profile else None
    tokens = t.global_batch_size * args.seq
    tflops = tokens / wall * flops_per_token(cfg.model, args.seq) / 1e12
    parts_ms["host_gap"] = 1e3 * wall - sum(parts_ms.values())  # time the device waited outside the marks
    counters = torch._dynamo.utils.counters
    graphs = (counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())) if compile_backend else ()
    if not all(math.isfinite(x) for x in losses):
        raise FloatingPointError(f"non-finite loss during timing: {losses}")
    return {"params_m": n_params / 1e6, "micro_batch": t.micro_batch_size, "accum": accum,
            "tokens_per_step": tokens, "step_ms": 1e3 * wall, "tokens_per_s": tokens / wall, "tflops": tflops,
            "mfu_peak": tflops / peak if peak else None, "mfu_matmul": tflops / matmul,
            "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "breakdown_ms": parts_ms, "host_syncs_per_step": syncs, "warmup_s": warmup_s,
            "compiled_graphs": graphs[0] if graphs else None, "graph_breaks": graphs[1] if graphs else None,
            "loss_first": losses[0], "loss_last": losses[-1], "top_ops": ops}


# --- correctness checks ------------------------------------------------------------------------------------
def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-6))


def check_attention(device: torch.device, dry_run: bool) -> dict:
    """Each available backend vs ``reference`` (fp32 math on the same bf16 inputs): output and q/k/v grads."""
    torch.manual_seed(0)
    b, s, hq, hkv, d = (2, 64, 4, 2, 32) if dry_run else (2, 1024, 16, 4, 128)
    docs = torch.cumsum(torch.rand(b, s, device=device) < 4 / s, dim=1)  # ~4 documents per row
    results, ok = {}, True
    for backend, (name, kw) in itertools.product(BACKENDS, [
            ("causal_gqa", {}), ("causal_documents", {"document_ids": docs})]):
        if backend == "flash_attn" and (attn_mod.flash_attn_func is None or device.type != "cuda"):
            results[f"{backend}/{name}"] = "skipped: flash-attn not importable (or not on CUDA)"
            continue
        q, k, v = (torch.randn(b, s, h, d, device=device, dtype=torch.bfloat16, requires_grad=True)
                   for h in (hq, hkv, hkv))
        grad_out = torch.randn(b, s, hq, d, device=device, dtype=torch.bfloat16)
        outs = {}
        for which in (backend, "reference"):
            out = attn_mod.attention(q, k, v, causal=True, backend=which, **kw)
            outs[which] = (out, *torch.autograd.grad(out, (q, k, v), grad_out))
        errs = dict(zip(("out", "dq", "dk", "dv"), map(_rel_err, outs[backend], outs["reference"])))
        errs["passed"] = errs["out"] <= ATTN_TOL["out"] and max(errs["dq"], errs["dk"], errs["dv"]) <= ATTN_TOL["grad"]
        ok &= errs["passed"]
        results[f"{backend}/{name}"] = errs
    return {"passed": ok, "tolerance": ATTN_TOL, "shape_bshd": [b, s, hq, hkv, d], "cases": results}


def train_losses(engine, cfg: Config, steps: int) -> tuple[list[float], list[float]]:
    pool = synthetic_samples(2 * cfg.train.global_batch_size, cfg.data.seq_length, cfg.model.vocab_size, seed=2)
    accum = cfg.train.global_batch_size // cfg.train.micro_batch_size
    outs = [engine.train_step(step_batches(pool, i, cfg.train.micro_batch_size, accum), cfg.optimizer.lr)
            for i in range(steps)]
    return [o.loss for o in outs], [o.grad_norm for o in outs]


def check_bf16_vs_fp32(args) -> dict:
    """The bf16-autocast loss curve of a tiny model tracks the fp32 one (same init, same data)."""
    steps = 6 if args.dry_run else 30
    cfgs = {p: tiny_config(args, p) for p in ("fp32", "bf16")}
    curves = {p: train_losses(build_engine(cfg), cfg, steps)[0] for p, cfg in cfgs.items()}
    diff = max(abs(a - b) for a, b in zip(curves["bf16"], curves["fp32"]))
    learned = curves["fp32"][-1] < curves["fp32"][0]
    return {"passed": diff <= BF16_LOSS_ATOL and learned, "steps": steps, "max_abs_diff": diff,
            "tolerance": BF16_LOSS_ATOL, "fp32": curves["fp32"], "bf16": curves["bf16"]}


def check_zero(args) -> dict:
    """DeepSpeed ZeRO-1/2 on one device (``pretrain.parallel.engine``) vs the plain engine: losses and grad norms."""
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:
        return {"passed": None, "skipped": f"deepspeed not importable: {e}"}
    with socket.socket() as sock:  # a one-process group on a free port
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", port), ("RANK", "0"), ("WORLD_SIZE", "1"),
                       ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    steps, results, ok = (3 if args.dry_run else 10), {}, True
    for precision in ("fp32",) if args.device == "cpu" else ("fp32", "bf16"):
        cfg = tiny_config(args, precision)
        plain = train_losses(build_engine(cfg), cfg, steps)
        for zero in (1, 2):
            cfg = tiny_config(args, precision, zero)
            ds = train_losses(build_engine(cfg, parallel=True), cfg, steps)
            loss_rel = max(abs(a - b) / abs(b) for a, b in zip(ds[0], plain[0]))
            norm_rel = max(abs(a - b) / abs(b) for a, b in zip(ds[1], plain[1]))
            passed = max(loss_rel, norm_rel) <= ZERO_RTOL[precision]
            ok &= passed
            results[f"zero{zero}/{precision}"] = {"loss_max_rel": loss_rel, "grad_norm_max_rel": norm_rel,
                                                  "passed": passed, "losses": ds[0], "plain": plain[0]}
    if dist.is_initialized():
        dist.destroy_process_group()
    return {"passed": ok, "tolerance": ZERO_RTOL, "steps": steps, "cases": results}


def time_attention_kernels(device: torch.device, dry_run: bool) -> dict:
    """Causal attention forward+backward alone at the 1.3B shape, per SDPA kernel and flash-attn: what the
    ``sdpa`` backend's dispatcher picks vs the best available kernel. TFLOP/s counts the causal half only."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, s, h, d = (2, 64, 4, 32) if dry_run else (4, 2048, 16, 128)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(b, s, h, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    kernels = {"sdpa (dispatcher)": ("sdpa", None), "sdpa flash": ("sdpa", SDPBackend.FLASH_ATTENTION),
               "sdpa cudnn": ("sdpa", SDPBackend.CUDNN_ATTENTION),
               "sdpa efficient": ("sdpa", SDPBackend.EFFICIENT_ATTENTION), "flash_attn": ("flash_attn", None)}
    out = {"shape_bshd": [b, s, h, d], "dtype": str(dtype)}
    for name, (backend, kernel) in kernels.items():
        def call():
            with sdpa_kernel([kernel]) if kernel is not None else contextlib.nullcontext():
                attn_mod.attention(q, k, v, causal=True, backend=backend).sum().backward()
        try:
            ms = 1e3 * best_time(call, device)
            out[name] = {"ms": ms, "tflops": 7 * b * s * s * h * d / ms / 1e9}  # 3.5 x 4bs^2hd / 2
        except (RuntimeError, ValueError) as e:  # kernel not available for this device/dtype/shape
            out[name] = {"error": str(e).splitlines()[0][:200]}
    return out


def run_checks(args) -> dict:
    checks = {}
    for name, fn in (("attention", lambda: check_attention(torch.device(args.device), args.dry_run)),
                     ("bf16_vs_fp32", lambda: check_bf16_vs_fp32(args)), ("deepspeed_zero", lambda: check_zero(args))):
        t0 = time.perf_counter()
        try:
            checks[name] = fn()
        except Exception as e:  # a broken check is a result, not the end of the run
            checks[name] = {"passed": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
        checks[name]["seconds"] = time.perf_counter() - t0
        print(f"check {name}: {_verdict(checks[name])} ({checks[name]['seconds']:.1f} s)", flush=True)
    return checks


# --- report -----------------------------------------------------------------------------------------------
def _verdict(check: dict) -> str:
    if check.get("error"):
        return "ERROR " + check["error"]
    return {True: "pass", False: "FAIL", None: "skipped"}[check["passed"]] + (
        f" ({check['skipped']})" if check.get("skipped") else "")


def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def markdown(results: dict) -> str:
    env = results["env"]
    lines = [f"device: {env['device']} | torch {env['torch']} (CUDA {env['cuda']}) | flash-attn "
             f"{env['flash_attn']} | bf16 peak {_f(env['peak_tflops'], '.0f')} TFLOP/s | measured matmul "
             f"{env['matmul_tflops']:.1f} TFLOP/s | seq {env['seq']}", "",
             "| check | result |", "|---|---|"]
    lines += [f"| {name} | {_verdict(c)} |" for name, c in results["checks"].items()]
    kernels = results.get("attention_kernels", {})
    if kernels:
        lines += ["", f"attention fwd+bwd alone, shape (b, s, h, d) {kernels['shape_bshd']}:", "",
                  "| kernel | ms | TFLOP/s |", "|---|---|---|"]
        lines += [f"| {k} | {_f(v.get('ms'), '.2f')} | {_f(v.get('tflops'), '.3g')} |" if "ms" in v else
                  f"| {k} | - | {v['error']} |" for k, v in kernels.items() if isinstance(v, dict)]
    lines += ["", "| model | attention | compile | ckpt | mb x accum | tokens/s | TFLOP/s | MFU peak | MFU matmul "
              "| mem GB | data | fwd | bwd | opt | other | host gap (ms) | syncs/step | status |",
              "|" + "---|" * 18]
    for r in results["runs"]:
        b = r.get("breakdown_ms") or {}
        lines.append(
            f"| {r['model']} | {r['backend']} | {r['compile']} | {r['checkpointing']} | "
            f"{_f(r.get('micro_batch'), 'd')} x {_f(r.get('accum'), 'd')} | {_f(r.get('tokens_per_s'), ',.0f')} | "
            f"{_f(r.get('tflops'), '.3g')} | {_f(r.get('mfu_peak'), '.1%')} | {_f(r.get('mfu_matmul'), '.1%')} | "
            f"{_f(r.get('peak_mem_gb'), '.1f')} | " + " | ".join(
                _f(b.get(k), '.1f') for k in ("data", "forward", "backward", "optimizer", "other", "host_gap"))
            + f" | {_f(r.get('host_syncs_per_step'), 'd')} | {r['status']} |")
    ok = [r for r in results["runs"] if r["status"] == "ok"]
    for model in dict.fromkeys(r["model"] for r in ok):
        best = max((r for r in ok if r["model"] == model), key=lambda r: r["tflops"])
        lines.append(f"\nbest {model}: {best['tflops']:.3g} TFLOP/s = {_f(best['mfu_peak'], '.1%')} MFU of peak, "
                     f"{best['mfu_matmul']:.1%} of matmul ({best['backend']}, compile {best['compile']}, "
                     f"ckpt {best['checkpointing']}, {best['peak_mem_gb'] or 0:.1f} GB)")
    for r in results["runs"]:
        if r.get("top_ops"):
            lines += ["", f"top ops of one step, {r['model']} {r['backend']} compile {r['compile']} (self time):", "",
                      "| op | calls | ms | share |", "|---|---|---|---|"]
            lines += [f"| `{o['name']}` | {o['calls']} | {o['ms']:.2f} | {o['share']:.1%} |" for o in r["top_ops"]]
    return "\n".join(lines) + "\n"


def save(results: dict, out: Path | None) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, json.dumps(results, indent=1, default=float))
        write_atomic(out.with_suffix(".md"), markdown(results))


# --- main -------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    both = {"off": [False], "on": [True], "both": [False, True]}
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--dry-run", action="store_true", help="tiny configs and few steps: the code path, not speed")
    p.add_argument("--models", default="1.3b,350m,125m", help=f"comma list of {sorted(MODELS)}")
    p.add_argument("--backends", default="sdpa,flash_attn")
    p.add_argument("--compile", choices=both, default="both")
    p.add_argument("--checkpointing", choices=both, default="both")
    p.add_argument("--compile-backend", default=None, help="default: inductor (aot_eager in --dry-run)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 2048; 32 in --dry-run)")
    p.add_argument("--micro-batch", type=int, default=None, help=f"default per model: {MICRO_BATCH}")
    p.add_argument("--accum", type=int, default=None, help="micro-batches per optimizer step (default 4; 1 dry)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default 8; 2 in --dry-run)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; 1 in --dry-run)")
    p.add_argument("--budget-s", type=float, default=480.0, help="start no new run after this many seconds")
    p.add_argument("--skip-checks", action="store_true")
    p.add_argument("--resume", type=Path, default=None, help="results JSON to continue (runs in it are skipped)")
    p.add_argument("--out", type=Path, default=None, help="results JSON (markdown table written next to it)")
    args = p.parse_args(argv)
    dry = args.dry_run
    for key, full, tiny in (("seq", 2048, 32), ("accum", 4, 1), ("steps", 8, 2), ("warmup", 3, 1),
                            ("compile_backend", "inductor", "aot_eager")):
        if getattr(args, key) is None:
            setattr(args, key, tiny if dry else full)
    args.models, args.backends = args.models.split(","), args.backends.split(",")
    args.compile, args.checkpointing = both[args.compile], both[args.checkpointing]
    for flag, given, valid in (("--models", args.models, MODELS), ("--backends", args.backends, BACKENDS)):
        if set(given) - set(valid):
            p.error(f"{flag}: unknown {sorted(set(given) - set(valid))}; choose from {', '.join(valid)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible (use --device cpu --dry-run to test the code path)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before the first allocation
    device = torch.device(args.device)
    start = time.perf_counter()
    torch.set_float32_matmul_precision("highest")  # fp32 references stay fp32 (no TF32)
    fa = attn_mod.flash_attn_func is not None and __import__("flash_attn").__version__
    matmul = matmul_tflops(device, *((8192, torch.bfloat16) if device.type == "cuda" else (256, torch.float32)))
    results = json.loads(args.resume.read_text()) if args.resume else {"checks": {}, "runs": []}
    results["runs"] = [r for r in results["runs"] if r["status"] != "skipped: budget"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results["env"] = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
                      "flash_attn": fa or None, "peak_tflops": peak_tflops(name), "matmul_tflops": matmul,
                      "seq": args.seq, "args": {k: str(v) for k, v in vars(args).items()}}
    print(f"{results['env']['device']}: bf16 peak {results['env']['peak_tflops']} TFLOP/s, "
          f"measured matmul {matmul:.1f} TFLOP/s", flush=True)
    if not args.skip_checks and not results["checks"]:
        results["checks"] = run_checks(args)
        results["attention_kernels"] = time_attention_kernels(device, args.dry_run)
        save(results, args.out)
    done = {(r["model"], r["backend"], r["compile"], r["checkpointing"]) for r in results["runs"]}
    precision = "bf16" if device.type == "cuda" else "fp32"
    for model, ckpt, backend, comp in itertools.product(args.models, args.checkpointing, args.backends, args.compile):
        key = (model, backend, "on" if comp else "off", "on" if ckpt else "off")
        if key in done:
            continue
        row = dict(zip(("model", "backend", "compile", "checkpointing"), key))
        if backend == "flash_attn" and (not fa or device.type != "cuda"):
            row["status"] = "skipped: flash-attn not importable"
        elif time.perf_counter() - start > args.budget_s:
            row["status"] = "skipped: budget"
        else:
            t0 = time.perf_counter()
            try:
                cfg = bench_config(model, args, backend, ckpt, precision)
                row.update(time_training(cfg, args, args.compile_backend if comp else None, matmul,
                                         results["env"]["peak_tflops"], profile=backend == "sdpa" and not ckpt),
                           status="ok")
            except torch.OutOfMemoryError:
                row["status"] = "OOM"
            except Exception as e:  # keep measuring the rest of the matrix
                row.update(status=f"error: {type(e).__name__}: {str(e)[:300]}", trace=traceback.format_exc())
            row["seconds"] = time.perf_counter() - t0
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results["runs"].append(row)
        print(f"{'/'.join(key)}: {row['status']}" + (
            f" | {row['tokens_per_s']:,.0f} tok/s | {row['tflops']:.3g} TFLOP/s | MFU(matmul) "
            f"{row['mfu_matmul']:.1%}" if row["status"] == "ok" else ""), flush=True)
        save(results, args.out)
    results["seconds"] = time.perf_counter() - start
    save(results, args.out)
    print("\n" + markdown(results))
    left = sorted({r["model"] for r in results["runs"] if r["status"] == "skipped: budget"})
    if left and args.out:
        print(f"budget reached; continue with: --resume {args.out} --models {','.join(left)}")
    return results


if __name__ == "__main__":
    main()
