"""Loss spikes and non-finite steps (``train.spike_*``): a garbage batch and a NaN planted in the data are detected;
``rollback`` reloads the last checkpoint and skips the data window, after which the losses equal those of a run
whose data never held that window; ``stop`` ends with a diagnostic; ``skip`` counts and goes on."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain import checkpoint as ckpt
from pretrain.config import ConfigError
from pretrain.engine import StepResult
from pretrain.spikes import SpikeGuard
from pretrain.train import build_datasets
from pretrain.trainer import EXIT_NONFINITE, EXIT_OK, Trainer
from tests.test_trainer import make_cfg, metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS, BAD = 14, (16, 18)  # samples 16 and 17: the whole global batch of step 9 (2 samples per step)
GARBAGE_ID = 50  # a T5 sentinel: never in GPT text, so the model has learnt to rule it out
COMMON = ["train.global_batch_size=2", "train.micro_batch_size=2", "schedule.warmup_steps=1",
          "schedule.warmup_fraction=0", f"train.steps={STEPS}", "checkpoint.interval=2", "checkpoint.keep_last=2",
          "checkpoint.async_save=true", "train.spike_zscore=4", "train.spike_grad_factor=3",
          "train.spike_window=5"]


class Planted:
    """``base`` with samples ``BAD`` replaced: a garbage document (one repeated unseen token), or a NaN."""

    def __init__(self, base, kind: str):
        self.base, self.kind = base, kind

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        sample = dict(self.base[i])
        if BAD[0] <= i < BAD[1] and self.kind == "garbage":
            sample["input_ids"] = np.full_like(sample["input_ids"], GARBAGE_ID)
            sample["labels"] = np.full_like(sample["labels"], GARBAGE_ID)
        elif BAD[0] <= i < BAD[1]:
            sample["loss_mask"] = np.full_like(sample["loss_mask"], np.nan)
        return sample


class WithoutWindow:
    """``base`` as if its sampler had never held the samples ``BAD`` (the reference run)."""

    def __init__(self, base):
        self.base = base

    def __len__(self) -> int:
        return len(self.base) - (BAD[1] - BAD[0])

    def __getitem__(self, i: int) -> dict:
        return self.base[i if i < BAD[0] else i + BAD[1] - BAD[0]]


def _train(cfg, wrap) -> tuple[Trainer, int]:
    torch.manual_seed(0)
    train, valid = build_datasets(cfg)
    trainer = Trainer(cfg, wrap(train), valid)
    trainer.resume(None)
    return trainer, trainer.fit()


def _losses(cfg) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(cfg) if "loss" in r}


def _cfg(tmp_path, name, tiny_shard_prefix, tiny_tokenizer, *extra):
    return make_cfg("gpt_tiny.yaml", tmp_path / name, tiny_shard_prefix, tiny_tokenizer, *COMMON, *extra)


def test_rollback_skips_the_window_and_matches_a_run_without_it(tmp_path, tiny_shard_prefix, tiny_tokenizer,
                                                                  caplog):
    reference = _cfg(tmp_path, "reference", tiny_shard_prefix, tiny_tokenizer)
    assert _train(reference, WithoutWindow)[1] == EXIT_OK
    expected = _losses(reference)
    for kind, counter in (("garbage", "spikes/grad"), ("nan", "spikes/nonfinite")):
        cfg = _cfg(tmp_path, kind, tiny_shard_prefix, tiny_tokenizer, "train.spike_action=rollback")
        with caplog.at_level(logging.WARNING, logger="pretrain.train"):
            trainer, code = _train(cfg, lambda d, kind=kind: Planted(d, kind))
        assert code == EXIT_OK and trainer.step == STEPS, kind
        assert "rolled back from step 9 to step_00000008 (step 8); skipping samples 16 to 18" in caplog.text, kind
        assert _losses(cfg) == expected, kind  # every step, exact: the run never saw samples 16 and 17
        last = [r for r in metrics(cfg) if "loss" in r][-1]
        assert last[counter] == 1 and last["spikes/rollbacks"] == 1, (kind, last)
        meta = json.loads((ckpt.resolve(cfg.checkpoint.dir) / ckpt.META).read_text())
        assert meta["data_skip"] == 2  # a resume continues past the window too
        caplog.clear()


def test_stop_ends_with_a_diagnostic_and_skip_goes_on(tmp_path, tiny_shard_prefix, tiny_tokenizer, caplog):
    cfg = _cfg(tmp_path, "stop", tiny_shard_prefix, tiny_tokenizer, "train.spike_action=stop")
    with caplog.at_level(logging.WARNING, logger="pretrain.train"):
        trainer, code = _train(cfg, lambda d: Planted(d, "garbage"))
    assert code == EXIT_NONFINITE and trainer.step == 9
    assert "step 9: grad-norm spike: loss" in caplog.text and "grad norm 7.7" in caplog.text and "median 1.1" in \
        caplog.text and "stopping" in caplog.text
    assert ckpt.resolve(cfg.checkpoint.dir).name == "step_00000008"  # the spiked state is not saved

    cfg = _cfg(tmp_path, "skip", tiny_shard_prefix, tiny_tokenizer, "train.spike_action=skip")
    trainer, code = _train(cfg, lambda d: Planted(d, "garbage"))
    assert code == EXIT_OK and trainer.step == STEPS
    rows = {r["step"]: r for r in metrics(cfg) if "loss" in r}
    assert rows[8]["spikes/grad"] == 0 and rows[9]["spikes/grad"] == 1 and rows[STEPS]["spikes/rollbacks"] == 0


def test_loss_zscore_and_grad_norm_spikes_are_detected(tmp_path, tiny_shard_prefix, tiny_tokenizer):
    cfg = make_cfg("gpt_tiny.yaml", tmp_path, tiny_shard_prefix, tiny_tokenizer, "train.spike_zscore=3",
                   "train.spike_grad_factor=4", "train.spike_window=4")
    guard = SpikeGuard(cfg.train, None)

    def step(loss, norm=1.0, skipped=False):
        return guard.check(0, StepResult(loss=loss, lm_loss=loss, grad_norm=norm, num_tokens=1.0, skipped=skipped))

    assert [step(x) for x in (3.0, 3.1, 2.9, 3.0)] == [None] * 4  # filling the window: never a spike
    assert step(3.2) is None  # z = 2.8 over (3.0, 3.1, 2.9, 3.0)
    assert step(3.5) == "skip"  # z = 4.0 over (3.1, 2.9, 3.0, 3.2): a loss spike, kept out of the window
    assert step(3.0, norm=4.5) == "skip" and step(3.0, norm=3.9) is None and step(float("nan"), skipped=True)
    assert guard.metrics() == {"spikes/nonfinite": 1, "spikes/loss": 1, "spikes/grad": 1, "spikes/rollbacks": 0}


@pytest.mark.parametrize("key, match", [("train.spike_action=retry", "train.spike_action must be one of"),
                                        ("train.spike_window=1", "train.spike_window must be >= 2"),
                                        ("train.spike_grad_factor=0.5", "train.spike_grad_factor must be > 1")])
def test_spike_keys_are_validated(key, match, tmp_path, tiny_shard_prefix, tiny_tokenizer):
    with pytest.raises(ConfigError, match=match):
        make_cfg("gpt_tiny.yaml", Path(tmp_path), tiny_shard_prefix, tiny_tokenizer, key)
