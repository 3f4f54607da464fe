"""QK-norm (``model.qk_norm``, Qwen3-MoE's ``q_norm``/``k_norm``): one RMSNorm over head_dim shared by every query
head and one by every key head, before RoPE. Its weights are counted by ``param_count``; on 2 tensor-parallel gloo
ranks (with and without sequence parallelism) the loss and the norm weights' gradients equal the single-process
model's once the engine's tensor-group hook has summed the per-rank (own heads only) contributions. Logits against
transformers' Qwen3-MoE: tests/test_hf_moe.py."""

from __future__ import annotations

import torch

from pretrain.models import build_model
from pretrain.models.flops import gpt_param_count
from tests.dist_utils import run_distributed

CFG = dict(flavour="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
           ffn_hidden_size=48, max_seq_len=32, qk_norm=True)


def _model(factory=None):
    torch.manual_seed(0)
    model = build_model("gpt", CFG, factory)
    with torch.no_grad():  # non-trivial norm weights, identical in every build
        for name, p in model.named_parameters():
            if name.endswith("q_norm.weight") or name.endswith("k_norm.weight"):
                p.copy_(torch.linspace(0.5, 1.5, p.numel()) * (2.0 if "k_norm" in name else 1.0))
    return model


def _loss_and_norm_grads(model) -> dict:
    ids = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids[:, :-1], labels=ids[:, 1:]).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "q_norm" in n or "k_norm" in n}
    return {"loss": loss.detach(), "grads": grads}


def tp_worker(args: dict) -> dict:
    import torch.distributed as dist

    from pretrain.parallel.tensor import TensorParallelLayers, register_sequence_parallel_grad_hooks

    group = dist.new_group([0, 1])
    ref = _loss_and_norm_grads(_model())
    out = {}
    for sp in (False, True):
        model = _model(TensorParallelLayers(group, sequence_parallel=sp))
        hooked = register_sequence_parallel_grad_hooks(model, group)
        got = _loss_and_norm_grads(model)
        out[f"sp={sp}"] = {"loss": (got["loss"] - ref["loss"]).abs().item(), "hooked": hooked,
                           "grad": max((got["grads"][n] - g).abs().max().item() for n, g in ref["grads"].items()),
                           "grad_scale": max(g.abs().max().item() for g in ref["grads"].values())}
    return out


def test_qk_norm_weights_are_counted():
    model = _model()
    assert gpt_param_count(model.cfg) == sum(p.numel() for p in model.parameters())
    assert sum("q_norm" in n or "k_norm" in n for n, _ in model.named_parameters()) == 2 * CFG["num_layers"]


def test_qk_norm_tensor_parallel_matches_one_process():
    for rank in run_distributed("tests.test_qk_norm:tp_worker", 2):
        for layout, r in rank.items():
            assert r["loss"] <= 1e-6, layout
            assert r["grad_scale"] > 1e-4 and r["grad"] <= 1e-6, (layout, r)
            assert r["hooked"] >= 2 * CFG["num_layers"], (layout, r)
