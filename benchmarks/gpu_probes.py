"""The GPU check's probes (``benchmarks/gpu_check.sh``): what reading the code can only predict, measured through
the public entry points (config -> ``build_model`` / ``build_engine`` -> forward / ``train_step``), so they hold
whatever the engines and attention backends do inside.

    python benchmarks/gpu_probes.py attention --device cuda --out attention.json   # SDPA/flash kernel per case
    torchrun --nproc-per-node 2 benchmarks/gpu_probes.py steps --device cpu --layouts pp2,ep2,tp2 --out s.json
    python benchmarks/gpu_probes.py steps --device cuda --layouts local,zero1 --out steps.json
    python benchmarks/gpu_probes.py parity --device cuda --out parity.json           # bf16 vs fp32 losses
    python benchmarks/gpu_probes.py table OUT_DIR                                     # one table of everything

``steps`` reports per layout, with ``train.precision=bf16``: the engine class, the dtypes every linear layer
computed in (their output dtype; bf16 = the config's precision is honoured), forwards of the rank's first
linear layer per optimizer step (= micro-batches, unless a schedule is rebuilt), and host syncs per step
(``tests/host_syncs.py``'s dispatch-mode counter: ``.item()``/``nonzero``..., plus ``.tolist()`` calls).
``--tiny`` shrinks every model (the CPU dry run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/
from gpu_common import ROOT, best_time, peak_tflops, step_batches, synthetic_samples  # noqa: E402

sys.path.insert(0, str(ROOT))
from pretrain.config import load_config  # noqa: E402
from pretrain.data.loader import collate  # noqa: E402
from pretrain.engines import build_engine  # noqa: E402
from pretrain.models import build_model  # noqa: E402
from tests.host_syncs import HostSyncCounter  # noqa: E402

SDPA_KERNELS = {"flash": "_scaled_dot_product_flash_attention", "cudnn": "_scaled_dot_product_cudnn_attention",
                "efficient": "_scaled_dot_product_efficient_attention", "math": "_scaled_dot_product_attention_math",
                "flash-attn": "flash_attn"}
LAYOUTS = {"local": ([], "configs/gpt_tiny.yaml"), "zero1": (["parallel.zero=1"], "configs/gpt_tiny.yaml"),
           "zero3": (["parallel.zero=3"], "configs/gpt_tiny.yaml"), "tp2": (["parallel.tp=2"], "configs/gpt_tiny.yaml"),
           "tp2_sp": (["parallel.tp=2", "parallel.sp=true"], "configs/gpt_tiny.yaml"),
           "pp2": (["parallel.pp=2"], "configs/gpt_tiny.yaml"),
           "ep2": (["parallel.ep=2"], "configs/switch_gpt_tiny.yaml")}
TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
        "model.vocab_size=256"]


def config(file: str, args, extra: list[str], seq: int):
    return load_config(ROOT / file, [f"data.seq_length={seq}", f"model.max_seq_len={seq}",
                                     f"train.device={args.device}", "train.precision=bf16", "checkpoint.dir=null",
                                     "train.seed=0", "train.micro_batch_size=2", "train.global_batch_size=8",
                                     *(TINY if args.tiny else []), *extra])


def batches(cfg, n: int, micro: int, docs: int = 1) -> list[dict]:
    """``n`` micro-batches of ``micro`` rows in the dataset format, ``docs`` equal documents per row."""
    seq = cfg.data.seq_length
    pool = synthetic_samples(n * micro, seq, cfg.model.vocab_size, 0)
    for s in pool:
        s["document_ids"] = torch.arange(seq).mul(docs).div(seq, rounding_mode="floor").numpy()
        s["position_ids"] = (torch.arange(seq) - torch.as_tensor(s["document_ids"]) * (seq // docs)).numpy()
    return [collate(pool[i * micro:(i + 1) * micro]) for i in range(n)]


def kernels_in(fn) -> list[str]:
    """Which attention kernels ``fn()`` ran (profiler op names)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.key for e in prof.key_averages()}
    return sorted(k for k, op in SDPA_KERNELS.items() if any(op in n for n in names))


def attention(args) -> dict:
    """Kernel per case: a model forward+backward (bf16 autocast) per backend x masking x GQA, plus fp32."""
    seq, out = (32 if args.tiny else 2048), {}
    device = torch.device(args.device)
    for backend in ("auto", "sdpa", "flash_attn"):
        for docs in (1, 4):
            for kv in ("gqa", "mha"):
                for precision in ("bf16", "fp32") if backend == "sdpa" and docs == 1 else ("bf16",):
                    name = f"{backend} {'documents' if docs > 1 else 'causal'} {kv} {precision}"
                    masked = str(docs > 1).lower()
                    extra = [f"model.attention_backend={backend}", f"data.document_mask={masked}",
                             f"model.document_masking={masked}", f"train.precision={precision}",
                             "model.num_kv_heads=" + ("2" if kv == "gqa" else "null")]
                    out[name] = _attention_case(args, device, extra, seq, docs, precision)
    return out


