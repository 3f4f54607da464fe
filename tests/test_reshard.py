"""Checkpoints saved under one layout load under another (model, Adam moments, step, data position).

One 2-rank gloo launch trains each source layout 5 steps and saves (as the trainer does: engine state +
``reshard.sharding_meta`` + ``reshard.optimizer_moments``), then loads checkpoints under *different* layouts
and trains 5 more steps. The test process trains the single-process reference 10 steps and resumes the
2-rank checkpoints in one process. Every resumed run's losses must equal the never-stopped reference's
(relative 1e-5), and consolidated weights the reference's weights at the save step.
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

from pretrain import checkpoint as ckpt
from pretrain import reshard
from pretrain.checkpoint import CheckpointError
from pretrain.config import from_dict
from tests.dist_utils import run_distributed

pytestmark = pytest.mark.dist  # the checkpoints come from real gloo runs

STEPS, HALF, SEQ, GLOBAL_BATCH, MICRO_BATCH, LR = 10, 5, 16, 8, 2, 1e-2
MODELS = {
    "gpt2": {"family": "gpt", "flavour": "gpt2", "vocab_size": 128, "hidden_size": 32, "num_layers": 2,
             "num_heads": 4, "num_kv_heads": 2, "max_seq_len": SEQ, "tie_embeddings": True},
    "gpt2_deep": {"family": "gpt", "flavour": "gpt2", "vocab_size": 128, "hidden_size": 32, "num_layers": 4,
                  "num_heads": 4, "num_kv_heads": 2, "max_seq_len": SEQ},
    "llama": {"family": "gpt", "flavour": "llama", "vocab_size": 128, "hidden_size": 32, "num_layers": 2,
              "num_heads": 4, "ffn_hidden_size": 64, "max_seq_len": SEQ},  # [gate; up] fused: TP stride 2
    "switch": {"family": "gpt", "flavour": "gpt2", "vocab_size": 128, "hidden_size": 32, "num_layers": 2,
               "num_heads": 4, "max_seq_len": SEQ,
               "moe": {"num_experts": 4, "capacity_factor_train": 1.0, "jitter": 0.0}},
}
# saved by the 2-rank launch: name -> (model, parallel)
SOURCES = {"tp2 zero1": ("gpt2", {"tp": 2, "zero": 1}),
           "dp2 zero2": ("gpt2", {"zero": 2}),
           "dp2 zero3": ("gpt2", {"zero": 3}),
           "pp2": ("gpt2_deep", {"pp": 2}),
           "ep2": ("switch", {"ep": 2}),
           "ep2 zero1": ("switch", {"ep": 2, "zero": 1}),  # ZeroRedundancyOptimizer: moments split by tensor
           "tp2 sp llama": ("llama", {"tp": 2, "sp": True})}
# loaded by the 2-rank launch: name -> (checkpoint, parallel); "local switch" is the test process's own save
TARGETS = {"dp2 zero2 -> tp2": ("dp2 zero2", {"tp": 2}),
           "tp2 zero1 -> dp2 zero3": ("tp2 zero1", {"zero": 3}),
           "pp2 -> pp1 tp2": ("pp2", {"tp": 2}),
           "ep1 -> ep2": ("local switch", {"ep": 2})}
# the 4-rank launch
SOURCES_4 = {"tp2 pp2": ("gpt2_deep", {"tp": 2, "pp": 2})}
TARGETS_4 = {"tp2 pp2 -> dp4 zero3": ("tp2 pp2", {"zero": 3})}
LOSS_RTOL, PARAM_ATOL = 1e-5, 5e-6


def make_config(model: str, parallel: dict):
    return from_dict({"model": MODELS[model], "data": {"seq_length": SEQ},
                      "optimizer": {"lr": LR, "clip_grad": 0.3, "weight_decay": 0.1, "eps": 1e-5},
                      "train": {"steps": STEPS, "global_batch_size": GLOBAL_BATCH, "micro_batch_size": MICRO_BATCH,
                                "seed": 7, "device": "cpu"},
                      "parallel": parallel})


def micro_batches(step: int, dp_rank: int, dp_size: int) -> list[dict]:
    """Step ``step``'s global batch (a function of the data position only), this rank's share."""
    rng = np.random.default_rng(1000 + step)
    tokens = torch.from_numpy(rng.integers(0, 128, (GLOBAL_BATCH, SEQ + 1)))
    mask = torch.from_numpy((rng.random((GLOBAL_BATCH, SEQ)) > 0.25).astype(np.float32))
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask}
    per = GLOBAL_BATCH // dp_size
    mine = {k: v[dp_rank * per:(dp_rank + 1) * per] for k, v in batch.items()}
    return [{k: v[i:i + MICRO_BATCH] for k, v in mine.items()} for i in range(0, per, MICRO_BATCH)]


def train(engine, steps: range) -> list[float]:
    return [engine.train_step(micro_batches(s, engine.dp_rank, engine.dp_size), LR).loss for s in steps]


def save(engine, cfg, root, step: int, rank: int = 0, world: int = 1, barrier=lambda: None):
    """What the trainer saves, plus the two pieces resharding needs."""
    state = engine.state_dict()
    extra = {"optimizer": state["optimizer"], "portable": reshard.optimizer_moments(engine)}
    meta = {"consumed_samples": step * GLOBAL_BATCH, "config": cfg.to_dict(),
            "sharding": reshard.sharding_meta(engine)}
    return ckpt.save_checkpoint(root, step, state["model"], extra, meta, rank=rank, world_size=world,
                                barrier=barrier)


def resume(engine, path) -> list[float]:
    full = reshard.consolidate(path)
    reshard.load_into(engine, full)
    start = full.consumed_samples // GLOBAL_BATCH
    assert start == full.step == HALF
    return train(engine, range(start, STEPS))


def matrix_worker(args: dict) -> dict:
    import torch.distributed as dist

    from pretrain.engines import build_engine

    rank, world = dist.get_rank(), dist.get_world_size()
    for name, (model, parallel) in args.get("sources", SOURCES).items():
        cfg = make_config(model, parallel)
        engine = build_engine(cfg, parallel=True)
        train(engine, range(HALF))
        save(engine, cfg, f"{args['root']}/{name}", HALF, rank, world, dist.barrier)
        del engine
    out = {}
    for name, (source, parallel) in args.get("targets", TARGETS).items():
        cfg = make_config(model_of(source), parallel)
        engine = build_engine(cfg, parallel=True)
        out[name] = resume(engine, f"{args['root']}/{source}")
        del engine
    return out


def model_of(source: str) -> str:
    return {**SOURCES, **SOURCES_4}.get(source, ("switch",))[0]


def local_engine(model: str):
    from pretrain.local_engine import LocalEngine
    from pretrain.models import build_model
    from pretrain.models.layers import LocalLayers

    cfg = make_config(model, {})
    torch.manual_seed(cfg.train.seed)
    return cfg, LocalEngine(cfg, build_model(cfg.family, cfg.model, LocalLayers()), torch.device("cpu"))


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict:
    """Per model: the never-stopped losses and the weights at the save step; saves the switch checkpoint."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("reshard")
    refs = {}
    for model in MODELS:
        cfg, engine = local_engine(model)
        first = train(engine, range(HALF))
        weights = {k: v.clone() for k, v in engine.model.state_dict().items()}
        if model == "switch":
            save(engine, cfg, root / "local switch", HALF)
        refs[model] = {"loss": first + train(engine, range(HALF, STEPS)), "weights": weights}
    return {"root": root, **refs}


