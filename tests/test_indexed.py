"""MMIDIDX shards: round trip, byte compatibility with megatron-core in both directions, corruption errors."""

from __future__ import annotations

import numpy as np
import pytest

from pretrain.data.indexed import IndexedDataset, IndexedDatasetWriter, ShardError, merge_shards


def _docs(seed: int, n: int = 30, vocab: int = 60000) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=rng.integers(0, 50)) for _ in range(n)]


def _write(prefix, docs, dtype=np.uint16) -> None:
    w = IndexedDatasetWriter(prefix, dtype)
    w.add_document(docs[0])
    lengths = [len(d) for d in docs[1:]]
    w.add_documents(np.concatenate(docs[1:]), np.array(lengths))
    w.finalize()


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_round_trip(tmp_path, dtype):
    docs = _docs(0)
    _write(tmp_path / "a", docs, dtype)
    ds = IndexedDataset(tmp_path / "a")
    assert len(ds) == len(docs) and ds.dtype == np.dtype(dtype)
    assert ds.num_tokens == sum(len(d) for d in docs)
    for got, want in zip(ds, docs):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(ds.get(3, offset=2, length=4), docs[3][2:6])
    assert not list(tmp_path.glob("*.tmp"))


def test_megatron_reads_ours_and_we_read_megatron(tmp_path):
    torch = pytest.importorskip("torch")
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MIndexedDataset
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    docs = _docs(1)
    _write(tmp_path / "ours", docs)
    theirs = MIndexedDataset(str(tmp_path / "ours"))
    assert len(theirs) == len(docs)
    np.testing.assert_array_equal(theirs.document_indices, np.arange(len(docs) + 1))
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(theirs[i], d)

    # Megatron with sentence splitting: documents of several sequences each.
    builder = IndexedDatasetBuilder(str(tmp_path / "meg.bin"), dtype=np.int32)
    for i in range(0, 30, 3):
        builder.add_document(torch.tensor(np.concatenate(docs[i:i + 3])), [len(d) for d in docs[i:i + 3]])
    builder.finalize(str(tmp_path / "meg.idx"))
    ours = IndexedDataset(tmp_path / "meg")
    assert ours.dtype == np.int32 and len(ours) == 30
    np.testing.assert_array_equal(ours.document_indices, np.arange(0, 31, 3))
    for got, want in zip(ours, docs):
        np.testing.assert_array_equal(got, want)


def test_merge_keeps_documents_and_sequences(tmp_path):
    torch = pytest.importorskip("torch")
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    a, b = _docs(2, 10), _docs(3, 6)
    _write(tmp_path / "a", a)
    builder = IndexedDatasetBuilder(str(tmp_path / "b.bin"), dtype=np.uint16)
    builder.add_document(torch.tensor(np.concatenate(b[:2])), [len(b[0]), len(b[1])])
    for d in b[2:]:
        builder.add_document(torch.tensor(d), [len(d)])
    builder.finalize(str(tmp_path / "b.idx"))
    merged = merge_shards([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    assert len(merged) == 16
    np.testing.assert_array_equal(merged.document_indices, [*range(11), 12, 13, 14, 15, 16])
    for got, want in zip(merged, a + b):
        np.testing.assert_array_equal(got, want)

    _write(tmp_path / "c", a, np.int32)
    with pytest.raises(ShardError, match="c.idx.*dtype"):
        merge_shards([tmp_path / "a", tmp_path / "c"], tmp_path / "bad")


def test_corrupt_and_truncated_shards_name_the_file(tmp_path):
    docs = _docs(4)
    _write(tmp_path / "s", docs)
    bin_file, idx_file = tmp_path / "s.bin", tmp_path / "s.idx"
    good_bin, good_idx = bin_file.read_bytes(), idx_file.read_bytes()

    bin_file.write_bytes(good_bin[:-6])
    with pytest.raises(ShardError, match=r"s\.bin: size .* expects"):
        IndexedDataset(tmp_path / "s")
    bin_file.write_bytes(good_bin)

    idx_file.write_bytes(good_idx[:-8])
    with pytest.raises(ShardError, match=r"s\.idx: truncated"):
        IndexedDataset(tmp_path / "s")
    idx_file.write_bytes(b"NOTANIDX" + good_idx[8:])
    with pytest.raises(ShardError, match=r"s\.idx: not an MMIDIDX"):
        IndexedDataset(tmp_path / "s")
    idx_file.unlink()
    with pytest.raises(ShardError, match=r"s\.idx: file not found"):
        IndexedDataset(tmp_path / "s")


def test_interrupted_writer_leaves_no_shard(tmp_path):
    w = IndexedDatasetWriter(tmp_path / "x")
    w.add_document([1, 2, 3])
    w.abort()
    assert list(tmp_path.iterdir()) == []
