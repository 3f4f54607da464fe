"""The layout planner (pretrain.plan): counts against published models, model states against DeepSpeed's own
estimators, the memory terms' behaviour, and `pretrain plan` (table, JSON, refusals, bad input)."""

from __future__ import annotations

import json

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from pretrain.cli import main
from pretrain.config import from_dict, load_config
from pretrain.models.flops import flops_per_token
from pretrain.models.registry import build_model
from pretrain.plan.hardware import DEVICES, device
from pretrain.plan.memory import in_flight, memory
from pretrain.plan.search import with_layout
from pretrain.plan.shapes import model_shape


def gpt(**model):
    seq = model.get("max_seq_len", 2048)
    return from_dict({"model": {"family": "gpt", **model}, "data": {"seq_length": seq}})


def t5(**model):
    return from_dict({"model": {"family": "t5", **model}})


LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, ffn_hidden_size=11008,
                 max_seq_len=4096)
MIXTRAL = dict(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
               ffn_hidden_size=14336, max_seq_len=4096, moe={"num_experts": 8, "every": 1})


@pytest.mark.parametrize("cfg, published", [
    # Hugging Face model cards' exact counts (meta-llama/Llama-2-7b-hf, Llama-2-70b-hf, mistralai/Mixtral-8x7B-v0.1,
    # t5-11b with the original T5's ReLU FFN and tied head)
    (gpt(**LLAMA2_7B), 6_738_415_616),
    (gpt(vocab_size=32000, hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8, ffn_hidden_size=28672,
         max_seq_len=4096), 68_976_648_192),
    (gpt(**MIXTRAL), 46_702_792_704),
    (t5(vocab_size=32128, d_model=1024, d_kv=128, d_ff=65536, num_layers=24, num_heads=128, activation="relu",
        tie_embeddings=True), 11_307_321_344),
])
def test_parameter_counts_equal_published_models(cfg, published):
    assert model_shape(cfg).params == published


def test_rounded_published_counts_and_gpt3_flops():
    gpt3 = gpt(flavour="gpt2", vocab_size=50257, hidden_size=12288, num_layers=96, num_heads=96, max_seq_len=2048,
               tie_embeddings=True)
    n = model_shape(gpt3).params
    assert abs(n / 175.0e9 - 1) < 0.003  # Brown et al. 2020, table 2.1: "175.0B"
    switch = t5(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12, activation="relu",
                moe={"num_experts": 128, "every": 2})
    assert round(model_shape(switch).params / 1e9, 1) == 7.4  # Fedus et al. 2021, table 9: Switch-Base 128, 7.4B
    # Narayanan et al. 2021, eq. 3 without recomputation (72 instead of 96): FLOPs per token of GPT-3
    layers, h, vocab, s = 96, 12288, 50257, 2048
    megatron = 72 * layers * h * h * (1 + s / (6 * h) + vocab / (12 * layers * h))
    assert abs(flops_per_token(gpt3.model, s) / megatron - 1) < 2e-4
    assert abs(6 * n * 300e9 / 3.14e23 - 1) < 0.01  # GPT-3's 3.14e23 training FLOPs over 300B tokens


def test_mixtral_active_parameters_from_its_shape():
    """Mixtral routes each token to 2 of 8 experts: 12.9B active. Our Switch layers are top-1, so the count
    with k = 2 is taken from the config's shape: the total minus the 6 experts a token does not use."""
    shape = model_shape(gpt(**MIXTRAL))
    per_expert = 3 * 4096 * 14336
    active = shape.params - 32 * (8 - 2) * per_expert
    assert active == 12_879_925_248
    assert sum(b.expert for b in shape.blocks) == 32 * 8 * per_expert


TINY = {"gpt": {"model": {"family": "gpt", "vocab_size": 256, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
                          "max_seq_len": 32}, "data": {"seq_length": 32}},
        "t5": {"model": {"family": "t5", "vocab_size": 256, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2,
                         "num_heads": 4}, "data": {"seq_length": 32, "decoder_seq_length": 8}},
        "switch": {"model": {"family": "gpt", "vocab_size": 256, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
                             "max_seq_len": 32, "moe": {"num_experts": 4, "every": 2}}, "data": {"seq_length": 32}}}


def _tiny(name: str, **parallel):
    raw = {**TINY[name], "train": {"precision": "bf16", "global_batch_size": 16, "micro_batch_size": 1},
           "parallel": parallel}
    return from_dict(raw)


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("nodes, per_node", [(1, 8), (2, 8)])
def test_model_states_equal_deepspeed_estimators(name, nodes, per_node):
    cfg = _tiny(name)
    model = build_model(cfg.family, cfg.model)
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    world = nodes * per_node
    cases = {(2, False, False): estimate_zero2_model_states_mem_needs(total, per_node, nodes, False)[1],
             (2, True, False): estimate_zero2_model_states_mem_needs(total, per_node, nodes, True)[1],
             (3, False, False): estimate_zero3_model_states_mem_needs(total, largest, per_node, nodes, False)[1],
             (3, True, False): estimate_zero3_model_states_mem_needs(total, largest, per_node, nodes, True, False)[1],
             (3, True, True): estimate_zero3_model_states_mem_needs(total, largest, per_node, nodes, True, True)[1]}
    for (zero, opt, params), want in cases.items():
        layout = with_layout(cfg, {"zero": zero, "offload_optimizer": opt, "offload_params": params})
        assert int(memory(layout, world).model_states) == want, (zero, opt, params)