def _attention_case(args, device, extra, seq, docs, precision) -> dict:
    try:
        cfg = config("configs/gpt_1.3b.yaml" if not args.tiny else "configs/gpt_tiny.yaml", args, extra, seq)
        torch.manual_seed(0)
        with device:
            model = build_model(cfg.family, cfg.model)
        mb = {k: v.to(device) for k, v in batches(cfg, 1, 2, docs)[0].items()}
        if docs == 1:
            mb.pop("document_ids")

        def step():
            with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
                loss = model(**mb).loss
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
        step()
        repeats = (1, 1) if args.tiny else (3, 2)
        return {"kernels": kernels_in(step), "fwd_bwd_ms": round(1e3 * best_time(step, device, *repeats), 2)}
    except Exception as e:  # a case that cannot run is a result (e.g. flash_attn not importable)
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}


def steps(args) -> dict:
    """Per layout: engine, compute dtypes, forwards per step, host syncs per step (``train.precision=bf16``)."""
    out = {}
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))
    for layout in args.layouts.split(","):
        extra, file = LAYOUTS[layout]
        try:
            out[layout] = _step_probe(args, config(file, args, extra, 32 if args.tiny else 512), world)
        except Exception as e:
            out[layout] = {"error": f"{type(e).__name__}: {str(e)[:300]}", "trace": traceback.format_exc()[-1500:]}
    return out


def _step_probe(args, cfg, world: int) -> dict:
    engine = build_engine(cfg)
    dtypes: Counter = Counter()
    linears = [m for m in engine.model.modules() if _is_linear(m)]
    hooks = [m.register_forward_hook(lambda m, a, out: dtypes.update([_dtype(out)])) for m in linears]
    forwards = []
    hooks.append(linears[0].register_forward_hook(lambda m, a, out: forwards.append(1)))
    micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * engine.dp_size)
    pool = synthetic_samples(64, cfg.data.seq_length, cfg.model.vocab_size, 1)
    mine = [step_batches(pool, s * engine.dp_size + engine.dp_rank, cfg.train.micro_batch_size, micro)
            for s in range(3)]
    engine.train_step(mine[0], 1e-4)  # the first step builds what is built once
    per_step = []
    for s in (1, 2):
        forwards.clear()
        with HostSyncCounter() as syncs, _count_tolist() as tolist:
            result = engine.train_step(mine[s], 1e-4)
        per_step.append({"forwards": len(forwards), "syncs": len(syncs.ops) + len(tolist),
                         "sync_ops": sorted(set(syncs.ops) | set(tolist))})
    for h in hooks:
        h.remove()
    return {"engine": type(engine).__name__, "world": world, "linear_output_dtypes": dict(dtypes),
            "micro_batches_per_step": micro, "forwards_per_step": [p["forwards"] for p in per_step],
            "host_syncs_per_step": [p["syncs"] for p in per_step], "sync_ops": per_step[-1]["sync_ops"],
            "loss": _loss(result)}


@contextlib.contextmanager
def _count_tolist():
    """``.tolist()`` calls (a host sync the dispatch-mode counter does not see: it bypasses the dispatcher)."""
    calls, real = [], torch.Tensor.tolist

    def tolist(self):
        calls.append("tolist")
        return real(self)
    torch.Tensor.tolist = tolist
    try:
        yield calls
    finally:
        torch.Tensor.tolist = real


def _is_linear(module: torch.nn.Module) -> bool:
    """``nn.Linear`` and the tensor-parallel linears (a 2-D weight that is not an embedding table)."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 2 and not isinstance(module, torch.nn.Embedding)


def _dtype(out) -> str:
    """The dtype a layer computed in: its output's (autocast casts inside the matmul, not the inputs)."""
    first = out[0] if isinstance(out, (tuple, list)) else out
    return str(first.dtype).removeprefix("torch.")


def _loss(result) -> float:
    return float(result["loss"] if isinstance(result, dict) else result.loss)


def parity(args) -> dict:
    """bf16 autocast vs fp32 (TF32 off) losses over the same steps, from the same init and data."""
    file = "configs/gpt_tiny.yaml" if args.tiny else "configs/gpt_125m.yaml"
    n = 6 if args.tiny else 30
    losses = {}
    for precision in ("bf16", "fp32"):
        cfg = config(file, args, [f"train.precision={precision}", "optimizer.lr=1e-3", "schedule.rampup_start=null"],
                     32 if args.tiny else 1024)
        engine = build_engine(cfg, parallel=False)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # after build_engine
        data = batches(cfg, n * 2, cfg.train.micro_batch_size)
        losses[precision] = [_loss(engine.train_step(data[2 * i:2 * i + 2], 1e-3)) for i in range(n)]
        del engine
    diff = max(abs(a - b) for a, b in zip(losses["bf16"], losses["fp32"]))
    return {"config": file, "steps": n, "max_abs_loss_diff": diff, "tolerance": 0.1,
            "passed": diff <= 0.1 and losses["fp32"][-1] < losses["fp32"][0], **losses}


