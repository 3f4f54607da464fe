"""Trainer operations: one host sync per step, the watchdog on a hung rank, continued pretraining from an
imported HF checkpoint, read-ahead of batches, the MFU peak table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from pretrain import checkpoint as ckpt
from pretrain.config import load_config
from pretrain.metrics import gpu_peak_flops
from pretrain.prefetch import StepBatches
from pretrain.train import build_datasets
from pretrain.trainer import EXIT_OK, Trainer
from tests.dist_utils import REPO, free_port
from tests.test_trainer import make_cfg, metrics


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_train_step_reads_the_device_once(tmp_path, tiny_shard_prefix, tiny_tokenizer, monkeypatch):
    """Losses, aux losses and the grad norm are fetched together: one ``tolist`` per step, no ``item``."""
    torch.manual_seed(0)
    cfg = make_cfg("switch_gpt_tiny.yaml", tmp_path, tiny_shard_prefix, tiny_tokenizer, "train.steps=2",
                   "train.global_batch_size=4", "train.micro_batch_size=2", "checkpoint.dir=null",
                   f"logging.dir={tmp_path}")
    train, valid = build_datasets(cfg)
    trainer = Trainer(cfg, train, valid)
    reads, in_step, step = [], [], trainer.engine.train_step

    def train_step(batches, lr, **kw):
        in_step.append(1)
        try:
            return step(batches, lr, **kw)
        finally:
            in_step.clear()

    trainer.engine.train_step = train_step
    for name in ("item", "tolist", "__float__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, _name=name, **k):
            if in_step:
                reads.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    assert trainer.fit() == EXIT_OK
    monkeypatch.undo()
    assert reads == ["tolist", "tolist"], reads  # 2 steps (2 micro-batches each, MoE aux loss): 1 read each
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 for r in metrics(cfg) if "loss" in r)


def test_prefetch_yields_the_synchronous_batches():
    """Read-ahead in a thread returns the same micro-batches per step as reading in the loop."""
    data = [{"x": torch.tensor([i])} for i in range(20)]
    counts = [1, 2, 3, 4]
    direct = StepBatches(iter(data), counts, prefetch=False)
    ahead = StepBatches(iter(data), counts, prefetch=True)
    for n in counts:
        a, b = direct.next(), ahead.next()
        assert len(a) == len(b) == n and all(torch.equal(x["x"], y["x"]) for x, y in zip(a, b))
    ahead.close()
    broken = StepBatches(iter(data[:2]), [3], prefetch=True)  # the loader runs dry: raised in the caller
    with pytest.raises(StopIteration):
        broken.next()
    broken.close()


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
                                          ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989), ("NVIDIA H200 NVL", 835),
                                          ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA GeForce GTX 1080", 0),
                                          ("Tesla V100-SXM2-32GB", 0)])  # no bf16 on V100
def test_gpu_peak_table(name, tflops):
    assert gpu_peak_flops(name) == tflops * 1e12


# --- watchdog on a real 2-rank run ----------------------------------------------------------------------------
STALL = textwrap.dedent("""
    import json, os, sys, time
    import torch, torch.distributed as dist
    from pretrain.config import load_config
    from pretrain.train import build_datasets
    from pretrain.trainer import Trainer
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    cfg = load_config(sys.argv[1], json.loads(sys.argv[2]))
    trainer = Trainer(cfg, *build_datasets(cfg))
    if dist.get_rank() == 1:
        step = trainer.engine.train_step
        def stall(batches, lr, **kw):
            if trainer.step == 2:
                time.sleep(60)  # rank 0 waits in the gradient all-reduce meanwhile
            return step(batches, lr, **kw)
        trainer.engine.train_step = stall
    sys.exit(trainer.fit())
