"""Bad shards and bad ``prepare`` input are caught up front, naming the file (issue 13, items 8, 17, 18, 19).

* a corrupt ``.idx`` (pointers, lengths, document index) fails when the shard is opened;
* token ids outside the tokenizer's vocabulary fail when training first uses the shard, naming the document;
* ``prepare`` refuses an empty corpus, explains malformed JSON, and rejects ``--workers`` below 1 (exit 2).
"""

from __future__ import annotations

import shutil
import struct

import numpy as np
import pytest

from pretrain.cli import main
from pretrain.data.corpus import CorpusError
from pretrain.data.indexed import MAGIC, IndexedDataset, IndexedDatasetWriter, ShardError
from pretrain.data.loader import build_train_valid_datasets
from pretrain.data.prepare import prepare

_HEAD = len(MAGIC) + struct.calcsize("<QBQQ")


def _shard(prefix, lengths=(5, 9, 3, 7, 4)) -> None:
    rng = np.random.default_rng(0)
    w = IndexedDatasetWriter(prefix, np.uint16)
    for n in lengths:
        w.add_document(rng.integers(0, 1000, size=n))
    w.finalize()


def _rewrite_index(prefix, change) -> None:
    """Let ``change(lengths, pointers, docs)`` edit the index arrays in place, keeping the header and sizes."""
    path = f"{prefix}.idx"
    raw = bytearray(open(path, "rb").read())
    _, _, n_seq, n_doc = struct.unpack("<QBQQ", raw[len(MAGIC):_HEAD])
    lengths = np.frombuffer(raw, np.int32, n_seq, _HEAD).copy()
    pointers = np.frombuffer(raw, np.int64, n_seq, _HEAD + 4 * n_seq).copy()
    docs = np.frombuffer(raw, np.int64, n_doc, _HEAD + 12 * n_seq).copy()
    change(lengths, pointers, docs)
    open(path, "wb").write(bytes(raw[:_HEAD]) + lengths.tobytes() + pointers.tobytes() + docs.tobytes())


def _swap_lengths(lengths, pointers, docs):
    lengths[[1, 2]] = lengths[[2, 1]]  # same total, so the .bin size still matches


def _negative_length(lengths, pointers, docs):
    lengths[1] += lengths[2] + 6
    lengths[2] = -6


def _pointer_shifted(lengths, pointers, docs):
    pointers[2] += 4


def _pointer_past_end(lengths, pointers, docs):
    pointers[-1] = 1 << 40


def _documents_not_monotone(lengths, pointers, docs):
    docs[[1, 2]] = docs[[2, 1]]


@pytest.mark.parametrize("change, message", [
    (_swap_lengths, r"sequence 2 starts at byte 28 but the lengths before it end at byte 16"),
    (_negative_length, r"sequence 2 has negative length -6"),
    (_pointer_shifted, r"sequence 2 starts at byte 32 but the lengths before it end at byte 28"),
    (_pointer_past_end, r"sequence 4 starts at byte 1099511627776 but the lengths before it end at byte 48"),
    (_documents_not_monotone, r"document indices decrease at document 2"),
])
def test_corrupt_index_fails_at_open_naming_the_file(tmp_path, change, message):
    _shard(tmp_path / "s")
    IndexedDataset(tmp_path / "s")  # the intact shard opens
    _rewrite_index(tmp_path / "s", change)
    with pytest.raises(ShardError, match=r"s\.idx: .*" + message + r".*rerun `pretrain prepare`"):
        IndexedDataset(tmp_path / "s")


def _copy_shard(src: str, dst) -> str:
    for ext in (".bin", ".idx", ".json"):
        shutil.copy(src + ext, f"{dst}{ext}")
    return str(dst)


def _data_config(prefix: str, tokenizer) -> dict:
    return {"train": [prefix], "tokenizer": tokenizer.path, "seq_length": 32, "split": "100,0,0", "seed": 1,
            "cache_dir": None}


