"""data/segment_cache.py: the key cutting and the memoized encoding equal plain sentencepiece, byte for byte."""

from __future__ import annotations

import json
from collections import Counter
import subprocess
import sys

import numpy as np
import pytest

from pretrain.data.segment_cache import SegmentCache, split_keys, supports
from pretrain.data.tokenizer import load_tokenizer, text_lines, train_sentencepiece

EDGE = ["", " ", "   ", "a", " a", "  a  ", "a  \n", "a \n b", "\n", "x\u2581 y \u2581", "foo  bar  ", "\t a\t b ",
        "é 😀  ü", "12 345", "a<extra_id_3> b", " \n ", "end ", "a b", "a\nb  c", "<s> </s> <pad>",
        "\u2581", "a\u2581", "\u2581\u2581b", "—x"]


def _finest(text: str) -> list[str]:
    """The finest exact cut (see the module doc), written the slow way: the oracle for split_keys."""
    s = " " + text
    cuts = [i for i in range(1, len(s.rstrip(" ")))  # trailing spaces stay with the last key
            if (s[i] == " " and s[i - 1] != " ") or (s[i - 1] == "\n" and s[i] not in " \n")]
    bounds = [0, *cuts, len(s)]
    return [s[a:b] for a, b in zip(bounds, bounds[1:])]


def _keys(texts: list[str]) -> list[list[str]]:
    buf, bounds, first = split_keys(texts)
    keys = [buf[a:b].decode("utf-8") for a, b in zip(bounds[:-1], bounds[1:])]
    return [keys[a:b] for a, b in zip(first, list(first[1:]) + [len(keys)])]


def _random_texts(rng: np.random.Generator, words: list[str], n: int) -> list[str]:
    """Texts mixing real words with the cases that matter: space runs, edges, ▁, newlines, tabs, bytes."""
    parts = words + [" ", "  ", "   ", "\n", "\t", "\u2581", "é", "😀", "—", "<extra_id_3>", "7", "\u3000"]
    out = []
    for _ in range(n):
        k = int(rng.integers(0, 12))
        text = "".join(parts[i] if rng.random() < 0.3 else parts[i] + " " for i in rng.integers(0, len(parts), k))
        out.append(" " * int(rng.integers(0, 3)) * (rng.random() < 0.3) + text)
    return out


def test_split_keys_cover_the_texts_and_cut_finest():
    for texts in (EDGE, EDGE[::-1], ["a "] + [" b"], ["x  ", "  y z"], ["only"], ["a\n\nb\n c\n", "\nx"]):
        for text, keys in zip(texts, _keys(texts), strict=True):
            assert "".join(keys)[1:] == text  # the first key carries one space in front
            assert keys == ([" " + text] if "\u2581" in text else _finest(text))
    assert _keys(["ab\ncd ef\n\n  gh"]) == [[" ab\n", "cd", " ef\n\n", "  gh"]]


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_segment_cache_is_exact(tiny_corpus, tiny_tokenizer, tmp_path, model_type):
    texts = [json.loads(line)["text"] for _, line in zip(range(80), open(tiny_corpus, encoding="utf-8"))]
    if model_type == "bpe":
        tok = tiny_tokenizer
    else:
        tok = train_sentencepiece(text_lines(texts[:40]), tmp_path, 600, model_type="unigram", num_threads=1,
                                  verbose=False)
    assert (tok._cache is not None) == (model_type == "bpe")  # unigram: ties make segment-wise inexact
    if tok._cache is None:
        assert [a.tolist() for a in tok.encode_batch(texts)] == [tok.sp.encode(t) for t in texts]
        return
    tok._cache.max_segments = 5000  # also exercise clearing between batches
    batch = texts + EDGE
    plain = tok._encode_plain(batch)
    for start in range(0, len(batch), 37):
        got = tok.encode_batch(batch[start:start + 37])
        assert [g.tolist() for g in got] == [p.tolist() for p in plain[start:start + 37]]
    flat, lengths = tok.encode_flat(batch)
    assert lengths.tolist() == [len(p) for p in plain] and flat.tolist() == np.concatenate(plain).tolist()