""")


@pytest.mark.dist
def test_watchdog_ends_a_run_stalled_on_one_rank(tmp_path, tiny_shard_prefix, tiny_tokenizer):
    overrides = [f"data.train=[{tiny_shard_prefix}]", f"data.tokenizer={tiny_tokenizer.path}",
                 f"data.cache_dir={tmp_path / 'index'}", f"model.vocab_size={tiny_tokenizer.vocab_size}",
                 "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=null",
                 "data.seq_length=32", "train.steps=5", "train.global_batch_size=4", "train.micro_batch_size=2",
                 "train.watchdog_timeout=3", "logging.tensorboard=false", "checkpoint.dir=null"]
    cfg = load_config(REPO / "configs" / "gpt_tiny.yaml", overrides)
    build_datasets(cfg)  # build the index cache once, before the ranks race for it
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-c", STALL, str(REPO / "configs" / "gpt_tiny.yaml"), json.dumps(overrides)]
    # rank 1 stalls; its own watchdog waits longer (the environment overrides the config's 3 s), so rank 0,
    # waiting in the all-reduce, reports first
    env.pop("PRETRAIN_WATCHDOG_TIMEOUT", None)
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r),
                                        **({"PRETRAIN_WATCHDOG_TIMEOUT": "50"} if r else {})},
                              cwd=REPO, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for r in range(2)]
    t0 = time.monotonic()
    try:
        _, err = procs[0].communicate(timeout=120)
        waited = time.monotonic() - t0
    finally:
        procs[1].kill()
        err1 = procs[1].communicate()[1]
    assert procs[0].returncode == 124, err[-3000:] + "\n--- rank 1:\n" + err1[-3000:]
    assert "WATCHDOG: rank 0/2" in err and "in 'train step'; last step: 2" in err, err[-3000:]
    assert "in all_reduce" in err and "in train_step" in err  # the stack shows the collective it waits in
    assert waited < 45  # ended by the watchdog, long before rank 1 would resume


# --- continued pretraining from `pretrain import` -------------------------------------------------------------
def _tiny_hf_llama(out: Path, tokenizer) -> Path:
    import transformers

    from pretrain.hf.tokenizer import save_hf_tokenizer

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                   max_position_embeddings=64, tie_word_embeddings=False,
                                   bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                                   architectures=["LlamaForCausalLM"])
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    save_hf_tokenizer(tokenizer.path, out)
    return out


def test_init_from_an_imported_hf_checkpoint(tmp_path, tiny_shard_prefix, tiny_tokenizer):
    from pretrain.cli import main as cli_main

    hf = _tiny_hf_llama(tmp_path / "hf", tiny_tokenizer)
    assert cli_main(["import", str(hf), str(tmp_path / "imported")]) == 0
    weights, _, meta = ckpt.load_checkpoint(ckpt.resolve(tmp_path / "imported"))

    raw = meta["config"]  # the imported model's config, with our data and a short run
    raw["data"].update(train=[tiny_shard_prefix], tokenizer=str(tiny_tokenizer.path), seq_length=32,
                       cache_dir=str(tmp_path / "index"))
    raw["train"].update(steps=3, global_batch_size=4, micro_batch_size=2)
    raw["schedule"].update(warmup_fraction=0.5)
    raw["checkpoint"].update(dir=str(tmp_path / "run"), init_from=str(tmp_path / "imported"))
    raw["logging"].update(interval=1, tensorboard=False)
    (tmp_path / "cpt.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "cpt.yaml")

    train, valid = build_datasets(cfg)
    with pytest.raises(ckpt.CheckpointError, match="weights only.*checkpoint.init_from"):
        Trainer(cfg, train, valid).resume(str(tmp_path / "imported"))  # not resumable: no optimizer state
    trainer = Trainer(cfg, train, valid)
    assert trainer.resume("auto") is False and trainer.step == 0 and trainer.consumed_samples == 0
    for name, value in trainer.engine.model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    assert trainer.fit() == EXIT_OK and trainer.step == 3
    records = [r for r in metrics(cfg) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["lr"] < records[1]["lr"]  # the schedule starts fresh: warm-up from step 0
    assert abs(records[0]["loss"] - torch.log(torch.tensor(float(tiny_tokenizer.vocab_size))).item()) < 0.5

    again = Trainer(cfg, train, valid)  # a requeued job continues its own checkpoint, not init_from
    assert again.resume("auto") is True and again.step == 3
