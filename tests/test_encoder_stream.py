"""Masked-LM data for the encoder family: bad input refused by the pre-flight check (one line, nothing started),
and masked-LM samples straight from raw text (the shard path's masking, 80/10/10, exact resume)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.cli import main
from pretrain.config import load_config
from pretrain.data.gpt_dataset import GPTDataset
from pretrain.data.indexed import IndexedDataset
from pretrain.data.loader import build_train_valid_datasets
from pretrain.data.mlm_dataset import MLMDataset
from tests.test_stream import small_corpus

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL = ["data.seq_length=32", "model.hidden_size=32", "model.num_layers=2", "model.ffn_hidden_size=64",
         "train.eval_interval=0", "logging.tensorboard=false", "logging.interval=1"]


def encoder_run(tmp_path: Path, train: str, tokenizer, *extra: str) -> list[str]:
    """``pretrain train`` arguments of a tiny BERT on ``train``."""
    return [str(CONFIGS / "bert_tiny.yaml"), f"data.train=[{train}]", f"data.tokenizer={tokenizer.path}",
            f"data.cache_dir={tmp_path / 'cache'}", f"model.vocab_size={tokenizer.vocab_size}",
            f"checkpoint.dir={tmp_path / 'run'}", *SMALL, *extra]


def test_bad_masked_lm_input_is_one_line_before_anything_starts(tmp_path, capsys, tiny_corpus, tiny_shard_prefix,
                                                                tiny_tokenizer):
    """``pretrain train --dry-run`` (the pre-flight check every launcher runs before starting processes): a
    vocabulary without the mask token, mask rates outside (0, 1), sentence pairs longer than the context and
    next-sentence pairs from raw text each give one line naming the key and the fix, exit 2, no traceback."""
    cases = [
        (tiny_shard_prefix, ["data.mask_token=null"], f"data.tokenizer {tiny_tokenizer.path}: no mask token [MASK] "
                                                      f"or <mask> in its vocabulary"),
        (tiny_shard_prefix, ["data.mask_token=<nope>"], "set data.mask_token to a token the vocabulary has"),
        (tiny_shard_prefix, ["data.mask_rate=1.5"], "data.mask_rate must be in (0, 1)"),
        (tiny_shard_prefix, ["data.mask_rate=0"], "data.mask_rate must be in (0, 1)"),
        (tiny_shard_prefix, ["data.sentence_pairs=nsp", "model.nsp_head=true", "data.seq_length=200"],
         "data.seq_length=200 exceeds model.max_seq_len=128"),
        (tiny_corpus, ["data.sentence_pairs=nsp", "model.nsp_head=true"], "data.sentence_pairs=nsp with a raw-text"),
    ]
    for train, extra, message in cases:
        try:
            code = main(["train", *encoder_run(tmp_path, str(train), tiny_tokenizer, *extra), "--dry-run"])
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        lines = [line for line in out.err.splitlines() if line.strip()]
        assert code == 2, (extra, out.out, out.err)
        assert len(lines) == 1 and lines[0].startswith("pretrain train: ") and message in lines[0], out.err
        assert "Traceback" not in out.err + out.out and not (tmp_path / "run").exists()
    code = main(["train", *encoder_run(tmp_path, str(tiny_corpus), tiny_tokenizer, "data.sentence_pairs=sop",
                                       "model.nsp_head=true"), "--dry-run"])
    assert code == 0 and "nothing started" in capsys.readouterr().out  # sentence order needs no second chunk


def stream_cfg(corpus, tokenizer, tmp_path: Path, **kw) -> dict:
    return {"train": [str(corpus)], "tokenizer": str(tokenizer.path), "seq_length": 64, "seed": 7,
            "cache_dir": str(tmp_path / "cache"), "mask_token": "<extra_id_99>", **kw}


def test_raw_text_masking_is_the_shard_paths(tiny_corpus, tiny_shard_prefix, tiny_tokenizer, tmp_path):
    """One lane, file order: sample ``i`` of the stream is ``MLMDataset``'s sample ``i`` over the shard `pretrain
    prepare` wrote (same chunks, same mask from seed and index; whole words, document ids); shuffled 4-lane
    stream: the rate is exact per sample and the choice 80/10/10; sentence-order pairs stream too."""
    indexed = IndexedDataset(tiny_shard_prefix)
    docs = np.arange(len(indexed))
    options = dict(whole_word_mask=True, document_mask=True, mask_rate=0.2)
    stream = build_train_valid_datasets(stream_cfg(tiny_corpus, tiny_tokenizer, tmp_path, stream_lanes=1,
                                                   stream_shuffle=False, stream_chunk_mb=0.1, **options),
                                        "mlm", 40, tokenizer=tiny_tokenizer)[0]
    shard = MLMDataset(indexed, docs, 40, 64, 7, tokenizer=tiny_tokenizer, mask_token="<extra_id_99>",
                       mask_rate=0.2, whole_word=True, document_masking=True)
    shard.chunks = GPTDataset(indexed, docs, 40, 62, 7, tiny_tokenizer.eod_id, extra_token=0, shuffle=False)
    lane = stream.micro_batches(0, 1, 1, lambda c: 1, 0)
    for i in range(40):
        sample = next(lane)
        assert sorted(sample) == sorted(shard[i])
        for key, value in shard[i].items():
            np.testing.assert_array_equal(sample[key][0].numpy(), value, err_msg=f"{key} of sample {i}")

    mask_id = tiny_tokenizer.token_to_id("<extra_id_99>")
    specials = [tiny_tokenizer.bos_id, tiny_tokenizer.eos_id, tiny_tokenizer.eod_id, mask_id]
    stream = build_train_valid_datasets(stream_cfg(tiny_corpus, tiny_tokenizer, tmp_path, stream_lanes=4,
                                                   stream_chunk_mb=0.01, mask_rate=0.3), "mlm", 400,
                                        tokenizer=tiny_tokenizer)[0]
    batch = next(stream.micro_batches(0, 1, 400, lambda c: 400, 0))
    chosen = batch["loss_mask"].bool()
    ordinary = ~torch.isin(batch["labels"], torch.tensor(specials))
    assert torch.equal(chosen.sum(1), (0.3 * ordinary.sum(1)).round().long()) and not (chosen & ~ordinary).any()
    inputs, labels = batch["input_ids"][chosen], batch["labels"][chosen]
    masked, kept = (inputs == mask_id).float().mean(), (inputs == labels).float().mean()
    assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1) < 0.015 and abs(1 - masked - kept - 0.1) < 0.015
    assert torch.equal(batch["input_ids"][~chosen], batch["labels"][~chosen])

    sop = build_train_valid_datasets(stream_cfg(tiny_corpus, tiny_tokenizer, tmp_path, stream_lanes=4,
                                                sentence_pairs="sop"), "mlm", 100, tokenizer=tiny_tokenizer)[0]
    batch = next(sop.micro_batches(0, 1, 100, lambda c: 100, 0))
    assert batch["input_ids"].shape == (100, 64) and 30 < int(batch["next_sentence_label"].sum()) < 70
    assert ((batch["labels"] == tiny_tokenizer.eos_id).sum(1) >= 2).all()  # [CLS] A [SEP] B [SEP]
    assert batch["token_type_ids"][:, 0].eq(0).all() and batch["token_type_ids"][:, -1].eq(1).all()


def test_encoder_trains_from_raw_jsonl_and_resumes_exactly(tiny_corpus, tiny_tokenizer, tmp_path, one_torch_thread):
    """A tiny BERT trained on a raw jsonl stream (4 lanes, whole-word masking): 6 steps straight vs stopped at
    step 3 (checkpoint with the lanes' position) and resumed: bit-identical parameters, and the loss falls."""
    from pretrain.train import build_datasets
    from pretrain.trainer import EXIT_OK, EXIT_PREEMPTED, Trainer
    from tests.test_trainer import StopAt, metrics

    corpus = small_corpus(tiny_corpus, tmp_path / "c.jsonl", docs=40)

    def run(name: str, resume=None, stop=None):
        torch.manual_seed(0)
        cfg = load_config(CONFIGS / "bert_tiny.yaml", encoder_run(tmp_path / name, str(corpus), tiny_tokenizer)[1:] + [
            "data.stream_lanes=4", "data.stream_chunk_mb=0.001", "data.whole_word_mask=true", "train.steps=6",
            "train.global_batch_size=8", "train.micro_batch_size=4", "checkpoint.interval=3",
            "optimizer.lr=3e-3", "schedule.warmup_fraction=0"])
        trainer = Trainer(cfg, *build_datasets(cfg), stop=stop)
        if stop is not None:
            stop.trainer = trainer
        trainer.resume(resume)
        return trainer, trainer.fit(), cfg

    full, code, cfg = run("full")
    assert code == EXIT_OK
    first, code, _ = run("split", stop=StopAt(3))
    assert code == EXIT_PREEMPTED and first.step == 3
    second, code, _ = run("split", resume="auto")
    assert code == EXIT_OK and second.step == 6
    for (name, a), b in zip(full.engine.model.state_dict().items(), second.engine.model.state_dict().values()):
        assert torch.equal(a, b), name
    losses = [r["loss"] for r in metrics(cfg) if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.1, losses
