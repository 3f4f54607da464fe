"""One tokenizer interface over sentencepiece ``.model`` files and HF ``tokenizer.json`` files.

The shards, the datasets and the models only ever see :class:`Tokenizer`: ``encode``, ``encode_batch``
(all threads, int32 numpy output, which avoids millions of Python ints), ``decode``, ``vocab_size``, the
special ids, and ``identity``: a hash of the model's content, stored with every shard so a mismatching
tokenizer is caught before training (see ``pretrain.data.metadata.verify_tokenizer``).

:func:`train_sentencepiece` trains the project's own tokenizers and writes ``DIR/tokenizer.model`` plus
``DIR/tokenizer_meta.json`` (not ``tokenizer.json``: that name belongs to HF tokenizer files).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from pretrain.data import segment_cache

SP_MODEL = "tokenizer.model"
META_FILE = "tokenizer_meta.json"
HF_FILE = "tokenizer.json"
NUM_SENTINELS = 100
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
MASK_TOKEN = "<mask>"  # added by train_sentencepiece(mask_token=True), found by pretrain.data.mlm_dataset


def sentinel_token(i: int) -> str:
    """T5's i-th span sentinel, ``<extra_id_i>``."""
    return f"<extra_id_{i}>"


class Tokenizer:
    """Common interface; build one with :func:`load_tokenizer`."""

    kind: str
    path: str
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None

    @property
    def eod_id(self) -> int | None:
        """End-of-document id appended between packed documents (the EOS token)."""
        return self.eos_id

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def identity(self) -> str:
        """sha256 of the model's content: equal for the same tokenizer wherever its file lives."""
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Encode many texts on all of ``num_threads`` threads; one int32 array per text."""
        raise NotImplementedError

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``encode_batch`` back to back: one int32 array of all ids and the number of ids of each text."""
        arrays = self.encode_batch(texts)
        lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
        return (np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int32)), lengths

    def decode(self, ids) -> str:
        raise NotImplementedError

    @property
    def sentinel_ids(self) -> list[int]:
        """Ids of ``<extra_id_0..99>`` (T5 span corruption); empty when the vocabulary has none."""
        ids = [self.token_to_id(sentinel_token(i)) for i in range(NUM_SENTINELS)]
        return [] if None in ids else ids

    def describe(self) -> dict:
        """What shard metadata records about this tokenizer."""
        return {"kind": self.kind, "path": self.path, "identity": self.identity, "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "eod_id": self.eod_id, "pad_id": self.pad_id}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer(Tokenizer):
    """Batch encoding memoizes segments when that is exact for the model (``data/segment_cache.py``)."""

    kind = "sentencepiece"

    def __init__(self, path: str | Path, num_threads: int = -1):
        self.path = str(path)
        self.num_threads = num_threads
        self._proto = Path(path).read_bytes()
        self._identity = hashlib.sha256(self._proto).hexdigest()
        self._cacheable = segment_cache.supports(self._proto)
        self._load()
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = (
            i if i >= 0 else None for i in (self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id(), self.sp.unk_id()))

    def _load(self) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self._cache = segment_cache.SegmentCache(self._encode_lists) if self._cacheable else None

    def __getstate__(self):  # picklable for worker processes: ship the model bytes, rebuild the rest
        return {k: v for k, v in self.__dict__.items() if k not in ("sp", "_cache")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._load()

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    @property
    def identity(self) -> str:
        return self._identity

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def _encode_plain(self, texts: list[str]) -> list[np.ndarray]:
        return self.sp.encode(texts, out_type="numpy", num_threads=self.num_threads)

    def _encode_lists(self, texts: list[str] | list[bytes]) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=self.num_threads)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        if self._cache is None:
            return self._encode_plain(texts)
        flat, lengths = self._cache.encode_flat(texts)
        return np.split(flat, np.cumsum(lengths)[:-1])

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return self._cache.encode_flat(texts) if self._cache is not None else super().encode_flat(texts)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


# Special-token spellings of common HF tokenizers, first match wins.
_HF_SPECIALS = {
    "bos_id": ("<s>", "<|begin_of_text|>", "<bos>", "[CLS]", "<|endoftext|>"),
    "eos_id": ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "[SEP]"),
    "pad_id": ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>"),
    "unk_id": ("<unk>", "[UNK]"),
}