@pytest.fixture(scope="module")
def matrix(references) -> dict:
    return run_distributed("tests.test_reshard:matrix_worker", 2, {"root": str(references["root"])}, timeout=600)[0]


@pytest.fixture(scope="module")
def matrix_4(references) -> dict:
    return run_distributed("tests.test_reshard:matrix_worker", 4, {"root": str(references["root"]),
                           "sources": SOURCES_4, "targets": TARGETS_4}, timeout=600)[0]


def rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) if math.isfinite(x) else math.inf for x, y in zip(a, b, strict=True))


def test_consolidated_weights_equal_single_process(references, matrix):
    for name, (model, _) in SOURCES.items():
        full = reshard.consolidate(references["root"] / name)
        ref = references[model]["weights"]
        assert set(full.model) <= set(ref) and full.step == HALF and full.consumed_samples == HALF * GLOBAL_BATCH
        diff = max((full.model[k] - ref[k]).abs().max().item() for k in full.model)
        print(f"{name:<12} consolidated weights max abs diff {diff:.1e}")
        assert diff <= PARAM_ATOL, (name, diff)
        assert full.optimizer_step == HALF
        assert set(full.moments) == {n for n, _ in local_engine(model)[1].model.named_parameters()}


def test_resume_under_other_layout_matches_never_stopped(references, matrix):
    diffs = {}
    for name, (source, _) in TARGETS.items():  # loaded by the 2-rank launch
        model = model_of(source)
        diffs[name] = rel(matrix[name], references[model]["loss"][HALF:])
    for name, (model, _) in SOURCES.items():  # 2-rank checkpoints resumed by one process
        _, engine = local_engine(model)
        diffs[f"{name} -> 1 process"] = rel(resume(engine, references["root"] / name), references[model]["loss"][HALF:])
    for name, d in diffs.items():
        print(f"{name:<28} resumed loss max rel diff {d:.1e}")
    assert all(d <= LOSS_RTOL for d in diffs.values()), diffs


def test_resume_without_moments_differs(references, matrix):
    """The optimizer state matters: resuming with fresh Adam moments does not reproduce the losses."""
    _, engine = local_engine("gpt2")
    reshard.load_into(engine, reshard.consolidate(references["root"] / "tp2 zero1"), optimizer=False)
    assert rel(train(engine, range(HALF, STEPS)), references["gpt2"]["loss"][HALF:]) > 1e-3


