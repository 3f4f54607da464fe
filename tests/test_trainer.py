"""The training loop on real tiny models and real shards: loss falls, exact resume, non-finite steps, checkpoints."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from pretrain import checkpoint as ckpt
from pretrain.config import load_config
from pretrain.train import build_datasets
from pretrain.trainer import EXIT_NONFINITE, EXIT_OK, EXIT_PREEMPTED, StopFlag, Trainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL_GPT = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=null"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_cfg(name: str, tmp_path: Path, prefix: str, tokenizer, *overrides: str):
    return load_config(CONFIGS / name, [
        f"data.train=[{prefix}]", f"data.tokenizer={tokenizer.path}", f"data.cache_dir={tmp_path / 'index'}",
        f"model.vocab_size={tokenizer.vocab_size}", f"checkpoint.dir={tmp_path / 'run'}", "logging.interval=1",
        "logging.tensorboard=false", "data.seq_length=32", *([] if "t5" in name else SMALL_GPT), *overrides])


def run(cfg, resume=None, stop=None) -> tuple[Trainer, int]:
    train, valid = build_datasets(cfg)
    trainer = Trainer(cfg, train, valid, stop=stop)
    trainer.resume(resume)
    return trainer, trainer.fit()


def metrics(cfg) -> list[dict]:
    return [json.loads(line) for line in (Path(cfg.log_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ["gpt_tiny.yaml", "gpt2_tiny.yaml", "switch_gpt_tiny.yaml", "t5_tiny.yaml"])
def test_family_trains_and_loss_falls(name, tmp_path, tiny_shard_prefix, tiny_tokenizer):
    torch.manual_seed(0)
    cfg = make_cfg(name, tmp_path, tiny_shard_prefix, tiny_tokenizer, "train.steps=40", "train.global_batch_size=8",
                   "train.micro_batch_size=8", "schedule.warmup_steps=3", "schedule.warmup_fraction=0",
                   "train.eval_interval=40", "train.eval_steps=2", "checkpoint.interval=0")
    trainer, code = run(cfg)
    assert code == EXIT_OK and trainer.step == 40
    records = [r for r in metrics(cfg) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 41))
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tflops", "memory_gb"):
        assert all(isinstance(r[key], (int, float)) for r in records), key
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-5:]) / 5
    assert last < first - 0.75, (first, last)  # starts near ln(1000) = 6.9
    val = [r for r in metrics(cfg) if "val_loss" in r]
    assert len(val) == 1 and val[0]["val_loss"] < first
    assert ckpt.resolve(cfg.checkpoint.dir).name == "step_00000040"


class StopAt(StopFlag):
    """Behaves like a preemption signal arriving during step ``at``."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.trainer = at, None

    @property
    def requested(self):
        return self.trainer is not None and self.trainer.step >= self.at

    @requested.setter
    def requested(self, value):
        pass


def test_resume_is_bit_exact(tmp_path, tiny_shard_prefix, tiny_tokenizer):
    """Run 8 steps straight vs. stop at 3 (checkpoint), resume to 8: identical losses and parameters.

    Switch MoE (router jitter consumes the RNG) with a batch ramp-up (batch depends on consumed samples)."""
    overrides = ["train.steps=8", "train.global_batch_size=8", "train.micro_batch_size=2", "schedule.rampup_start=2",
                 "schedule.rampup_increment=2", "schedule.rampup_samples=16", "checkpoint.interval=2",
                 "checkpoint.keep_last=2"]
    torch.manual_seed(0)
    full_cfg = make_cfg("switch_gpt_tiny.yaml", tmp_path / "full", tiny_shard_prefix, tiny_tokenizer, *overrides)
    full, code = run(full_cfg)
    assert code == EXIT_OK

    torch.manual_seed(0)
    cfg = make_cfg("switch_gpt_tiny.yaml", tmp_path / "split", tiny_shard_prefix, tiny_tokenizer, *overrides)
    stop = StopAt(3)
    train, valid = build_datasets(cfg)
    first = Trainer(cfg, train, valid, stop=stop)
    stop.trainer = first
    assert first.fit() == EXIT_PREEMPTED and first.step == 3
    assert ckpt.resolve(cfg.checkpoint.dir).name == "step_00000003"
    torch.manual_seed(123)  # a fresh process would start from another RNG state: the checkpoint must restore it
    second, code = run(cfg, resume="auto")
    assert code == EXIT_OK and second.step == 8

    def losses(c):
        return {r["step"]: (r["loss"], r["grad_norm"], r["batch_size"]) for r in metrics(c) if "loss" in r}

    assert losses(cfg) == losses(full_cfg)  # exact float equality, steps 1..8
    assert [b for _, _, b in losses(cfg).values()] == [2, 2, 2, 4, 4, 6, 8, 8]
    for (name, a), b in zip(full.engine.model.state_dict().items(), second.engine.model.state_dict().values()):
        assert torch.equal(a, b), name
    # keep_last=2: step 4 (interval), 6, 8 were saved after the resume; 2 and 3 pruned
    assert sorted(p.name for p in Path(cfg.checkpoint.dir).glob("step_*")) == ["step_00000006", "step_00000008"]


