"""Exact memoized sentencepiece encoding: encode each distinct whitespace-delimited segment once.

Why it is exact: sentencepiece BPE merges only ever join adjacent symbols into a piece of the vocabulary,
highest score first, ties to the leftmost pair (so merge order inside a segment does not depend on what
surrounds it). When every piece has the form ``▁*X`` (a run of ``▁`` only at its start, which is
what training with ``split_by_whitespace`` produces), no piece can span a position where a non-space
character is followed by a space. The encoding of a text is then the concatenation of the encodings of its
segments cut at those positions, each encoded on its own. With the identity normalizer and a dummy prefix,
the segment `` foo`` (space included) normalizes to ``▁foo``, exactly what ``encode("foo")`` sees; a text's
first segment gets the same ``▁`` from the dummy prefix. So every key is a segment with one space in front
(see :func:`split_keys`) and ``encode(key[1:])`` is its encoding, wherever it stands.

Newlines cut too: when no piece has a newline followed by another character (true of models trained on
lines, as ours are), the text after a newline run is a key of its own, without a space in front. Its encoding
(no dummy prefix) is that of ``"\n" + key`` minus the tokens of ``"\n"``: ``▁`` and the newline, with which
nothing after it can merge. In technical text, where lines end mid-sentence, this makes keys shorter and
about 15% fewer.

:func:`supports` checks these properties on the model proto; models that do not have them (other
normalizers, collapsed whitespace, whitespace-as-suffix, pieces with inner ``▁`` or with a newline followed by
another character) are encoded plainly, and so are unigram models: their Viterbi search breaks ties between
equal-score paths differently in context. Texts containing ``▁`` themselves are encoded whole. Natural text
is Zipfian, so after a few MB almost every segment is a hit and the C++ encoder only sees new words.

Why it is fast: texts are cut with numpy on one UTF-8 buffer, and Arrow's C++ hash table finds the distinct
keys of a batch; Python only touches each *distinct* key of a batch once, never every word.
"""

from __future__ import annotations

import re
from collections import defaultdict
from itertools import chain, islice
from operator import itemgetter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SPACE_SYMBOL = "\u2581"
_PIECE_FORM = re.compile(f"^{SPACE_SYMBOL}*[^{SPACE_SYMBOL}]*$")
_NEWLINE_JOINS = re.compile("\n[^\n]")  # a piece that would merge across a newline cut
_SPACE, _NEWLINE = ord(" "), ord("\n")


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
    return all(_PIECE_FORM.match(p.piece) and not _NEWLINE_JOINS.search(p.piece)
               for p in m.pieces if p.type in text_types)


def split_keys(texts: list[str]) -> tuple[bytes, np.ndarray, np.ndarray]:
    """Cut ``texts`` into cache keys: ``(buffer, bounds, first)``.

    ``buffer`` is ``b" " + b" ".join(texts)`` in UTF-8 (each text behind one space); key ``i`` is
    ``buffer[bounds[i]:bounds[i + 1]]`` and text ``t``'s keys start at index ``first[t]``. A cut goes before
    each space run that follows a non-space and is followed by a non-space of the same text, and after each
    newline run that is followed by neither a space nor the end of the text; trailing spaces stay with a
    text's last key, and texts containing ``▁`` are one key.
    """
    raw = [t.encode("utf-8") for t in texts]
    sizes = np.fromiter(map(len, raw), np.int64, len(raw)) + 1
    buf = b" " + b" ".join(raw)
    starts = np.cumsum(sizes) - sizes  # where each text's leading space is
    byte = np.frombuffer(buf, np.uint8)
    space, newline = byte == _SPACE, byte == _NEWLINE
    cut = np.empty(len(buf) + 1, dtype=bool)
    cut[1:-1] = space[1:] & ~space[:-1]  # every space run after a non-space...
    cut[1:-1] |= newline[:-1] & ~newline[1:] & ~space[1:]  # ...and what follows a newline run...
    cut[starts] = cut[-1] = True
    for i, t in enumerate(texts):  # ...but not trailing spaces, nor any cut in a text with "▁"
        if t.endswith(" ") or SPACE_SYMBOL in t:
            keep = 0 if SPACE_SYMBOL in t else len(t.rstrip(" ").encode("utf-8"))
            cut[starts[i] + 1 + keep:starts[i] + sizes[i]] = False
    bounds = np.flatnonzero(cut)
    return buf, bounds, np.searchsorted(bounds, starts)