def corrupt_copy(references, tmp_path):
    src = references["root"] / "tp2 zero1"
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return ckpt.resolve(dst, "auto")


def test_missing_shard_names_file(references, matrix, tmp_path):
    step_dir = corrupt_copy(references, tmp_path)
    (step_dir / ckpt.model_file(1)).unlink()
    with pytest.raises(CheckpointError, match="model_rank00001.safetensors is missing"):
        reshard.consolidate(step_dir)


def test_truncated_shard_names_file(references, matrix, tmp_path):
    step_dir = corrupt_copy(references, tmp_path)
    f = step_dir / ckpt.model_file(0)
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model_rank00000.safetensors is unreadable"):
        reshard.consolidate(step_dir)
    g = step_dir / ckpt.state_file(1)
    g.write_bytes(g.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="unreadable"):
        reshard.consolidate(step_dir, optimizer=False)  # model first: rank 0's file is still truncated


def test_metadata_disagreeing_with_tensors_names_file(references, matrix, tmp_path):
    import json

    step_dir = corrupt_copy(references, tmp_path)
    meta = json.loads((step_dir / ckpt.META).read_text())
    meta["sharding"]["tensors"]["tok_emb.weight"]["shape"] = [64, 32]  # really [128, 32]
    (step_dir / ckpt.META).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"meta.json says \[64, 32\]"):
        reshard.consolidate(step_dir)
    meta["sharding"]["tensors"]["tok_emb.weight"]["shape"] = [128, 32]
    meta["sharding"]["name_sets"].append(meta["sharding"]["name_sets"][0] + ["ghost.weight"])
    meta["sharding"]["rank_names"][1] = len(meta["sharding"]["name_sets"]) - 1
    (step_dir / ckpt.META).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"model_rank00001.safetensors holds different tensors.*ghost"):
        reshard.consolidate(step_dir)


def test_cli_inspect_and_consolidate(references, matrix, tmp_path, capsys):
    from pretrain.cli import main

    src = references["root"] / "ep2"
    assert main(["ckpt", "inspect", str(src)]) == 0
    text = capsys.readouterr().out
    assert "step              5" in text and "consumed samples  40" in text and "ep=2" in text
    assert "blocks.1.mlp.w_in" in text and "ep dim 0" in text
    out = tmp_path / "full"
    assert main(["ckpt", "consolidate", str(src), str(out)]) == 0
    model, state, meta = ckpt.load_checkpoint(ckpt.resolve(out, "auto"))
    assert meta["world_size"] == 1 and meta["consumed_samples"] == 40
    full = reshard.consolidate(src)
    assert set(model) == set(full.model) and all(torch.equal(model[k], full.model[k]) for k in model)
    again = reshard.consolidate(out)  # a consolidated checkpoint consolidates (and resumes) like any other
    assert all(torch.equal(again.moments[n]["exp_avg"], full.moments[n]["exp_avg"]) for n in full.moments)
    assert main(["ckpt", "consolidate", str(src), str(out)]) == 1  # refuses to overwrite


def test_tp2_pp2_to_dp4_zero3_and_one_process(references, matrix_4):
    diffs = {name: rel(matrix_4[name], references[model_of(source)]["loss"][HALF:])
             for name, (source, _) in TARGETS_4.items()}
    for name, (model, _) in SOURCES_4.items():
        full = reshard.consolidate(references["root"] / name)
        assert max((full.model[k] - references[model]["weights"][k]).abs().max().item() for k in full.model) \
            <= PARAM_ATOL
        _, engine = local_engine(model)
        diffs[f"{name} -> 1 process"] = rel(resume(engine, references["root"] / name), references[model]["loss"][HALF:])
    print(diffs)
    assert all(d <= LOSS_RTOL for d in diffs.values()), diffs


def test_same_layout_decides_native_or_resharded_load(references):
    _, engine = local_engine("switch")
    _, meta = reshard.read_meta(references["root"] / "local switch")
    assert reshard.same_layout(meta, engine)
    assert not reshard.same_layout({**meta, "sharding": {**meta["sharding"], "layout": {**meta["sharding"]["layout"],
                                                                                         "ep": 2, "dp": 2}}}, engine)
    zero1 = {**meta, "config": {**meta["config"], "parallel": {**meta["config"]["parallel"], "zero": 1}}}
    assert not reshard.same_layout(zero1, engine)


def test_load_refuses_a_different_model(references):
    """An untied checkpoint into a tied model would drop ``head.weight``; a deeper one would drop blocks."""
    full = reshard.consolidate(references["root"] / "pp2")  # gpt2_deep: 4 blocks, untied head
    _, engine = local_engine("gpt2")
    with pytest.raises(CheckpointError, match="does not"):
        reshard.load_into(engine, full)