def corpus(args) -> dict:
    """A deterministic synthetic jsonl corpus (Zipf-distributed pseudo-words) for the end-to-end run."""
    import random

    rng = random.Random(1234)
    syllables = "ka to ri mu sa ne lo pi da ve qu sh th an er in on al or es".split()
    words = sorted({"".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(3000)})
    weights = [1.0 / (i + 1) for i in range(len(words))]
    docs = 300 if args.tiny else 3000
    with open(args.out, "w") as f:
        for _ in range(docs):
            text = ". ".join(" ".join(rng.choices(words, weights, k=rng.randint(5, 20))) for _ in range(8))
            f.write(json.dumps({"text": text + "."}) + "\n")
    return {"documents": docs}


def env(args) -> dict:
    d = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        d.update(device=name, peak_bf16_tflops=peak_tflops(name), device_count=torch.cuda.device_count(),
                 capability=".".join(map(str, torch.cuda.get_device_capability(0))))
    try:
        import flash_attn
        d["flash_attn"] = flash_attn.__version__
    except ImportError as e:
        d["flash_attn"] = f"not importable ({e})"
    return d


def table(out_dir: Path) -> str:
    """One plain-text table of a gpu_check run: stages, probes, training rows, parity, end to end."""
    rows = [("section", "case", "result")]
    read = lambda name: json.loads((out_dir / name).read_text()) if (out_dir / name).is_file() else {}  # noqa: E731
    for line in (out_dir / "stages.tsv").read_text().splitlines()[1:] if (out_dir / "stages.tsv").is_file() else []:
        name, status, rc, seconds = line.split("\t")[:4]
        rows.append(("stage", name, f"{status} (rc {rc}, {seconds} s)"))
    for key, value in read("env.json").items():
        rows.append(("env", key, str(value)))
    for case, r in read("attention.json").items():
        rows.append(("attention kernel", case, r.get("error") or f"{'+'.join(r['kernels']) or '?'}, "
                                                                 f"{r['fwd_bwd_ms']} ms fwd+bwd"))
    for name in sorted(out_dir.glob("steps*.json")):
        for layout, r in read(name.name).items():
            rows.append((f"engine step ({name.stem})", layout, r.get("error") or (
                f"{r['engine']}: linear outputs {r['linear_output_dtypes']}, forwards/step "
                f"{r['forwards_per_step']} for {r['micro_batches_per_step']} micro-batches, host syncs/step "
                f"{r['host_syncs_per_step']} {r['sync_ops']}")))
    p = read("parity.json")
    if p:
        rows.append(("bf16 vs fp32", p.get("config", "?"), f"max |loss diff| {p.get('max_abs_loss_diff', '?'):.4g} "
                     f"(tolerance {p.get('tolerance')}): {'PASS' if p.get('passed') else 'FAIL'}"))
    for r in read("bench.json").get("runs", []):
        case = f"{r.get('model')} {r.get('backend')} compile={r.get('compile')} ckpt={r.get('checkpointing')}"
        rows.append(("training bf16", case, r.get("error") or r.get("status") if r.get("status") != "ok" else
                     f"{r['tokens_per_s']:,.0f} tokens/s, {r['tflops']:.3g} TFLOP/s, MFU "
                     f"{100 * (r.get('mfu_peak') or 0):.1f}%, {r.get('peak_mem_gb') or 0:.1f} GB"))
    e2e = out_dir / "e2e.txt"
    if e2e.is_file():
        rows.append(("end to end", "tokenize -> prepare -> train -> checkpoint -> resume", e2e.read_text().strip()))
    width = [max(len(r[i]) for r in rows) for i in range(2)]
    return "\n".join(f"{a:<{width[0]}}  {b:<{width[1]}}  {c}" for a, b, c in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("probe", choices=["env", "attention", "steps", "parity", "corpus", "table"])
    p.add_argument("dir", nargs="?", type=Path, help="table: the gpu_check output directory")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny models and sequences (the CPU dry run)")
    p.add_argument("--layouts", default="local,zero1", help=f"steps: comma list of {sorted(LAYOUTS)}")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.probe == "table":
        print(table(args.dir))
        return 0
    torch.manual_seed(0)
    t0 = time.perf_counter()
    probes = {"env": env, "attention": attention, "steps": steps, "parity": parity, "corpus": corpus}
    result = probes[args.probe](args)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and args.probe != "corpus":
        text = json.dumps(result, indent=1, default=str)
        if args.out:
            args.out.write_text(text)
        print(f"[probe {args.probe}] {time.perf_counter() - t0:.1f} s\n{text[:4000]}", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    failed = any(isinstance(v, dict) and "error" in v and "flash" not in k for k, v in result.items())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