def test_nonfinite_steps_are_skipped_then_stop(tmp_path, tiny_shard_prefix, tiny_tokenizer):
    torch.manual_seed(0)
    cfg = make_cfg("gpt_tiny.yaml", tmp_path, tiny_shard_prefix, tiny_tokenizer, "train.steps=10",
                   "train.global_batch_size=4", "train.micro_batch_size=4", "train.max_nonfinite=3",
                   "checkpoint.interval=0")
    train, valid = build_datasets(cfg)
    trainer = Trainer(cfg, train, valid)
    model, poison = trainer.engine.model, {2, 4, 5, 6}  # steps (1-based) whose loss is NaN
    forward, snapshots = model.forward, {}

    def poisoned(**batch):
        out = forward(**batch)
        snapshots.setdefault(trainer.step + 1, {k: v.clone() for k, v in model.state_dict().items()})
        if trainer.step + 1 in poison:
            out.lm_loss_sum = out.lm_loss_sum * float("nan")
        return out

    model.forward = poisoned
    assert trainer.fit() == EXIT_NONFINITE
    assert trainer.step == 6  # 4, 5, 6 in a row -> stop after the third
    records = {r["step"]: r for r in metrics(cfg)}
    assert [s for s, r in records.items() if r["skipped"]] == [2, 4, 5, 6]
    assert not records[3]["skipped"] and records[3]["loss"] == records[3]["loss"]
    for k, v in snapshots[3].items():  # the skipped step 2 left the weights as they were before it
        assert torch.equal(v, snapshots[2][k]), k
    model_state, _, meta = ckpt.load_checkpoint(ckpt.resolve(cfg.checkpoint.dir))
    assert meta["step"] == 6
    for k, v in model.state_dict().items():  # the checkpoint holds the last good weights (= after step 3)
        assert torch.equal(model_state[k], snapshots[4][k]) and torch.equal(v, snapshots[4][k]), k


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 4, generator=g)}


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "ckpt"
    ckpt.save_checkpoint(root, 1, _state(1), {"opt": {"m": torch.ones(2)}}, {"consumed_samples": 8})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(ckpt.torch, "save", crash)  # dies after the model file, before the directory is published
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(root, 2, _state(2), {"opt": {}}, {"consumed_samples": 16})
    monkeypatch.undo()
    assert (root / ".tmp_step_00000002").exists() and not (root / "step_00000002").exists()
    path = ckpt.resolve(root)
    model, state, meta = ckpt.load_checkpoint(path)
    assert path.name == "step_00000001" and meta["consumed_samples"] == 8
    assert torch.equal(model["w"], _state(1)["w"]) and torch.equal(state["opt"]["m"], torch.ones(2))
    # the next save cleans the leftovers and publishes normally
    ckpt.save_checkpoint(root, 2, _state(2), {"opt": {}}, {"consumed_samples": 16})
    assert ckpt.resolve(root).name == "step_00000002" and not (root / ".tmp_step_00000002").exists()


def test_keep_last_k_and_latest_pointer(tmp_path):
    root = tmp_path / "ckpt"
    for step in range(1, 6):
        ckpt.save_checkpoint(root, step, _state(step), {}, {"consumed_samples": step}, keep_last=2)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_00000004", "step_00000005"]
    assert (root / "latest").read_text().strip() == "step_00000005"
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
    with pytest.raises(ckpt.CheckpointError, match="no meta.json"):
        ckpt.resolve(root, str(tmp_path))


def test_torch_rng_and_numpy_rng_roundtrip():
    import random

    import numpy as np

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = ckpt.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