def test_token_ids_outside_the_vocabulary_fail_when_the_shard_is_first_used(tiny_shard_prefix, tiny_tokenizer,
                                                                            tmp_path):
    prefix = _copy_shard(tiny_shard_prefix, tmp_path / "s")
    shard = IndexedDataset(prefix)
    train, _ = build_train_valid_datasets(_data_config(prefix, tiny_tokenizer), "gpt", 64, tokenizer=tiny_tokenizer)
    assert len(train) >= 64  # the intact copy is fine
    doc = 45
    position = int(shard.sequence_pointers[doc]) // 2 + 3
    del shard
    tokens = np.memmap(f"{prefix}.bin", dtype=np.uint16, mode="r+")
    tokens[position] = 65000  # vocabulary is 1,000
    tokens.flush()
    del tokens
    expected = (r"s\.bin: token id 65000 \(document 45\) is outside the tokenizer's vocabulary of 1,000 ids"
                r" \(.*tokenizer\.model\)")
    for kind in ("gpt", "t5"):
        with pytest.raises(ShardError, match=expected):
            build_train_valid_datasets(_data_config(prefix, tiny_tokenizer), kind, 64, tokenizer=tiny_tokenizer)
    (tmp_path / "s.json").unlink()  # a shard without metadata (e.g. Megatron's) is checked all the same
    with pytest.raises(ShardError, match=expected):
        build_train_valid_datasets(_data_config(prefix, tiny_tokenizer), "gpt", 64, tokenizer=tiny_tokenizer)


def _prepare_cli(tmp_path, tokenizer, *extra: str) -> int:
    return main(["prepare", "--input", str(tmp_path / "c.jsonl"), "--tokenizer", tokenizer.path,
                 "--output", str(tmp_path / "out" / "s"), "--no-progress", *extra])


@pytest.mark.parametrize("content", [b"", b"\n\n", b'{"text": "  "}\n{"title": "no text"}\n'],
                         ids=["empty", "blank-lines", "only-bad-records"])
def test_prepare_refuses_an_empty_corpus(tiny_tokenizer, tmp_path, capsys, content):
    (tmp_path / "c.jsonl").write_bytes(content)
    with pytest.raises(CorpusError, match=r"c\.jsonl: no documents"):
        prepare([str(tmp_path / "c.jsonl")], tiny_tokenizer.path, tmp_path / "out" / "s", progress=False)
    capsys.readouterr()
    assert _prepare_cli(tmp_path, tiny_tokenizer, "--workers", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "c.jsonl: no documents" in err[0], err
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []  # no 0-document shard


def test_strict_malformed_json_says_what_is_wrong(tiny_tokenizer, tmp_path):
    (tmp_path / "c.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "tab\there"}\n{"text": "broken\n')
    with pytest.raises(CorpusError) as err:
        prepare([str(tmp_path / "c.jsonl")], tiny_tokenizer.path, tmp_path / "o", strict=True, progress=False)
    message = str(err.value)
    assert "at at" not in message
    assert message.startswith(f"{tmp_path / 'c.jsonl'}:2: bad_json: ")
    assert "unescaped control character U+0009 (tab) inside a string at column 14" in message
    assert r"escape it as \t" in message
    (tmp_path / "c.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "broken\n')
    with pytest.raises(CorpusError, match=r"c\.jsonl:2: bad_json: unterminated string starting at column 10 "
                                          r"\(near '\{\"text\": \"broken'\)"):
        prepare([str(tmp_path / "c.jsonl")], tiny_tokenizer.path, tmp_path / "o", strict=True, progress=False)


@pytest.mark.parametrize("workers", ["0", "-3"])
def test_prepare_rejects_workers_below_one(tiny_tokenizer, tmp_path, capsys, workers):
    (tmp_path / "c.jsonl").write_text('{"text": "a document"}\n')
    assert _prepare_cli(tmp_path, tiny_tokenizer, "--workers", workers) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --workers must be at least 1 (got {workers}); use --workers 1 for one process"]
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="workers must be at least 1"):
        prepare([str(tmp_path / "c.jsonl")], tiny_tokenizer.path, tmp_path / "out" / "s", workers=int(workers),
                progress=False)