def test_memory_terms_follow_the_layout():
    cfg = load_config("configs/gpt_7b.yaml", ["parallel.tp=1", "parallel.pp=1", "parallel.sp=false"])
    z1, z3 = (memory(with_layout(cfg, {"zero": z}), 64) for z in (1, 3))
    assert z3.weights == pytest.approx(z1.weights / 64)  # bf16 weights partitioned over dp = 64
    none, full = (memory(with_layout(cfg, {"zero": 3, "checkpointing": c}), 64) for c in ("none", "full"))
    assert full.activations < none.activations / 5
    assert in_flight(8, 1, 0, 64) == 8 and in_flight(8, 1, 7, 64) == 1 and in_flight(8, 1, 0, 4) == 4
    assert in_flight(4, 2, 0, 64) == pytest.approx(4 * (1 + 3 / 8))  # Korthikanti et al.'s interleaved factor
    pp = memory(with_layout(cfg, {"pp": 4, "zero": 1, "checkpointing": "none"}), 64)
    assert pp.stage == 0  # the first stage keeps the most micro-batches in flight


def _plan(capsys, *args):
    rc = main(["plan", *args])
    return rc, capsys.readouterr()


def test_plan_json_ranks_layouts_and_lists_refusals(capsys):
    rc, out = _plan(capsys, "configs/gpt_tiny.yaml", "train.global_batch_size=16", "--gpus", "8", "--gpu", "a100-80gb",
                    "--json")
    assert rc == 0
    doc = json.loads(out.out)
    assert doc["gpu"]["memory_gb"] == 80 and doc["gpus"] == 8
    rates = [row["time_s"]["tokens_per_gpu"] for row in doc["layouts"] if row["fits"]]
    assert rates == sorted(rates, reverse=True) and len(rates) > 10
    row = doc["layouts"][0]
    assert row["memory_bytes"]["total"] == pytest.approx(sum(row["memory_bytes"][k] for k in (
        "weights", "grads", "optimizer", "masters", "activations", "workspace", "buffers", "overhead")))
    reasons = [r["reason"] for r in doc["refused"]]
    assert any("clashes with pipeline micro-batching" in r for r in reasons)
    assert all(r["layout"]["tp"] <= 8 for r in doc["refused"])


def test_plan_table_and_refused_configured_layout(capsys):
    rc, out = _plan(capsys, "configs/gpt_tiny.yaml", "parallel.tp=3", "--gpus", "4", "--gpus-per-node", "4",
                    "--gpu", "custom:memory=16,bf16=100,nvlink=100,network=10")
    assert rc == 0
    assert "configured layout (tp3 pp1 z0" in out.out and "parallel.tp=3 does not divide" in out.out
    assert "custom: 16 GB" in out.out and " 1  tp" in out.out


@pytest.mark.parametrize("gpu, message", [("nope", "unknown device"), ("custom:memory=8", "need bf16"),
                                          ("custom:memory=x,bf16=1,nvlink=1,network=1", "not a number")])
def test_plan_bad_device_is_one_line_exit_2(capsys, gpu, message):
    rc, out = _plan(capsys, "configs/gpt_tiny.yaml", "--gpus", "2", "--gpu", gpu)
    assert rc == 2 and message in out.err and len(out.err.strip().splitlines()) == 1


def test_device_table_has_the_named_devices():
    assert {"h100-sxm", "h100-pcie", "h200", "b200", "a100-40gb", "a100-80gb", "mi300x"} <= set(DEVICES)
    assert device("H200").memory_gb == 141 and device("a100-40gb").fp8_tflops is None


def test_launch_refuses_with_strict_and_warns_without(capsys):
    from pretrain.plan.guard import check_fits

    rc = main(["launch", "slurm", "--nodes", "2", "--gpus-per-node", "8", "--gpu", "a100-40gb", "--strict",
               "--dry-run", "--", "train", "configs/gpt_7b.yaml", "parallel.tp=1", "parallel.pp=1", "parallel.sp=false",
               "parallel.zero=0"])
    err = capsys.readouterr().err
    assert rc == 2 and "planner: predicted peak" in err and "would run out of memory" in err
    cfg = load_config("configs/gpt_7b.yaml", ["parallel.tp=1", "parallel.pp=1", "parallel.sp=false", "parallel.zero=0"])
    assert check_fits(cfg, 16, 8, "a100-40gb", strict=False).startswith("warning: planner: predicted peak")
    fits = load_config("configs/gpt_7b.yaml", ["parallel.tp=1", "parallel.pp=1", "parallel.sp=false",
                                                "parallel.zero=3"])
    assert check_fits(fits, 64, 8, "h200", strict=True).startswith("planner: predicted peak")
    assert check_fits(load_config("configs/gpt_tiny.yaml"), 1, 1, None, strict=True) is None  # CPU: skipped


@pytest.mark.parametrize("name", ["gpt_tiny", "gpt2_tiny", "gpt_125m", "gpt_7b", "switch_gpt_tiny", "t5_tiny",
                                  "t5_base", "switch_base_8"])
def test_shipped_configs_count_like_the_family(name):
    from pretrain.models.registry import family_spec

    cfg = load_config(f"configs/{name}.yaml")
    assert model_shape(cfg).params == family_spec(cfg.family).param_count(cfg.model, False)