def test_segment_cache_is_exact_on_random_texts(tiny_corpus, tiny_tokenizer):
    """Random neighbours: trailing spaces before leading ones, ▁ texts, empty texts, one-key batches."""
    rng = np.random.default_rng(0)
    words = sorted({w for line in open(tiny_corpus, encoding="utf-8") for w in json.loads(line)["text"].split()})
    words = [words[i] for i in rng.integers(0, len(words), 300)]
    tok = load_tokenizer(tiny_tokenizer.path)
    tok._cache.max_segments = 400
    texts = _random_texts(rng, words, 1500)
    batches = [texts[i:i + n] for i, n in zip(range(0, 1500, 50), rng.integers(1, 50, 30))]
    batches += [["same same same"], ["x"], [""]]
    for batch in batches:
        flat, lengths = tok.encode_flat(batch)
        plain = [tok.sp.encode(t) for t in batch]
        assert lengths.tolist() == [len(p) for p in plain], batch
        assert flat.tolist() == [i for p in plain for i in p], batch
    assert tok.encode_flat([])[0].size == 0


def test_newline_cuts_exact_for_models_trained_on_documents(tiny_corpus, tmp_path):
    """Trained on whole documents, BPE learns pieces such as ".\\n"; keys after a newline must still be exact."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    texts = [json.loads(line)["text"] for _, line in zip(range(60), open(tiny_corpus, encoding="utf-8"))]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(tmp_path / "docs"),
                                   vocab_size=600, model_type="bpe", normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, byte_fallback=True, max_sentence_length=1 << 20,
                                   minloglevel=2)
    tok = load_tokenizer(tmp_path / "docs.model")
    assert any(p.endswith("\n") and p != "\n" for p in map(tok.sp.id_to_piece, range(tok.vocab_size)))
    assert tok._cache is not None
    batch = texts + EDGE + ["a.\nb.\n\nc", "\n\nx\ny", ".\n.\n"]
    flat, lengths = tok.encode_flat(batch)
    plain = [tok.sp.encode(t) for t in batch]
    assert lengths.tolist() == [len(p) for p in plain] and flat.tolist() == [i for p in plain for i in p]

    model = pb.ModelProto()
    model.ParseFromString((tmp_path / "docs.model").read_bytes())
    assert supports(model.SerializeToString())
    model.pieces[-1].piece = "\nthe"  # a piece that would merge across a newline cut
    assert not supports(model.SerializeToString())


def test_eviction_keeps_frequent_segments(tiny_tokenizer):
    """A full cache drops the words seen once and keeps the common ones: those are never encoded again."""
    encoded = Counter()

    def encode_many(keys: list[bytes]) -> list[list[int]]:
        encoded.update(keys)
        return tiny_tokenizer.sp.encode(keys)

    cache = SegmentCache(encode_many, max_segments=400)
    encoded.clear()  # the cache encodes "\n" once, to know its tokens
    for batch in range(40):  # 3 common words and 50 new ones per batch: evicts every few batches
        texts = [f"the cat {batch}x{i} sat" for i in range(50)]
        flat, lengths = cache.encode_flat(texts)
        plain = [tiny_tokenizer.sp.encode(t) for t in texts]
        assert lengths.tolist() == [len(p) for p in plain] and flat.tolist() == [i for p in plain for i in p]
        assert len(cache._index) <= 400 + 53
    assert len(encoded) == 40 * 50 + 3 and sum(encoded.values()) == len(encoded)  # each word encoded once
    assert cache._index.keys() >= {b" the", b" cat", b" sat"}


def test_segment_cache_off_for_normalizing_models(tiny_corpus, tmp_path):
    import sentencepiece as spm

    texts = [json.loads(line)["text"] for _, line in zip(range(30), open(tiny_corpus, encoding="utf-8"))]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(tmp_path / "nfkc"),
                                   vocab_size=300, minloglevel=2)  # default nmt_nfkc, collapses whitespace
    tok = load_tokenizer(tmp_path / "nfkc.model")
    assert tok._cache is None
    assert [a.tolist() for a in tok.encode_batch(EDGE)] == [tok.sp.encode(t) for t in EDGE]


def test_encoding_does_not_import_pandas(tiny_tokenizer):
    """pyarrow's to_numpy() imports pandas: 0.5 s and ~50 MB in every `pretrain prepare` worker."""
    code = (f"import sys; from pretrain.data.tokenizer import load_tokenizer; "
            f"tok = load_tokenizer({tiny_tokenizer.path!r}); "
            "flat, lengths = tok.encode_flat(['a b', 'c  d ']); "
            "assert tok._cache is not None and lengths.sum() == len(flat) > 0; print('pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