class HFTokenizer(Tokenizer):
    """A ``tokenizers`` ``tokenizer.json``; special ids are found by their usual spellings."""

    kind = "hf"

    def __init__(self, path: str | Path, num_threads: int = -1):
        from tokenizers import Tokenizer as RustTokenizer

        self.path = str(path)
        self.num_threads = num_threads
        self._json = Path(path).read_text(encoding="utf-8")
        self.tok = RustTokenizer.from_str(self._json)
        canonical = json.dumps(json.loads(self._json), sort_keys=True, separators=(",", ":"))
        self._identity = hashlib.sha256(canonical.encode()).hexdigest()
        for attr, names in _HF_SPECIALS.items():
            setattr(self, attr, next((i for i in map(self.tok.token_to_id, names) if i is not None), None))

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "tok"}

    def __setstate__(self, state):
        from tokenizers import Tokenizer as RustTokenizer

        self.__dict__.update(state)
        self.tok = RustTokenizer.from_str(self._json)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def identity(self) -> str:
        return self._identity

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        # Rayon reads its thread count once per process; a single thread means: do not fan out.
        if self.num_threads == 1:
            return [np.asarray(self.tok.encode(t, add_special_tokens=False).ids, dtype=np.int32) for t in texts]
        encs = self.tok.encode_batch_fast(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encs]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(path: str | Path, num_threads: int = -1) -> Tokenizer:
    """A sentencepiece ``.model``, an HF ``tokenizer.json``, or a directory holding one of them."""
    p = Path(path)
    if p.is_dir():
        for name in (SP_MODEL, HF_FILE):
            if (p / name).exists():
                return load_tokenizer(p / name, num_threads)
        raise FileNotFoundError(f"{p}: no {SP_MODEL} or {HF_FILE} in this directory")
    if not p.exists():
        raise FileNotFoundError(f"{p}: tokenizer file not found")
    if p.suffix == ".json":
        return HFTokenizer(p, num_threads)
    return SentencePieceTokenizer(p, num_threads)


def train_sentencepiece(sentences: Iterable[str], output_dir: str | Path, vocab_size: int,
                        model_type: str = "bpe", t5_sentinels: bool = False, mask_token: bool = False,
                        num_threads: int | None = None,
                        max_sentences: int = 2_000_000, verbose: bool = True, inputs: list[str] | None = None
                        ) -> SentencePieceTokenizer:
    """Train a byte-fallback sentencepiece model; writes ``tokenizer.model`` and ``tokenizer_meta.json``.

    Ids 0-3 are unk, bos, eos (= eod) and pad; with ``t5_sentinels`` ids 4-103 are ``<extra_id_0..99>``; with
    ``mask_token`` the next id is ``<mask>`` (masked language modelling: bos/eos frame samples as RoBERTa's <s>/</s>).
    Text is not normalized (whitespace and newlines survive a round trip; unseen characters become bytes),
    and digits are split, as in Llama's tokenizer.
    ``sentences`` are the training lines; at most ``max_sentences`` of them are sampled (sentencepiece
    holds them all in memory). With ``verbose`` sentencepiece logs its progress to stderr.
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', not {model_type!r}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size, model_type=model_type,
        byte_fallback=True, character_coverage=0.9995, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", pad_piece="<pad>",
        user_defined_symbols=([sentinel_token(i) for i in range(NUM_SENTINELS)] if t5_sentinels else [])
        + ([MASK_TOKEN] if mask_token else []),
        input_sentence_size=max_sentences, shuffle_input_sentence=True, max_sentence_length=16384,
        num_threads=num_threads or os.cpu_count() or 1, hard_vocab_limit=False, minloglevel=0 if verbose else 2)
    _atomic_write(out / SP_MODEL, model.getvalue())
    tok = SentencePieceTokenizer(out / SP_MODEL)
    meta = {**tok.describe(), "path": SP_MODEL, "model_type": model_type, "t5_sentinels": t5_sentinels,
            "unk_id": tok.unk_id, "byte_fallback": True, "inputs": inputs or []}
    _atomic_write(out / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())
    return tok


def text_lines(texts: Iterable[str]) -> Iterator[str]:
    """The non-empty lines of documents: sentencepiece trains on lines, not whole documents."""
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                yield line


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
