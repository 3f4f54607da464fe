"""Training throughput on CPU: our GPT (Llama flavour) vs Hugging Face ``LlamaForCausalLM`` of the same shape.

Each model runs eager and ``torch.compile``d in place (what ``train.compile: true`` does), all with the same
batch, the same fused AdamW (the trainer's) and the same thread count; steps alternate between the models, and a
large fp32 matmul is timed next to every round, so background load hits all alike. Achieved FLOP/s (PaLM
formula, ``pretrain.models.flops``) is reported as a fraction of that matmul rate, taken step by step.

    python benchmarks/bench_model_cpu.py [--threads 2] [--steps 10] [--no-compile]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pretrain.metrics import measure_cpu_flops
from pretrain.models import build_model
from pretrain.models.flops import flops_per_token, gpt_param_count


def hf_llama(cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_size,
                         num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                         num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.max_seq_len,
                         rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(hf_cfg)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--steps", type=int, default=10, help="timed steps per model (after 2 warm-up steps)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--no-compile", action="store_true", help="eager models only (skips ~1 min of compilation)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    def build_ours():
        torch.manual_seed(0)
        return build_model("gpt", dict(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                                       num_heads=args.heads, ffn_hidden_size=args.ffn, max_seq_len=args.seq))

    cfg = build_ours().cfg
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
    ours_batch = dict(input_ids=ids[:, :-1], labels=ids[:, 1:])
    hf_batch = dict(input_ids=ids[:, :-1], labels=ids[:, :-1])  # HF shifts the labels itself
    models = {"ours, eager": (build_ours(), ours_batch), "HF, eager": (hf_llama(cfg), hf_batch)}
    if not args.no_compile:
        models = {"ours, compiled": (build_ours(), ours_batch), **models, "HF, compiled": (hf_llama(cfg), hf_batch)}
        for name, (model, _) in models.items():
            if name.endswith("compiled"):
                model.compile()  # in place, as the trainer does for train.compile: true
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True) for name, (m, _) in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    peaks: list[float] = []
    for i in range(args.steps + 2):
        peaks.append(measure_cpu_flops(n=2048, repeats=3))
        for name, (model, batch) in models.items():
            t0 = time.perf_counter()
            loss = model(**batch).loss
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
            elif i == 0 and name.endswith("compiled"):
                print(f"{name}: first step (compilation) {time.perf_counter() - t0:.1f} s", flush=True)
        if i >= 2:
            print(f"step {i - 1}/{args.steps}: " + ", ".join(f"{n} {t[-1] * 1e3:.0f} ms" for n, t in times.items()),
                  flush=True)

    peaks = peaks[2:]
    tokens = args.batch * args.seq
    fpt = flops_per_token(cfg, args.seq)
    print(f"\nthreads={args.threads} batch={args.batch} seq={args.seq} hidden={args.hidden} layers={args.layers} "
          f"vocab={args.vocab}; {fpt / 1e6:.1f} MFLOP/token (PaLM: 6N + 12*L*s*d)")
    print(f"fp32 2048^3 matmul rate: median {statistics.median(peaks) / 1e9:.1f} GFLOP/s "
          f"(min {min(peaks) / 1e9:.1f}, max {max(peaks) / 1e9:.1f}); % matmul = median over steps of "
          f"(step FLOP/s) / (matmul rate measured just before)\n")
    print(f"{'model':<18}{'params':>10}{'step ms (median)':>18}{'tokens/s':>10}{'GFLOP/s':>9}{'% matmul':>10}")
    rates = {}
    for name, (model, _) in models.items():
        step = statistics.median(times[name])
        rates[name] = tokens / step
        n = sum(p.numel() for p in model.parameters())
        frac = statistics.median(tokens * fpt / t / peak for t, peak in zip(times[name], peaks))
        print(f"{name:<18}{n / 1e6:>9.2f}M{step * 1e3:>18.0f}{rates[name]:>10.0f}"
              f"{rates[name] * fpt / 1e9:>9.1f}{100 * frac:>9.1f}%")
    print(f"\ngpt_param_count(cfg) = {gpt_param_count(cfg):,}; tokens/s ratios:")
    pairs = [("ours, eager", "HF, eager")]
    if not args.no_compile:
        pairs = [("ours, compiled", "HF, eager"), *pairs, ("ours, compiled", "HF, compiled")]
    for a, b in pairs:
        print(f"  {a} / {b}: {rates[a] / rates[b]:.2f}x")


if __name__ == "__main__":
    main()
