"""Packed GPT samples: exact window contents, masks, epochs, index cache, and parity with Megatron's GPTDataset."""

import multiprocessing as mp
import types

import numpy as np
import pytest

from pretrain.data.blend import _megatron_helpers
from pretrain.data.gpt_dataset import GPTDataset, build_sample_index
from pretrain.data.indexed import IndexedDataset, IndexedDatasetWriter

EOD = 1


def write_shard(path, docs, dtype=np.uint16) -> IndexedDataset:
    """A shard holding ``docs`` (lists of token ids), one sequence per document."""
    writer = IndexedDatasetWriter(path, dtype)
    for doc in docs:
        writer.add_document(np.asarray(doc))
    writer.finalize()
    return IndexedDataset(path)


def random_docs(seed: int, n: int, max_len: int = 40, eod: int | None = EOD) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    docs = [rng.integers(2, 1000, rng.integers(1, max_len)).tolist() for _ in range(n)]
    return [d + [eod] for d in docs] if eod is not None else docs


HAND_DOCS = [[11, 12, 13, EOD], [14, 15, EOD], [16, 17, 18, 19, 20, EOD]]  # 13 tokens back to back


def test_exact_packing_and_masks(tmp_path):
    shard = write_shard(tmp_path / "s", HAND_DOCS)
    ds = GPTDataset(shard, np.arange(3), None, seq_len=4, seed=0, eod_id=EOD, shuffle=False,
                    eod_mask_loss=True, document_masking=True)
    assert len(ds) == 3  # (13 - 1) // 4
    windows = [ds.window(i)[0].tolist() for i in range(3)]
    assert windows == [[11, 12, 13, EOD, 14], [14, 15, EOD, 16, 17], [17, 18, 19, 20, EOD]]
    s = ds[1]
    assert s["input_ids"].tolist() == [14, 15, EOD, 16] and s["labels"].tolist() == [15, EOD, 16, 17]
    assert s["loss_mask"].tolist() == [1, 1, 0, 1]  # the prediction made *from* EOD is masked
    assert s["position_ids"].tolist() == [0, 1, 2, 0] and s["document_ids"].tolist() == [0, 0, 0, 1]
    assert ds[0]["position_ids"].tolist() == [0, 1, 2, 3] and ds[0]["document_ids"].tolist() == [0, 0, 0, 0]
    assert {k: v.dtype for k, v in s.items()} == {"input_ids": np.int64, "labels": np.int64, "loss_mask": np.float32,
                                                   "position_ids": np.int64, "document_ids": np.int64}
    plain = GPTDataset(shard, np.arange(3), None, seq_len=4, seed=0, eod_id=EOD, shuffle=False)[1]
    assert plain["loss_mask"].tolist() == [1, 1, 1, 1] and plain["position_ids"].tolist() == [0, 1, 2, 3]
    assert plain["document_ids"].tolist() == [0, 0, 0, 0]


def test_chunks_without_extra_token(tmp_path):
    shard = write_shard(tmp_path / "s", HAND_DOCS)
    ds = GPTDataset(shard, np.arange(3), None, seq_len=4, seed=0, eod_id=EOD, shuffle=False, extra_token=0)
    assert [ds.window(i)[0].tolist() for i in range(len(ds))] == [[11, 12, 13, EOD], [14, 15, EOD, 16],
                                                                  [17, 18, 19, 20]]


def test_virtual_eod_equals_appended_eod(tmp_path):
    with_eod = random_docs(0, 50)
    a = write_shard(tmp_path / "a", with_eod)
    b = write_shard(tmp_path / "b", [d[:-1] for d in with_eod])
    kw = dict(num_samples=300, seq_len=16, seed=7, eod_id=EOD)
    da, db = GPTDataset(a, np.arange(50), **kw), GPTDataset(b, np.arange(50), add_eod=True, **kw)
    assert len(da) == len(db) >= 300
    for i in range(len(da)):
        np.testing.assert_array_equal(da.window(i)[0], db.window(i)[0])


