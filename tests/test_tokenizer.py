"""The Tokenizer interface over sentencepiece and HF tokenizer.json, training, identity hashes, the CLI."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from pretrain.data.tokenizer import META_FILE, SP_MODEL, load_tokenizer, train_sentencepiece
from pretrain.cli import main

SAMPLES = ["Hello  world,\n\n  indented line 12345\tTab", "Naïve café — 😀 ünïcödé", "", " leading space",
           "x\n"]


def test_sentencepiece_specials_sentinels_and_round_trip(tiny_tokenizer):
    tok = tiny_tokenizer
    assert tok.kind == "sentencepiece" and tok.vocab_size == 1000
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.eod_id, tok.pad_id) == (0, 1, 2, 2, 3)
    assert tok.sentinel_ids == list(range(4, 104))
    assert 11 in tok.encode("a <extra_id_7> b")  # user-defined symbols are never split
    for text in SAMPLES:  # identity normalization + byte fallback: every string survives exactly
        assert tok.decode(tok.encode(text)) == text
    batch = tok.encode_batch(SAMPLES)
    assert all(a.dtype == np.int32 for a in batch)
    assert [a.tolist() for a in batch] == [tok.encode(t) for t in SAMPLES]
    assert "12345" not in "".join(tok.sp.id_to_piece(i) for i in tok.encode("12345"))  # digits split


def test_identity_is_content_based(tiny_tokenizer, tmp_path):
    copy = tmp_path / "elsewhere.model"
    shutil.copy(tiny_tokenizer.path, copy)
    assert load_tokenizer(copy).identity == tiny_tokenizer.identity
    shutil.copy(tiny_tokenizer.path, tmp_path / SP_MODEL)
    assert load_tokenizer(tmp_path).identity == tiny_tokenizer.identity  # a directory holding tokenizer.model
    clone = pickle.loads(pickle.dumps(tiny_tokenizer))
    assert clone.identity == tiny_tokenizer.identity and clone.encode("to be") == tiny_tokenizer.encode("to be")
    other = train_sentencepiece(["to be or not to be", "that is the question"] * 50, tmp_path / "other", 300,
                                num_threads=1, verbose=False)
    assert other.identity != tiny_tokenizer.identity


def test_train_writes_model_and_metadata(tiny_tokenizer):
    meta = json.loads((Path(tiny_tokenizer.path).parent / META_FILE).read_text())
    assert meta["identity"] == tiny_tokenizer.identity and meta["vocab_size"] == 1000
    assert meta["t5_sentinels"] is True and meta["byte_fallback"] is True and meta["model_type"] == "bpe"
    with pytest.raises(ValueError, match="model_type"):
        train_sentencepiece(["a"], Path(tiny_tokenizer.path).parent / "x", 100, model_type="wordpiece")


def _hf_tokenizer_json(path, lines):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer)
    tok.save(str(path))


def test_hf_tokenizer_json(tiny_corpus, tmp_path):
    lines = [json.loads(line)["text"] for line in open(tiny_corpus, encoding="utf-8")][:50]
    _hf_tokenizer_json(tmp_path / "tokenizer.json", lines)
    tok = load_tokenizer(tmp_path)  # a directory holding tokenizer.json
    assert tok.kind == "hf" and tok.vocab_size == 400
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    for text in SAMPLES:
        assert tok.decode(tok.encode(text)) == text
    assert [a.tolist() for a in tok.encode_batch(SAMPLES)] == [tok.encode(t) for t in SAMPLES]
    tok.num_threads = 1
    assert [a.tolist() for a in tok.encode_batch(SAMPLES)] == [tok.encode(t) for t in SAMPLES]
    # Re-serializing the same tokenizer with other formatting keeps the identity.
    (tmp_path / "re").mkdir()
    (tmp_path / "re" / "tokenizer.json").write_text(json.dumps(json.loads((tmp_path / "tokenizer.json").read_text())))
    assert load_tokenizer(tmp_path / "re" / "tokenizer.json").identity == tok.identity
    assert pickle.loads(pickle.dumps(tok)).encode("abc") == tok.encode("abc")


def test_missing_tokenizer_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.model"):
        load_tokenizer(tmp_path / "nothing.model")
    with pytest.raises(FileNotFoundError, match="no tokenizer.model or tokenizer.json"):
        load_tokenizer(tmp_path)


def test_tokenizer_cli_unigram(tiny_corpus, tmp_path, capsys):
    txt = tmp_path / "small.txt"
    with open(tiny_corpus, encoding="utf-8") as f:
        txt.write_text("\n".join(json.loads(line)["text"] for _, line in zip(range(40), f)), encoding="utf-8")
    rc = main(["tokenizer", "--input", str(tmp_path / "*.txt"), "--vocab-size", "400", "--model-type", "unigram",
               "--output", str(tmp_path / "uni"), "--quiet"])
    assert rc == 0
    tok = load_tokenizer(tmp_path / "uni")
    meta = json.loads((tmp_path / "uni" / META_FILE).read_text())
    assert meta["model_type"] == "unigram" and meta["t5_sentinels"] is False and tok.sentinel_ids == []
    assert tok.vocab_size == 400 and tok.decode(tok.encode("Thou art")) == "Thou art"
    assert main(["tokenizer", "--input", str(tmp_path / "missing*.txt"), "--vocab-size", "400",
                 "--output", str(tmp_path / "x"), "--quiet"]) == 1
    assert "missing*.txt" in capsys.readouterr().err
