"""MoE on CPU: expert execution strategies side by side, and load balance with an aux loss vs the loss-free bias.

1. One top-2 MoE layer, forward + backward, tokens/s, for 8 and 64 experts:
   * dropless, rows sorted by expert, with each kernel of :func:`pretrain.models.dropless.grouped_mm`: one ``bmm``
     over groups padded to the largest (the CPU pick), ``torch._grouped_mm``, a per-group ``matmul`` loop;
   * capacity-padded dispatch (Switch's ``[E, capacity, d]`` buffer and ``bmm``, capacity factor 1.25);
   * reference: the per-expert loop of Hugging Face's Mixtral/Qwen-MoE blocks (``nonzero`` per expert, gather,
     MLP, ``index_add``), written out here.
   Variants alternate round by round, so background load hits all alike; the median is reported.
2. Load imbalance (max / mean selections per expert, mean over layers) after ``--steps`` training steps of a tiny
   MoE GPT on the demo corpus (bytes as tokens), with no balancing, the load-balancing aux loss, and the
   aux-loss-free bias (DeepSeek-V3), all else equal.

    python benchmarks/bench_moe.py [--threads 2] [--tokens 2048] [--rounds 5] [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from types import SimpleNamespace

import torch

from pretrain.data.demo_corpus import ensure_demo_corpus
from pretrain.models import build_model
from pretrain.models import dropless
from pretrain.models.mlp import activate
from pretrain.models.moe import MoEConfig, SwitchMLP
from pretrain.moe_balance import ExpertBalance


def hf_loop(layer: SwitchMLP, x: torch.Tensor) -> torch.Tensor:
    """Hugging Face Mixtral-style MoE: route, then one masked gather / MLP / ``index_add_`` per expert."""
    flat = x.reshape(-1, x.shape[-1])
    _, scores = layer.route(flat)
    weight, expert = torch.topk(scores, layer.cfg.top_k, dim=-1)
    out = torch.zeros_like(flat)
    w_in, w_out = layer.w_in.unbind(0), layer.w_out.unbind(0)  # as separate per-expert weights
    for e in range(layer.cfg.num_experts):
        token, slot = torch.nonzero(expert == e, as_tuple=True)
        h = activate(flat[token] @ w_in[e], layer.activation) @ w_out[e]
        out.index_add_(0, token, h * weight[token, slot, None])
    return out.view_as(x)


def layer_throughput(experts: int, tokens: int, dim: int, hidden: int, rounds: int) -> dict[str, float]:
    x = torch.randn(tokens // 256, 256, dim)
    cfg = dict(num_experts=experts, top_k=2, jitter=0.0, capacity_factor_train=1.25)
    torch.manual_seed(0)
    grouped = SwitchMLP(MoEConfig(**cfg, dropless=True), dim, hidden, "swiglu", False, 0.02, 0.02).train()
    padded = SwitchMLP(MoEConfig(**cfg), dim, hidden, "swiglu", False, 0.02, 0.02).train()
    padded.load_state_dict(grouped.state_dict())
    default = dropless.kernel

    def forced(how: str):  # the same dropless layer with another grouped-GEMM kernel
        def run():
            dropless.kernel = lambda a, b: how
            try:
                return grouped(x)[0]
            finally:
                dropless.kernel = default
        return run

    variants = {"dropless, padded bmm (CPU pick)": forced("padded"),
                "dropless, torch._grouped_mm": forced("grouped_mm"), "dropless, per-group loop": forced("loop"),
                "capacity-padded bmm (Switch)": lambda: padded(x)[0],
                "HF per-expert loop (reference)": lambda: hf_loop(grouped, x)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds + 1):
        for name, run in variants.items():
            grouped.zero_grad(set_to_none=True)
            padded.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            run().square().mean().backward()
            if r:  # round 0 warms up
                times[name].append(time.perf_counter() - t0)
    return {name: tokens / statistics.median(t) for name, t in times.items()}


def demo_bytes() -> torch.Tensor:
    with open(ensure_demo_corpus()) as f:
        text = "\n".join(json.loads(line)["text"] for _, line in zip(range(2000), f))
    return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8).long()


def imbalance_after(steps: int, data: torch.Tensor, balancing: dict, seq: int = 128, batch: int = 8) -> float:
    torch.manual_seed(0)
    moe = dict(num_experts=8, every=1, top_k=2, dropless=True, score="sigmoid", normalize_top_k=True, jitter=0.0,
               z_loss_weight=0.0, **balancing)
    model = build_model("gpt", dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, ffn_hidden_size=128,
                                    max_seq_len=seq, moe=moe)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    balance = ExpertBalance(SimpleNamespace(cfg=SimpleNamespace(model=model.cfg), mesh=None, model=model,
                                            device=torch.device("cpu")))
    gen = torch.Generator().manual_seed(0)
    last = []
    for _ in range(steps):
        start = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen)
        window = torch.stack([data[s:s + seq + 1] for s in start.tolist()])
        model(input_ids=window[:, :-1], labels=window[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        balance.after_step(skipped=False)
        last.append(balance.metrics()["moe/load_imbalance"])
    return statistics.mean(last[-10:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--tokens", type=int, default=2048, help="tokens per layer call (multiple of 256)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256, help="expert hidden width")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=200, help="training steps for the load-imbalance comparison")
    p.add_argument("--parts", default="layer,balance", help="which comparisons to run (comma-separated)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.2f}; "
          f"top-2 layer, d={args.dim}, expert hidden {args.hidden} (SwiGLU), {args.tokens} tokens, fwd+bwd")
    if "layer" in args.parts:
        layer_table(args)
    if "balance" in args.parts:
        balance_table(args.steps)
    print(f"load average {os.getloadavg()[0]:.2f}")


def layer_table(args: argparse.Namespace) -> None:
    results = {e: layer_throughput(e, args.tokens, args.dim, args.hidden, args.rounds) for e in (8, 64)}
    names = list(results[8])
    print(f"\n{'tokens/s':<32}" + "".join(f"{f'{e} experts':>14}" for e in results))
    for name in names:
        print(f"{name:<32}" + "".join(f"{results[e][name]:>14,.0f}" for e in results))
    ref = names[-1]
    print(f"{'dropless (CPU pick) vs reference':<32}" +
          "".join(f"{results[e][names[0]] / results[e][ref]:>13.2f}x" for e in results))


def balance_table(steps: int) -> None:
    data = demo_bytes()
    print(f"\nload imbalance (max/mean selections per expert, mean over 2 layers and the last 10 of {steps} "
          f"steps), 8 experts top-2, sigmoid router, demo corpus bytes:")
    for name, balancing in (("no balancing", dict(aux_loss_weight=0.0)),
                            ("aux loss (weight 0.01, batch)", dict(aux_loss_weight=0.01)),
                            ("loss-free bias (rate 0.01)", dict(aux_loss_weight=0.0, bias_update_rate=0.01))):
        t0 = time.perf_counter()
        value = imbalance_after(steps, data, balancing)
        print(f"  {name:<32} {value:6.3f}   ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
