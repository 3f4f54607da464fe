"""Blending (exact proportions, deterministic), document-range splits, and the config -> DataLoader path."""

import json
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import pretrain.data.blend as blend
from pretrain.data.blend import BlendedDataset, build_blending_indices, split_document_ranges
from pretrain.data.indexed import IndexedDataset, IndexedDatasetWriter, ShardError
from pretrain.data.loader import build_dataloader, build_train_valid_datasets, parse_blend
from pretrain.data.sampler import DataParallelSampler


def test_blend_proportions_are_exact_at_every_prefix():
    weights = [0.5, 0.3, 0.2]
    ds_index, sample_index = build_blending_indices(weights, 1000)
    assert np.bincount(ds_index).tolist() == [500, 300, 200]
    counts = np.zeros(3)
    for t, (d, s) in enumerate(zip(ds_index, sample_index)):
        assert s == counts[d]  # each dataset is read in order 0, 1, 2, ...
        counts[d] += 1
        assert np.abs(counts - np.array(weights) * (t + 1)).max() <= 1.0
    again = build_blending_indices(weights, 1000)
    assert np.array_equal(again[0], ds_index) and np.array_equal(again[1], sample_index)


def test_python_fallback_equals_megatron_helper(monkeypatch):
    if blend._megatron_helpers() is None:
        pytest.skip("megatron-core not installed")
    ref = build_blending_indices([3, 1, 2.5], 777)
    monkeypatch.setattr(blend, "_megatron_helpers", lambda: None)
    ours = build_blending_indices([3, 1, 2.5], 777)
    assert np.array_equal(ours[0], ref[0]) and np.array_equal(ours[1], ref[1])


def test_blended_dataset_routes_and_checks_sizes():
    a, b = [{"x": np.array([i])} for i in range(100)], [{"x": np.array([1000 + i])} for i in range(100)]
    ds = BlendedDataset([a, b], [0.25, 0.75], 40)
    xs = [int(ds[i]["x"][0]) for i in range(40)]
    assert sorted(x for x in xs if x < 1000) == list(range(10)) and sorted(x for x in xs if x >= 1000) == list(
        range(1000, 1030))
    with pytest.raises(ValueError, match="needs 150 samples from dataset #1"):
        BlendedDataset([a, b], [0.25, 0.75], 200)
    with pytest.raises(ValueError, match="positive"):
        build_blending_indices([1.0, 0.0], 10)


def test_split_ranges():
    assert split_document_ranges(100, "98,2") == [(0, 98), (98, 100)]
    assert split_document_ranges(1000, "949,50,1") == [(0, 949), (949, 999), (999, 1000)]
    ranges = split_document_ranges(37, [0.7, 0.2, 0.1])
    assert ranges[0][0] == 0 and ranges[-1][1] == 37 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    with pytest.raises(ValueError, match="split"):
        split_document_ranges(10, "98,-2")


def test_parse_blend():
    assert parse_blend(["a", "b"]) == (["a", "b"], None)
    assert parse_blend([0.7, "a", 0.3, "b"]) == (["a", "b"], [0.7, 0.3])
    with pytest.raises(ValueError, match="data.train"):
        parse_blend([0.7, "a", "b"])


def _config(train, **kw):
    return {"train": train, "seq_length": 32, "split": "90,10", "seed": 11, **kw}


def test_loader_split_is_disjoint_and_blend_exact(tiny_shard_prefix, tiny_tokenizer, tmp_path):
    other = str(tmp_path / "copy")
    for ext in (".bin", ".idx", ".json"):
        shutil.copy(tiny_shard_prefix + ext, other + ext)
    n_docs = len(IndexedDataset(tiny_shard_prefix))
    cut = split_document_ranges(n_docs, "90,10")[0][1]
    train, valid = build_train_valid_datasets(_config([tiny_shard_prefix], cache_dir=tmp_path / "c"), "gpt", 200,
                                              20, tiny_tokenizer)
    assert len(train) >= 200 and len(valid) >= 20
    assert np.asarray(train.document_index).max() < cut <= np.asarray(valid.document_index).min()

    train, valid = build_train_valid_datasets(_config([0.7, tiny_shard_prefix, 0.3, other], cache_dir=tmp_path / "c"),
                                              "gpt", 200, 20, tiny_tokenizer)
    assert len(train) == 200 and np.bincount(train.dataset_index).tolist() == [140, 60]
    assert len(valid) == 20 and np.bincount(valid.dataset_index).tolist() == [14, 6]
    assert train[5]["input_ids"].shape == (32,)