class SegmentCache:
    """Token ids of segments seen so far, stored flat.

    At ``max_segments`` or ``max_tokens`` (memory) it keeps the segments seen in the most batches (a quarter
    of the limits at most: the common words, which are hit again soon) and drops the rest (mostly words
    seen once), so a corpus far larger than the cache does not re-encode its common words at every eviction.
    """

    def __init__(self, encode_many, max_segments: int = 1 << 19, max_tokens: int = 1 << 24):
        self._encode_many = encode_many  # list of UTF-8 bytes -> list[list[int]], the real encoder
        self.max_segments = max_segments
        self.max_tokens = max_tokens
        self._newline_tokens = len(encode_many([b"\n"])[0])  # "▁" and "\n": dropped from keys after a newline
        self.clear()

    def clear(self) -> None:
        # A missing key gets the next free id in the same C-level lookup that finds the known ones; since
        # dicts keep insertion order, the keys added by a batch are the tail of the dict.
        self._index: defaultdict[bytes, int] = defaultdict()
        self._index.default_factory = self._index.__len__
        self._tokens = np.zeros(1 << 16, dtype=np.int32)
        self._starts = np.zeros(1 << 12, dtype=np.int64)
        self._lengths = np.zeros(1 << 12, dtype=np.int32)
        self._seen = np.zeros(1 << 12, dtype=np.int32)  # in how many batches each segment occurred
        self._used = 0  # tokens stored

    def _evict(self) -> None:
        """Keep the segments seen in the most batches (twice at least), within a quarter of the limits."""
        seen = self._seen[:len(self._index)]
        frequent = np.argsort(-seen, kind="stable")
        frequent = frequent[seen[frequent] > 1][:self.max_segments // 4]
        frequent = frequent[np.cumsum(self._lengths[frequent]) <= self.max_tokens // 4]
        keep = np.sort(frequent)
        keys = list(self._index)
        tokens, starts = _gather(self._tokens, self._starts[keep], self._lengths[keep])
        lengths, seen = self._lengths[keep], seen[keep] // 2  # halved: old popularity fades
        self.clear()
        self._index.update(zip(map(keys.__getitem__, keep.tolist()), range(len(keep))))
        self._tokens, self._starts, self._lengths, self._seen = tokens, starts, lengths, seen
        self._used = len(tokens)

    def _store(self, first_id: int, keys: list[bytes]) -> None:
        # lists, not arrays: for short segments one array each costs more
        encoded = self._encode_many([k[1:] if k[0] == _SPACE else b"\n" + k for k in keys])
        n = self._newline_tokens
        for i, k in enumerate(keys):
            if k[0] != _SPACE:
                encoded[i] = encoded[i][n:]
        lengths = np.fromiter(map(len, encoded), dtype=np.int32, count=len(encoded))
        end, total = first_id + len(keys), int(lengths.sum())
        self._starts = _grow(self._starts, end)
        self._lengths = _grow(self._lengths, end)
        self._seen = _grow(self._seen, end)
        self._tokens = _grow(self._tokens, self._used + total)
        self._starts[first_id:end] = self._used + np.cumsum(lengths) - lengths
        self._lengths[first_id:end] = lengths
        if total:
            self._tokens[self._used:self._used + total] = np.fromiter(chain.from_iterable(encoded), np.int32, total)
        self._used += total

    def _segment_ids(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Cache ids of the keys of ``texts`` (new keys encoded and stored) and each text's first key."""
        buf, bounds, first = split_keys(texts)
        keys = pa.Array.from_buffers(pa.large_binary(), len(bounds) - 1,
                                     [None, pa.py_buffer(bounds), pa.py_buffer(buf)])
        # the system allocator gives memory back; Arrow's default pool keeps ~25 MB more per worker
        keys = pc.dictionary_encode(keys, memory_pool=pa.system_memory_pool())
        distinct = keys.dictionary.to_pylist()
        known = len(self._index)
        # one C-level call for all lookups; itemgetter returns a bare value, not a tuple, for a single key
        found = itemgetter(*distinct)(self._index) if len(distinct) > 1 else [self._index[distinct[0]]]
        ids = np.fromiter(found, dtype=np.int64, count=len(distinct))
        if len(self._index) > known:
            try:
                self._store(known, list(islice(self._index, known, None)))
            except BaseException:
                self.clear()  # the new keys have no tokens yet; never serve them
                raise
        self._seen[ids] += 1  # ids are distinct
        # the indices zero-copy, without to_numpy(): that imports pandas (0.5 s and ~50 MB in every worker)
        indices = np.frombuffer(keys.indices.buffers()[1], np.int32, len(keys), keys.indices.offset * 4)
        return ids[indices], first

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All texts' token ids back to back (int32) and the token count of each text."""
        if not texts:
            return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64)
        if len(self._index) >= self.max_segments or self._used >= self.max_tokens:
            self._evict()
        seg, first = self._segment_ids(texts)
        flat, out_starts = _gather(self._tokens, self._starts[seg], self._lengths[seg])
        return flat, np.diff(out_starts[first], append=len(flat))


def _gather(tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The runs ``tokens[starts[i]:starts[i] + lengths[i]]`` back to back, and where each begins there."""
    out_starts = np.cumsum(lengths, dtype=np.int64) - lengths
    index = np.repeat(starts - out_starts, lengths)
    index += np.arange(len(index), dtype=index.dtype)
    return tokens[index], out_starts


def _grow(a: np.ndarray, size: int) -> np.ndarray:
    if size <= len(a):
        return a
    out = np.zeros(max(size, 2 * len(a)), dtype=a.dtype)
    out[:len(a)] = a
    return out