def test_epochs_cover_requested_samples(tmp_path):
    docs = random_docs(1, 20)
    shard = write_shard(tmp_path / "s", docs)
    flat = np.concatenate(docs)
    want = 3 * (len(flat) // 8) + 5
    ds = GPTDataset(shard, np.arange(20), want, seq_len=8, seed=0, eod_id=EOD, shuffle=False)
    assert len(ds) >= want and (ds.num_epochs - 1) * len(flat) < want * 8 + 1  # the fewest epochs that suffice
    assert ds.num_epochs == 4
    stream = np.tile(flat, ds.num_epochs)
    for i in range(len(ds)):
        np.testing.assert_array_equal(ds.window(i)[0], stream[i * 8:i * 8 + 9])


def test_document_subset_only(tmp_path):
    docs = [[d + 10] * 7 + [EOD] for d in range(30)]  # every token of document d is d + 10
    shard = write_shard(tmp_path / "s", docs)
    ds = GPTDataset(shard, np.arange(10, 20), 40, seq_len=8, seed=3, eod_id=EOD)
    seen = set(np.concatenate([ds.window(i)[0] for i in range(len(ds))]).tolist()) - {EOD}
    assert seen == set(range(20, 30))


def _build_in_child(prefix, cache_dir, queue):
    ds = GPTDataset(IndexedDataset(prefix), np.arange(200), 2000, seq_len=32, seed=5, eod_id=EOD, cache_dir=cache_dir)
    queue.put(np.asarray(ds.shuffle_index).tolist())


def test_index_cache_built_once_and_reused(tmp_path):
    shard = write_shard(tmp_path / "s", random_docs(2, 200))
    cache = tmp_path / "cache"
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(str(tmp_path / "s"), cache, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1]
    npy = sorted(cache.glob("*.npy"))
    assert len(npy) == 3 and not list(cache.glob("*.tmp*"))  # one set of indices, no leftovers
    mtimes = [f.stat().st_mtime_ns for f in npy]

    ds = GPTDataset(shard, np.arange(200), 2000, seq_len=32, seed=5, eod_id=EOD, cache_dir=cache)
    assert isinstance(ds.sample_index, np.memmap) and isinstance(ds.shuffle_index, np.memmap)
    assert [f.stat().st_mtime_ns for f in npy] == mtimes  # reused, not rebuilt
    assert np.asarray(ds.shuffle_index).tolist() == results[0]
    fresh = GPTDataset(shard, np.arange(200), 2000, seq_len=32, seed=5, eod_id=EOD)  # in memory, no cache
    for i in (0, 17, len(ds) - 1):
        np.testing.assert_array_equal(ds[i]["input_ids"], fresh[i]["input_ids"])
    other = GPTDataset(shard, np.arange(200), 2000, seq_len=32, seed=6, eod_id=EOD, cache_dir=cache)
    assert len(list(cache.glob("*.npy"))) == 6  # another seed is another cache entry ...
    assert not np.array_equal(other.shuffle_index, ds.shuffle_index)  # ... and another order


def test_bad_arguments_name_the_shard(tmp_path):
    shard = write_shard(tmp_path / "s", HAND_DOCS)
    with pytest.raises(ValueError, match="s: document ids outside"):
        GPTDataset(shard, np.arange(5), None, seq_len=4, seed=0, eod_id=EOD)
    with pytest.raises(ValueError, match="too few"):
        GPTDataset(shard, np.arange(3), None, seq_len=64, seed=0, eod_id=EOD)
    with pytest.raises(IndexError):
        GPTDataset(shard, np.arange(3), None, seq_len=4, seed=0, eod_id=EOD)[3]


def test_sample_index_equals_megatron_helper():
    helpers = _megatron_helpers()
    if helpers is None:
        pytest.skip("megatron-core not installed")
    rng = np.random.default_rng(0)
    for trial in range(200):
        sizes = rng.integers(trial % 2, 30, rng.integers(1, 40)).astype(np.int32)  # odd trials: empty documents
        epochs = int(rng.integers(1, 4))
        doc_index = np.tile(np.arange(len(sizes), dtype=np.int32), epochs)
        rng.shuffle(doc_index)
        seq_len = int(rng.integers(2, 20))
        for extra in (0, 1):
            if epochs * int(sizes.sum()) - extra < seq_len or sizes.sum() < 2:
                continue
            ref = helpers.build_sample_idx_int64(sizes, doc_index, seq_len, epochs, int(sizes.sum()), True, extra)
            np.testing.assert_array_equal(build_sample_index(sizes, doc_index, seq_len, extra), ref)


@pytest.mark.parametrize("num_samples", [None, 115, 130])  # 1 epoch; 2 epochs; 3, the short last one apart
def test_same_samples_as_megatron_gpt_dataset(tmp_path, num_samples):
    pytest.importorskip("megatron.core")
    from megatron.core.datasets.gpt_dataset import GPTDataset as MegatronGPTDataset
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexed
    from megatron.core.datasets.utils import Split

    shard = write_shard(tmp_path / "s", random_docs(3, 120))
    train = np.arange(0, 100, dtype=np.int32)
    tok = types.SimpleNamespace(vocab_size=1000, eod=EOD, eos=EOD, pad=0, unique_identifiers={"class": "T"})
    cfg = GPTDatasetConfig(random_seed=1234, sequence_length=32, split="1", path_to_cache=str(tmp_path / "mcache"),
                           tokenizer=tok, reset_position_ids=True, reset_attention_mask=False, eod_mask_loss=True,
                           create_attention_mask=False)
    ref = MegatronGPTDataset(MegatronIndexed(str(tmp_path / "s")), str(tmp_path / "s"), train, num_samples,
                             Split.train, cfg)
    ours = GPTDataset(shard, train, num_samples, seq_len=32, seed=1234, eod_id=EOD, eod_mask_loss=True,
                      document_masking=True, cache_dir=tmp_path / "cache")
    assert len(ours) == len(ref)
    for i in range(len(ref)):
        r, o = ref[i], ours[i]
        np.testing.assert_array_equal(o["input_ids"], r["tokens"].numpy())
        np.testing.assert_array_equal(o["labels"], r["labels"].numpy())
        np.testing.assert_array_equal(o["loss_mask"], r["loss_mask"].numpy())
        np.testing.assert_array_equal(o["position_ids"], r["position_ids"].numpy())