@pytest.mark.parametrize("name", ["SIGUSR1", "SIGTERM", "SIGINT"])  # Ctrl-C too asks for a save
def test_stop_signals_set_the_stop_flag(name):
    import signal

    from pretrain.train import install_stop_handler

    stop, handler = install_stop_handler()
    try:
        os.kill(os.getpid(), getattr(signal, name))
        assert stop.requested and stop.reason == name
    finally:
        handler.uninstall()


def test_bf16_autocast_smoke(tmp_path, tiny_shard_prefix, tiny_tokenizer):
    """bf16 autocast trains (slowly on this CPU, which has no bf16 units) and agrees with fp32 at step 1."""
    first = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        cfg = make_cfg("gpt_tiny.yaml", tmp_path / precision, tiny_shard_prefix, tiny_tokenizer, "train.steps=2",
                       "train.global_batch_size=2", "train.micro_batch_size=2", f"train.precision={precision}",
                       "checkpoint.dir=null", f"logging.dir={tmp_path / precision}")
        trainer, code = run(cfg)
        records = [r for r in metrics(cfg) if "loss" in r]
        assert code == EXIT_OK and len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)
        first[precision] = records[0]["loss"]
    assert first["bf16"] != first["fp32"] and abs(first["bf16"] - first["fp32"]) < 0.05


@pytest.mark.parametrize("name", ["switch_gpt_tiny.yaml", "t5_tiny.yaml"])
def test_task_evaluation_during_training_matches_pretrain_eval(name, tmp_path, tiny_shard_prefix, tiny_tokenizer):
    """train.eval_tasks scores the live model every eval_interval; the final scores equal evaluating the saved
    checkpoint afterwards, and the evaluation leaves the training run (losses, RNG) unchanged."""
    from pretrain.evals.harness import evaluate_tasks, scalar_metrics
    from pretrain.evals.local_data import ensure_local_eval_data
    from pretrain.evals.pretrain_model import load_checkpoint_model

    ensure_local_eval_data()
    common = ("train.steps=6", "train.global_batch_size=4", "train.micro_batch_size=2", "train.eval_interval=3",
              "train.eval_steps=1", "model.moe.jitter=0.1")
    torch.manual_seed(0)
    cfg = make_cfg(name, tmp_path, tiny_shard_prefix, tiny_tokenizer, *common,
                   "train.eval_tasks=kjv_cont,kjv_lastword", "train.eval_tasks_limit=8")
    assert cfg.train.eval_tasks == ["kjv_cont", "kjv_lastword"]
    assert run(cfg)[1] == EXIT_OK
    evals = [r for r in metrics(cfg) if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in evals] == [3, 6]
    assert {"eval/kjv_cont/0shot/acc", "eval/kjv_cont/0shot/acc_norm", "eval/kjv_lastword/0shot/perplexity"} \
        <= set(evals[-1])
    model = load_checkpoint_model(ckpt.resolve(cfg.checkpoint.dir))
    after = scalar_metrics(evaluate_tasks(model, ["kjv_cont", "kjv_lastword"], 0, 8, progress=False))
    assert after == {k: v for k, v in evals[-1].items() if k != "step"}

    plain = make_cfg(name, tmp_path / "plain", tiny_shard_prefix, tiny_tokenizer, *common)
    torch.manual_seed(0)
    assert run(plain)[1] == EXIT_OK
    losses = [[r["loss"] for r in metrics(c) if "loss" in r] for c in (cfg, plain)]
    assert losses[0] == losses[1] and len(losses[0]) == 6


def test_eval_tasks_are_validated_before_training(tmp_path, tiny_shard_prefix, tiny_tokenizer):
    from pretrain.config import ConfigError
    from pretrain.preflight import check

    def checked(*overrides: str) -> None:  # the config, then the pre-flight step `pretrain train` runs
        check(make_cfg("gpt_tiny.yaml", tmp_path, tiny_shard_prefix, tiny_tokenizer, *overrides), world_size=1)

    with pytest.raises(ConfigError, match="unknown task 'no_such_task'"):
        checked("train.eval_interval=5", "train.eval_tasks=[no_such_task]")
    with pytest.raises(ConfigError, match="set train.eval_interval > 0"):
        checked("train.eval_interval=0", "train.eval_tasks=kjv_cont")
    with pytest.raises(ConfigError, match="needs parallel.ep=1, zero<3"):
        checked("train.eval_interval=5", "train.eval_tasks=kjv_cont", "parallel.zero=3")