def test_loader_rejects_other_tokenizer(tiny_shard_prefix, tiny_tokenizer, tmp_path):
    wrong = types.SimpleNamespace(identity="0" * 64, vocab_size=tiny_tokenizer.vocab_size, path="other.model",
                                  eod_id=2, eos_id=2, pad_id=3, sentinel_ids=[])
    with pytest.raises(ShardError, match=r"tiny\.json: tokenizer mismatch: identity"):
        build_train_valid_datasets(_config([tiny_shard_prefix], cache_dir=tmp_path), "gpt", 10, 2, wrong)
    with pytest.raises(ValueError, match="unknown keys"):
        build_train_valid_datasets({**_config([tiny_shard_prefix]), "seqlen": 3}, "gpt", 10, 2, tiny_tokenizer)


def test_loader_adds_eod_for_shards_without_it(tiny_shard_prefix, tiny_tokenizer, tmp_path):
    shard = IndexedDataset(tiny_shard_prefix)
    bare = str(tmp_path / "bare")
    writer = IndexedDatasetWriter(bare, shard.dtype)
    for i in range(len(shard)):
        assert shard[i][-1] == tiny_tokenizer.eod_id
        writer.add_document(shard[i][:-1])
    writer.finalize()
    meta = json.loads(Path(tiny_shard_prefix + ".json").read_text())
    Path(bare + ".json").write_text(json.dumps({**meta, "append_eod": False}))
    with_eod, _ = build_train_valid_datasets(_config([tiny_shard_prefix], cache_dir=tmp_path), "gpt", 50, 5,
                                             tiny_tokenizer)
    without, _ = build_train_valid_datasets(_config([bare], cache_dir=tmp_path), "gpt", 50, 5, tiny_tokenizer)
    for i in range(50):
        np.testing.assert_array_equal(with_eod[i]["input_ids"], without[i]["input_ids"])


def test_dataloader_batches(tiny_shard_prefix, tiny_tokenizer, tmp_path):
    torch.manual_seed(0)
    cfg = _config([tiny_shard_prefix], cache_dir=tmp_path, seq_length=64, document_mask=True)
    train, _ = build_train_valid_datasets(cfg, "gpt", 64, 8, tiny_tokenizer)
    sampler = DataParallelSampler(len(train), dp_rank=1, dp_size=2, micro_batch_size=2, global_batch_size=8)
    batches = iter(build_dataloader(train, sampler))
    first, second = next(batches), next(batches)
    assert {k: (tuple(v.shape), v.dtype) for k, v in first.items()} == {
        "input_ids": ((2, 64), torch.int64), "labels": ((2, 64), torch.int64), "loss_mask": ((2, 64), torch.float32),
        "position_ids": ((2, 64), torch.int64), "document_ids": ((2, 64), torch.int64)}
    assert torch.equal(second["input_ids"][1], torch.from_numpy(train[7]["input_ids"]))  # rank 1: samples 4..7

    t5, _ = build_train_valid_datasets(_config([tiny_shard_prefix], cache_dir=tmp_path, seq_length=64,
                                               decoder_seq_length=16), "t5", 16, 4, tiny_tokenizer)
    batch = next(iter(build_dataloader(t5, DataParallelSampler(len(t5), 0, 1, 4, 4))))
    assert tuple(batch["input_ids"].shape) == (4, 64) and tuple(batch["labels"].shape) == (4, 16)
    assert set(batch["labels"].flatten().tolist()) & set(tiny_tokenizer.sentinel_ids)
