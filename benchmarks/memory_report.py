"""Per-rank parameter, gradient and optimizer-state bytes of one training step, next to the ZeRO paper's model.

    torchrun --nproc_per_node 4 benchmarks/memory_report.py CONFIG [section.key=value ...]
    torchrun --nproc_per_node 4 benchmarks/memory_report.py --tiny parallel.zero=2

Measured: parameters and optimizer state after one step; gradients as handed to the optimizer's ``step`` (a
step pre-hook on the optimizer that does the update; DeepSpeed steps group by group, so they are summed over
its calls). Tensors are counted once per storage. Predicted, fp32 weights and Adam (Rajbhandari et al. 2020,
adjusted to what DeepSpeed does in fp32), with ``P`` this rank's share of the model after tensor/pipeline
splitting and ``d`` the data-parallel size:

    ZeRO-0: params 4P,   grads 4P,   optimizer 8P
    ZeRO-1: params 4P,   grads 4P/d, optimizer 12P/d  (Adam moments + a separate fp32 partition copy)
    ZeRO-2: params 4P,   grads 4P/d, optimizer 12P/d
    ZeRO-3: params 4P/d, grads 4P/d, optimizer 8P/d   (the fp32 partitions are the weights themselves)

ZeRO-1 gradients are whole during accumulation (the paper's 4P) and reduced to this rank's partition at the
boundary; what is left at the step is 4P/d. Our own engine's ZeRO-1 (pipelines, expert parallelism; torch's
ZeroRedundancyOptimizer) keeps whole gradients and no master copy: grads 4P, optimizer 8P/d (expert state is
sharded over the expert-data group, so with ``ep > 1`` the real figure is higher than this ideal).
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from pretrain.config import from_dict, load_config

TINY = {"model": {"family": "gpt", "flavour": "gpt2", "vocab_size": 512, "hidden_size": 128, "num_layers": 4,
                  "num_heads": 4, "max_seq_len": 64},
        "data": {"seq_length": 64}, "train": {"global_batch_size": 8, "micro_batch_size": 1, "device": "cpu"}}
MiB = 2**20


def _bytes(tensors, seen: set) -> int:
    total = 0
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _inner_optimizers(engine) -> list[torch.optim.Optimizer]:
    """The optimizers whose ``step`` updates this rank's (partition of the) weights."""
    if engine.ds is not None:  # DeepSpeed's ZeRO optimizer wraps the torch one
        opt = engine.ds.optimizer
        return [getattr(opt, "optimizer", opt)]
    return engine.local_optimizers()


def measure(engine, batch: list[dict]) -> dict[str, float]:
    opts = _inner_optimizers(engine)
    model_params = list(engine.model.parameters())
    grads_seen: set = set()
    grad_bytes = [0]

    def at_step(optimizer, args, kwargs):
        params = [p for g in optimizer.param_groups for p in g["params"]]
        grad_bytes[0] += _bytes([p.grad for p in params] + [p.grad for p in model_params], grads_seen)

    handles = [opt.register_step_pre_hook(at_step) for opt in opts]
    engine.train_step(batch, lr=1e-4)
    for handle in handles:
        handle.remove()
    local = [getattr(p, "ds_tensor", p) for p in model_params]  # ZeRO-3 keeps only its partition
    master = [p for opt in opts for g in opt.param_groups for p in g["params"]]
    model_ids = {id(p) for p in model_params}
    states = [v for opt in opts for s in opt.state.values() for v in s.values()
              if torch.is_tensor(v) and v.dim() > 0]
    return {"params": _bytes(local, set()) / MiB, "grads": grad_bytes[0] / MiB,
            "optimizer": _bytes(states + [p for p in master if id(p) not in model_ids], set()) / MiB,
            "P": sum(getattr(p, "ds_numel", p.numel()) for p in model_params)}


def predict(p_numel: int, zero: int, dp: int, deepspeed: bool) -> dict[str, float]:
    b = 4 * p_numel / MiB
    if not deepspeed or zero == 0:
        return {"params": b, "grads": b, "optimizer": 2 * b / (dp if zero else 1)}
    return {"params": b / dp if zero == 3 else b, "grads": b / dp,
            "optimizer": (2 if zero == 3 else 3) * b / dp}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", help="training YAML (or --tiny)")
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    ap.add_argument("--tiny", action="store_true", help="a built-in 1M-parameter GPT")
    args = ap.parse_args()
    if args.tiny or args.config is None:
        from pretrain.config import merge, parse_overrides

        extra = ([args.config] if args.config else []) + args.overrides
        cfg = from_dict(merge(TINY, parse_overrides(extra)))
    else:
        cfg = load_config(args.config, args.overrides)
    from pretrain.devices import join_process_group, pick_device
    from pretrain.engines import build_engine

    join_process_group(pick_device(cfg))
    torch.manual_seed(0)
    engine = build_engine(cfg)
    t, p = cfg.train, cfg.parallel
    n_micro = t.global_batch_size // (t.micro_batch_size * engine.dp_size)
    vocab, seq = cfg.model.vocab_size, cfg.data.seq_length
    batch = [{"input_ids": torch.randint(0, vocab, (t.micro_batch_size, seq)),
              "labels": torch.randint(0, vocab, (t.micro_batch_size, seq)),
              "loss_mask": torch.ones(t.micro_batch_size, seq)} for _ in range(n_micro)]
    got = measure(engine, batch)
    # ZeRO partitions over the whole data group: the replicas and, under context parallelism, their cp ranks
    want = predict(got.pop("P"), p.zero, engine.dp_size * p.cp, deepspeed=hasattr(engine, "ds"))
    rows = [None] * dist.get_world_size() if dist.is_initialized() else None
    row = (dist.get_rank() if rows else 0, got, want)
    if rows:
        dist.all_gather_object(rows, row)
    else:
        rows = [row]
    if row[0] == 0:
        print(f"layout tp={p.tp} pp={p.pp} dp={engine.dp_size} cp={p.cp} zero={p.zero} sp={p.sp}   "
              f"(MiB, measured / predicted)")
        print(f"{'rank':>4} | {'params':>15} | {'grads':>15} | {'optimizer':>15}")
        for rank, g, w in rows:
            cells = " | ".join(f"{g[k]:7.3f} /{w[k]:7.3f}" for k in ("params", "grads", "optimizer"))
            print(f"{rank:>4} | {cells}")


if __name__ == "__main__":
    main()
