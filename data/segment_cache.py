"""Exact memoized sentencepiece encoding: encode each distinct whitespace-delimited segment once.

Why it is exact: sentencepiece BPE merges only ever join adjacent symbols into a piece of the vocabulary,
highest score first, ties to the leftmost pair (so merge order inside a segment does not depend on what
surrounds it). When every piece has the form ``▁*X`` (a run of ``▁`` only at its start, which is
what training with ``split_by_whitespace`` produces), no piece can span a position where a non-space
character is followed by a space. The encoding of a text is then the concatenation of the encodings of its
segments cut at those positions, each encoded on its own. With the identity normalizer and a dummy prefix,
the segment `` foo`` (space included) normalizes to ``▁foo``, exactly what ``encode("foo")`` sees, so
segment ``i > 0`` is looked up under its text minus the first space, and the first segment as it is.

:func:`supports` checks these properties on the model proto; models that do not have them (other
normalizers, collapsed whitespace, whitespace-as-suffix, pieces with inner ``▁``) are encoded plainly, and
so are unigram models: their Viterbi search breaks ties between equal-score paths differently in context. Texts
containing ``▁`` themselves are encoded whole. Natural text is Zipfian, so after a few MB almost every
segment is a hit and the C++ encoder only sees new words.
"""

from __future__ import annotations

import re
from collections import defaultdict
from itertools import chain, islice

import numpy as np

SPACE_SYMBOL = "\u2581"
# Segment keys: the first segment whole (leading spaces included), later ones without the space that
# separates them; trailing spaces stay with the last segment. \Z, not $: $ also matches before a final "\n".
_SEGMENT = re.compile(r"(?:^| )( *[^ ]+(?: +\Z)?)")
_PIECE_FORM = re.compile(f"^{SPACE_SYMBOL}*[^{SPACE_SYMBOL}]*$")


def supports(model_proto: bytes) -> bool:
    """True when the model's normalizer and pieces make segment-wise encoding exact (see module doc)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(model_proto)
    n, t = m.normalizer_spec, m.trainer_spec
    if (n.name != "identity" or n.precompiled_charsmap or not n.add_dummy_prefix or n.remove_extra_whitespaces
            or not n.escape_whitespaces or t.treat_whitespace_as_suffix
            or t.model_type != pb.TrainerSpec.BPE):
        return False
    text_types = (pb.ModelProto.SentencePiece.NORMAL, pb.ModelProto.SentencePiece.USER_DEFINED,
                  pb.ModelProto.SentencePiece.UNUSED)
    return all(_PIECE_FORM.match(p.piece) for p in m.pieces if p.type in text_types)


def segment_keys(text: str) -> list[str]:
    """Cache keys of ``text``; ``encode(text) == concat(encode(k) for k in segment_keys(text))``."""
    if SPACE_SYMBOL in text:
        return [text]
    if "  " not in text and not text.startswith(" ") and not text.endswith(" "):
        return text.split(" ")  # single spaces only: the same keys, much faster than the regex
    keys = _SEGMENT.findall(text)
    return keys if keys else ([text] if text else [])


class SegmentCache:
    """Token ids of segments seen so far, stored flat; cleared at ``max_segments`` or ``max_tokens`` (memory)."""

    def __init__(self, encode_many, max_segments: int = 1 << 19, max_tokens: int = 1 << 24):
        self._encode_many = encode_many  # list[str] -> list[list[int]], the real encoder
        self.max_segments = max_segments
        self.max_tokens = max_tokens
        self.clear()

    def clear(self) -> None:
        # A missing key gets the next free id in the same C-level lookup that finds the known ones; since
        # dicts keep insertion order, the keys added by a batch are the tail of the dict.
        self._index: defaultdict[str, int] = defaultdict()
        self._index.default_factory = self._index.__len__
        self._tokens = np.zeros(1 << 16, dtype=np.int32)
        self._starts = np.zeros(1 << 12, dtype=np.int64)
        self._lengths = np.zeros(1 << 12, dtype=np.int64)
        self._used = 0  # tokens stored

    def _store(self, first_id: int, keys: list[str]) -> None:
        encoded = self._encode_many(keys)  # lists, not arrays: for short segments one array each costs more
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        end, total = first_id + len(keys), int(lengths.sum())
        self._starts = _grow(self._starts, end)
        self._lengths = _grow(self._lengths, end)
        self._tokens = _grow(self._tokens, self._used + total)
        self._starts[first_id:end] = self._used + np.cumsum(lengths) - lengths
        self._lengths[first_id:end] = lengths
        if total:
            self._tokens[self._used:self._used + total] = np.fromiter(chain.from_iterable(encoded), np.int32, total)
        self._used += total

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All texts' token ids back to back (int32) and the token count of each text."""
        if len(self._index) >= self.max_segments or self._used >= self.max_tokens:
            self.clear()
        per_text = [segment_keys(t) for t in texts]
        keys = list(chain.from_iterable(per_text))
        known = len(self._index)
        seg = np.fromiter(map(self._index.__getitem__, keys), dtype=np.int64, count=len(keys))
        if len(self._index) > known:
            try:
                self._store(known, list(islice(self._index, known, None)))
            except BaseException:
                self.clear()  # the new keys have no tokens yet; never serve them
                raise
        lengths, starts = self._lengths[seg], self._starts[seg]
        ends = np.cumsum(lengths)
        flat = self._tokens[np.repeat(starts - (ends - lengths), lengths) + np.arange(ends[-1] if len(ends) else 0)]
        bounds = np.cumsum([0] + [len(ks) for ks in per_text])
        token_ends = np.concatenate([[0], ends])
        return flat, (token_ends[bounds[1:]] - token_ends[bounds[:-1]]).astype(np.int64)


def _grow(a: np.ndarray, size: int) -> np.ndarray:
    if size <= len(a):
        return a
    out = np.zeros(max(size, 2 * len(a)), dtype=a.dtype)
    out[:len(a)] = a
    return out
