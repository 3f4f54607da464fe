"""Top-k MoE layer (router options, dropless grouped GEMM, shared experts), aux-loss-free balancing, expert
telemetry, the expert-load heatmap and the MoE config errors. Switch itself is covered by test_models.py."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pretrain.config import ConfigError, from_dict
from pretrain.models import build_model
from pretrain.models import dropless
from pretrain.models.dropless import grouped_mm
from pretrain.models.flops import gpt_param_count, t5_param_count
from pretrain.models.moe import MoEConfig, SwitchMLP
from pretrain.models.router import balance_loss
from pretrain.moe_balance import ExpertBalance
from pretrain.plot import expert_load_matrix
from tests.host_syncs import HostSyncCounter

TOPK = dict(num_experts=4, top_k=2, jitter=0.0, score="sigmoid", normalize_top_k=True, routed_scale=2.5,
            shared_ffn_size=12, shared_gate=True, bias_update_rate=0.1)
GPT_MOE = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=64, max_seq_len=16,
               moe=dict(TOPK, every=1, dropless=True, expert_ffn_size=16))


def _layer(activation="swiglu", bias=False, **overrides) -> SwitchMLP:
    torch.manual_seed(0)
    layer = SwitchMLP(MoEConfig(**{**TOPK, **overrides}), dim=8, hidden=16, activation=activation, bias=bias,
                      in_std=0.2, out_std=0.2, router_std=0.5)
    if layer.expert_bias is not None:
        layer.expert_bias.copy_(torch.tensor([0.0, 0.3, 0.0, -0.3]))
    return layer


def _by_hand(layer: SwitchMLP, x: torch.Tensor) -> torch.Tensor:
    """Each token through its experts one by one: the semantics of docs/design.md, written out."""
    cfg, out = layer.cfg, []
    for t in x.reshape(-1, x.shape[-1]):
        scores = (layer.router @ t).sigmoid()
        chosen = (scores + layer.expert_bias).topk(cfg.top_k).indices
        w = scores[chosen] / scores[chosen].sum() * cfg.routed_scale
        y = sum(w[j] * layer.experts(t.view(1, 1, -1).expand(layer.cfg.num_experts, 1, -1))[e, 0]
                for j, e in enumerate(chosen.tolist()))
        gate = torch.sigmoid(layer.shared_gate[0] @ t)
        out.append(y + layer.shared(t) * gate)
    return torch.stack(out).view_as(x)


@pytest.mark.parametrize("dropless", [False, True])
def test_topk_sigmoid_bias_shared_expert_match_the_hand_computation(dropless):
    layer = _layer(dropless=dropless, capacity_factor_eval=4.0).eval()  # capacity 4 x: nothing dropped
    x = torch.randn(2, 5, 8)
    y, aux = layer(x)
    torch.testing.assert_close(y, _by_hand(layer, x), rtol=1e-5, atol=1e-6)
    assert aux["drop_frac"].item() == 0.0


def test_capacity_counts_every_choice_and_drops_later_choices_first():
    layer = _layer(score="softmax", normalize_top_k=False, routed_scale=1.0, shared_ffn_size=0,
                   shared_gate=False, bias_update_rate=0.0, capacity_factor_train=0.5).train()
    x = torch.randn(1, 16, 8)
    _, aux = layer(x)  # 32 assignments, capacity ceil(32 * 0.5 / 4) = 4 each: at most 16 kept
    assert aux["drop_frac"].item() >= 0.5
    assert layer.load.sum().item() == 32 and layer.totals[-1].item() == 1  # selections counted before dropping


@pytest.mark.parametrize("activation,bias", [("swiglu", False), ("gelu", True)])
def test_dropless_equals_capacity_that_drops_nothing_forward_and_backward(activation, bias):
    x = torch.randn(3, 7, 8)
    grads = []
    for dropless in (False, True):
        layer = _layer(activation, bias, dropless=dropless, capacity_factor_train=4.0).train()
        xi = x.clone().requires_grad_()
        y, aux = layer(xi)
        (y.square().sum() + aux["load_balance_loss"]).backward()
        grads.append([y.detach(), xi.grad] + [p.grad for p in layer.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("how", ["padded", "grouped_mm", "loop"])
def test_grouped_mm_and_its_gradients_equal_per_group_matmuls(how, monkeypatch):
    assert dropless.kernel(torch.zeros(1), torch.zeros(1)) == "padded"  # the CPU pick
    monkeypatch.setattr(dropless, "kernel", lambda a, b: how)
    torch.manual_seed(0)
    x = torch.randn(10, 16, requires_grad=True)
    w = torch.randn(3, 16, 8, requires_grad=True)
    offs = torch.tensor([3, 3, 10], dtype=torch.int32)  # group 1 is empty
    y = grouped_mm(x, w, offs)
    ref = torch.cat([x[:3] @ w[0], x[3:] @ w[2]])
    g = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), g)
    rdx, rdw = torch.autograd.grad(ref, (x, w), g)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(dx, rdx)
    torch.testing.assert_close(dw, rdw)
    assert dw[1].abs().sum() == 0


def test_dropless_layer_has_no_host_sync_and_compiles_fullgraph():
    layer = _layer(dropless=True).train()
    x = torch.randn(2, 8, 8, requires_grad=True)
    with HostSyncCounter() as syncs:
        y, aux = layer(x)
        y.sum().backward()
    assert syncs.ops == []
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")  # custom op: traced without a break
    yc, _ = compiled(x.detach())
    torch.testing.assert_close(yc, y.detach())
    assert layer.load.sum().item() == 2 * 2 * 16  # two forwards (eager + compiled), 16 tokens x top-2


def test_balance_loss_batch_and_sequence_definitions():
    scores = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.5, 0.4, 0.1]])
    expert = torch.tensor([[0, 1], [1, 0], [0, 1], [0, 1]])
    # batch: f = counts / T = [1, 1, 0], P = column means; (E / k) * sum f P
    p = scores.mean(0)
    batch = balance_loss(scores, expert, "softmax", "batch", torch.Size([2, 2]))
    assert batch.item() == pytest.approx(3 / 2 * (p[0] + p[1]).item(), rel=1e-6)
    # sequence: the same per sequence of 2 tokens, averaged (both sequences pick experts 0 and 1 twice)
    seq = balance_loss(scores, expert, "softmax", "sequence", torch.Size([2, 2]))
    per_seq = [3 / 2 * (scores[i:i + 2, 0].mean() + scores[i:i + 2, 1].mean()).item() for i in (0, 2)]
    assert seq.item() == pytest.approx(sum(per_seq) / 2, rel=1e-6)
    # sigmoid scores are normalised per token first (DeepSeek-V3); perfect balance gives 1
    flat = torch.full((4, 4), 0.3)
    even = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    assert balance_loss(flat, even, "sigmoid", "batch", torch.Size([1, 4])).item() == pytest.approx(1.0)


def _engine(model):
    return SimpleNamespace(cfg=SimpleNamespace(model=model.cfg), mesh=None, model=model,
                           device=torch.device("cpu"))


def test_bias_update_follows_the_step_load_and_telemetry_reports_it():
    torch.manual_seed(0)
    model = build_model("gpt", dict(GPT_MOE, activation_checkpointing="full")).train()
    balance = ExpertBalance(_engine(model))
    assert balance.names == ["blocks.0.mlp", "blocks.1.mlp"]
    ids = torch.randint(0, 64, (2, 16))
    for _ in range(2):  # two micro-batches, recomputed in backward: each forward counted once
        model(input_ids=ids, labels=ids).loss.backward()
    loads = [model.blocks[i].mlp.load.clone() for i in (0, 1)]
    assert [load.sum().item() for load in loads] == [2 * 32 * 2] * 2
    before = [model.blocks[i].mlp.expert_bias.clone() for i in (0, 1)]
    balance.after_step(skipped=False)
    for i in (0, 1):
        step = 0.1 * torch.sign(loads[i].mean() - loads[i])
        torch.testing.assert_close(model.blocks[i].mlp.expert_bias, before[i] + step)
        assert model.blocks[i].mlp.load.sum() == 0  # reset for the next step
    row = balance.metrics()
    assert row["moe/blocks.1.mlp/load"] == loads[1].tolist()
    assert row["moe/blocks.1.mlp/bias"] == pytest.approx(model.blocks[1].mlp.expert_bias.tolist())
    assert row["moe/blocks.0.mlp/drop_frac"] == 0.0 and row["moe/blocks.0.mlp/load_balance_loss"] > 0
    imbalance = [max(load.tolist()) / load.mean().item() for load in loads]
    assert row["moe/load_imbalance"] == pytest.approx(sum(imbalance) / 2)
    balance.after_step(skipped=True)  # no forward, skipped: the biases stay
    after = before[1] + 0.1 * torch.sign(loads[1].mean() - loads[1])
    torch.testing.assert_close(model.blocks[1].mlp.expert_bias, after)


@pytest.mark.slow
def test_training_logs_expert_telemetry_updates_the_bias_and_plots_it(tmp_path, tiny_shard_prefix, tiny_tokenizer):
    from pretrain import plot
    from tests.test_trainer import make_cfg, metrics, run

    torch.manual_seed(0)
    cfg = make_cfg("switch_gpt_tiny.yaml", tmp_path, tiny_shard_prefix, tiny_tokenizer, "train.steps=3",
                   "train.global_batch_size=4", "train.micro_batch_size=2", "checkpoint.interval=0",
                   "logging.tensorboard=true", "model.moe.top_k=2", "model.moe.dropless=true",
                   "model.moe.bias_update_rate=0.01", "model.moe.shared_ffn_size=16")
    trainer, code = run(cfg)
    assert code == 0
    rows = [r for r in metrics(cfg) if "loss" in r]
    layer = "moe/blocks.1.mlp"  # every=2: blocks 1 and 3
    assert [sum(r[f"{layer}/load"]) for r in rows] == [4 * 32 * 2] * 3  # tokens x top-2 per step
    assert all(r[f"{layer}/drop_frac"] == 0 and r["moe/load_imbalance"] >= 1 for r in rows)
    bias = trainer.engine.model.blocks[1].mlp.expert_bias
    assert rows[-1][f"{layer}/bias"] == pytest.approx(bias.tolist()) and bias.abs().sum() > 0
    assert list((Path(cfg.log_dir) / "tensorboard").glob("events.*"))
    assert plot.run(SimpleNamespace(run_dir=cfg.log_dir, out=None)) == 0
    assert (Path(cfg.log_dir) / "expert_load.png").stat().st_size > 1000


def test_expert_load_heatmap_rows_are_load_over_mean():
    rows = [{"step": s, "loss": 1.0, "moe/blocks.1.mlp/load": [s, 10 - s, 5, 5]} for s in (1, 2, 3)]
    steps, layers = expert_load_matrix(rows + [{"step": 3, "val_loss": 2.0}])
    assert steps == [1, 2, 3] and layers["blocks.1.mlp"][2] == pytest.approx([3 / 5, 7 / 5, 1.0, 1.0])


def test_param_count_follows_topk_fine_grained_and_shared_experts():
    model = build_model("gpt", GPT_MOE)
    assert gpt_param_count(model.cfg) == sum(p.numel() for p in model.parameters())
    cfg = model.cfg.moe
    expert = 3 * 32 * 16  # swiglu: gate, up, down
    assert gpt_param_count(model.cfg) - gpt_param_count(model.cfg, active=True) == \
        2 * (cfg.num_experts - cfg.top_k) * expert


def test_t5_with_topk_dropless_and_shared_experts_trains():
    torch.manual_seed(0)
    moe = dict(TOPK, every=1, first_dense=1, dropless=True, expert_ffn_size=8, aux_loss_scope="sequence")
    model = build_model("t5", dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, moe=moe))
    assert t5_param_count(model.cfg) == sum(p.numel() for p in model.parameters())
    assert [type(b.mlp).__name__ for b in model.encoder.blocks] == ["MLP", "SwitchMLP"]  # first_dense=1
    ids = torch.randint(1, 64, (2, 12))
    out = model(input_ids=ids, decoder_input_ids=ids[:, :6], labels=ids[:, 1:7])
    out.loss.backward()
    layer = model.decoder.blocks[1].mlp
    assert layer.shared.w_in.weight.grad.abs().sum() > 0 and layer.w_out.grad.abs().sum() > 0
    assert out.metrics["moe_drop_frac"].item() == 0.0 and out.metrics["aux_loss"].item() > 0


@pytest.mark.parametrize("moe,message", [
    (dict(num_experts=4, top_k=5), "model.moe.top_k=5: must be between 1 and num_experts=4"),
    (dict(num_experts=4, capacity_factor_train=0.01), "model.moe.capacity_factor_train=0.01: below 0.1"),
    (dict(num_experts=4, score="relu"), "model.moe.score='relu'"),
    (dict(num_experts=4, aux_loss_scope="token"), "model.moe.aux_loss_scope='token'"),
    (dict(num_experts=4, shared_gate=True), "set model.moe.shared_ffn_size > 0"),
    (dict(num_experts=4, bias_update_rate=-1.0), "model.moe.bias_update_rate=-1.0: must be >= 0"),
])
def test_bad_moe_config_is_a_clear_error(moe, message):
    raw = {"model": {"family": "gpt", "vocab_size": 64, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
                     "moe": moe}}
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_dict(raw)

