"""Masked language modelling samples (BERT, RoBERTa, ModernBERT) from the same packed shards as GPT.

A sample is a chunk of ``seq_len - 2`` packed tokens (documents back to back, EOD between them: RoBERTa's
"full sentences") framed as ``[CLS] chunk [SEP]`` (``<s> chunk </s>`` with our sentencepiece vocabularies). Of
its ordinary tokens (specials are never chosen) ``round(mask_rate * n)`` are chosen, at least one; each chosen
token becomes ``[MASK]`` with probability 0.8, a uniformly random token with 0.1 and stays itself with 0.1
(Devlin et al. 2019). With ``whole_word`` the choice is made over words (a word is a word-start token and the
continuation tokens after it) until the count is reached, so a word is masked whole or not at all.

The choice is drawn from ``default_rng([seed, i])`` for sample index ``i``. The sample index runs over all
epochs (each epoch's chunks have their own indices), so masks are dynamic (RoBERTa: a chunk gets a fresh mask
each time it is seen) yet any sample can be rebuilt on its own, which keeps resume exact.

Output: ``input_ids`` (masked), ``labels`` (the original tokens), ``loss_mask`` (1.0 on chosen tokens). No
padding: every sample is full, so there is no ``attention_mask``, and ``token_type_ids`` are all segment A
(the models' default). With sentence pairs (``pairs``: "nsp" for BERT's next-sentence prediction, "sop" for
ALBERT's sentence-order prediction) a sample is ``[CLS] A [SEP] B [SEP]`` with ``token_type_ids`` and a
``next_sentence_label`` (:meth:`MLMMasking.pair`).

Raw-text streams (:mod:`pretrain.data.stream_dataset`) cut their chunks from a lane's token stream instead of a
shard and mask them with the same :class:`MLMMasking` (built from :func:`masking_options`), sample index
``m * lanes + lane``; next-sentence pairs need a second, random chunk and are shard-only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pretrain.configlib import ConfigError
from pretrain.data.gpt_dataset import GPTDataset
from pretrain.data.indexed import IndexedDataset
from pretrain.data.tokenizer import MASK_TOKEN, Tokenizer

PAIRS = ("none", "nsp", "sop")
MASK_TOKENS = ("[MASK]", MASK_TOKEN)  # BERT's and RoBERTa's spellings, first found wins
CLS_TOKENS, SEP_TOKENS = ("[CLS]",), ("[SEP]",)  # else the tokenizer's BOS / EOS
SP_WORD_START, BYTE_BPE_WORD_START = "\u2581", "\u0120"  # word-start prefixes: sentencepiece, byte-level BPE
WORDPIECE_CONTINUATION = "##"
NSP_FROM_STREAM = ("data.sentence_pairs=nsp with a raw-text source in data.train: next-sentence pairs draw their "
                   "random B from the whole shard, which a stream does not have; use data.sentence_pairs=sop or "
                   "none, or prepare shards with `pretrain prepare`")


def special_ids(tokenizer: Tokenizer, mask_token: str | None = None) -> dict[str, int]:
    """``cls``, ``sep`` and ``mask`` ids of ``tokenizer`` (``mask_token`` overrides the mask's spelling);
    :class:`ConfigError` naming ``data.mask_token`` when the vocabulary has no mask token."""
    def first(names, fallback):
        return next((i for i in map(tokenizer.token_to_id, names) if i is not None), fallback)

    names = (mask_token,) if mask_token else MASK_TOKENS
    mask = first(names, None)
    if mask is None:
        raise ConfigError(f"data.tokenizer {tokenizer.path}: no mask token {' or '.join(names)} in its vocabulary; "
                          f"masked language modelling needs one: set data.mask_token to a token the vocabulary has "
                          f"(e.g. an unused <extra_id_N>) or train a tokenizer with one")
    ids = {"cls": first(CLS_TOKENS, tokenizer.bos_id), "sep": first(SEP_TOKENS, tokenizer.eos_id), "mask": mask}
    missing = [k for k, v in ids.items() if v is None]
    if missing:
        raise ConfigError(f"data.tokenizer {tokenizer.path}: no {'/'.join(missing)} token ([CLS]/<s>, [SEP]/</s>) "
                          f"to frame masked-LM samples")
    return ids


def word_starts(tokenizer: Tokenizer) -> np.ndarray:
    """Per vocabulary id: does the token start a word? (sentencepiece: ``▁`` prefix; byte-level BPE: ``Ġ``
    prefix; WordPiece: no ``##`` prefix)."""
    sp = getattr(tokenizer, "sp", None)
    if sp is not None:  # control and unknown pieces stand alone (specials in a sample always do: see choose)
        return np.array([sp.id_to_piece(i).startswith(SP_WORD_START) or sp.is_control(i) or sp.is_unknown(i)
                         for i in range(tokenizer.vocab_size)])
    names = [tokenizer.tok.id_to_token(i) or "" for i in range(tokenizer.vocab_size)]
    if any(n.startswith(BYTE_BPE_WORD_START) for n in names):  # byte-level BPE (GPT-2, RoBERTa): "Ġ" starts words
        return np.array([n.startswith(BYTE_BPE_WORD_START) or not n[:1].isalnum() for n in names])
    return np.array([not n.startswith(WORDPIECE_CONTINUATION) for n in names])


def masking_options(tokenizer: Tokenizer, mask_token: str | None = None, whole_word: bool = False,
                    pairs: str = "none", document_masking: bool = False) -> dict:
    """The :class:`MLMMasking` keyword arguments that come from ``tokenizer`` and the data options (shards and
    raw-text streams build their masking from the same place); :class:`ConfigError` for a vocabulary without
    a mask token or document masking with sentence pairs."""
    if document_masking and pairs != "none":
        raise ConfigError(f"data.document_mask=true with data.sentence_pairs={pairs}: a pair is cut from one "
                          f"chunk regardless of documents; use one of the two")
    ids = special_ids(tokenizer, mask_token)
    return dict(vocab_size=tokenizer.vocab_size, cls_id=ids["cls"], sep_id=ids["sep"], mask_id=ids["mask"],
                special=(tokenizer.eod_id, tokenizer.pad_id), pairs=pairs,
                word_start=word_starts(tokenizer) if whole_word else None)


class MLMMasking:
    """Sample ``i`` from a chunk of ``seq_len - 2`` tokens (see the module docstring).

    Args:
        seq_len: sample length including ``[CLS]`` and ``[SEP]``.
        seed: with the sample index, fixes the mask.
        vocab_size: random replacements are drawn from ``[0, vocab_size)``.
        cls_id, sep_id, mask_id: the special tokens (:func:`special_ids`).
        mask_rate: share of ordinary tokens chosen for prediction, in (0, 1).
        special: ids never chosen (besides cls/sep: EOD, pad).
        word_start: per-id word-start flags (:func:`word_starts`) for whole-word masking; None = per token.
        pairs: "none"; "nsp" (BERT's next-sentence pairs) or "sop" (ALBERT's sentence order), see :meth:`pair`.
    """

    def __init__(self, seq_len: int, seed: int, *, vocab_size: int, cls_id: int, sep_id: int, mask_id: int,
                 mask_rate: float = 0.15, special: tuple[int | None, ...] = (), word_start: np.ndarray | None = None,
                 pairs: str = "none"):
        if pairs not in PAIRS:
            raise ConfigError(f"data.sentence_pairs={pairs!r}: expected one of {PAIRS}")
        if not 0 < mask_rate < 1:
            raise ConfigError(f"data.mask_rate={mask_rate}: must be in (0, 1) (the share of tokens predicted); "
                              f"BERT uses 0.15")
        if seq_len < (3 if pairs == "none" else 5):
            raise ConfigError(f"data.seq_length={seq_len}: too short for [CLS], [SEP] and the tokens of a sample")
        self.pairs = pairs
        self.seq_len, self.seed, self.vocab_size, self.mask_rate = seq_len, seed, vocab_size, mask_rate
        self.cls_id, self.sep_id, self.mask_id, self.word_start = cls_id, sep_id, mask_id, word_start
        self.special = np.array(sorted({cls_id, sep_id, mask_id, *(s for s in special if s is not None)}))

    @property
    def chunk_len(self) -> int:
        return self.seq_len - (2 if self.pairs == "none" else 3)

    def choose(self, tokens: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Boolean mask of the tokens chosen for prediction (never specials)."""
        ordinary = ~np.isin(tokens, self.special)
        want = max(1, int(round(self.mask_rate * ordinary.sum())))
        if self.word_start is None:
            candidates = np.flatnonzero(ordinary)
            chosen = np.zeros(len(tokens), dtype=bool)
            chosen[rng.permutation(candidates)[:want]] = True
            return chosen
        word = np.cumsum(self.word_start[tokens] | ~ordinary)  # a special token is a word of its own
        order = rng.permutation(np.unique(word[ordinary]))
        sizes = np.bincount(word, weights=ordinary, minlength=word.max() + 1)[order]
        keep = order[:int(np.searchsorted(np.cumsum(sizes), want)) + 1]  # words until ``want`` tokens
        return np.isin(word, keep) & ordinary

    def pair(self, chunk: np.ndarray, other: np.ndarray | None,
             rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``[CLS] A [SEP] B [SEP]`` from the chunk cut at a random point, with token types (B is 1) and
        ``next_sentence_label``: 1 when B was replaced by the start of ``other`` (nsp) or A and B swapped (sop)."""
        cut = int(rng.integers(1, len(chunk)))
        a, b = chunk[:cut], chunk[cut:]
        label = int(rng.random() < 0.5)
        if label and self.pairs == "sop":
            a, b = b, a
        elif label:
            b = other[:len(b)]
        tokens = np.concatenate([[self.cls_id], a, [self.sep_id], b, [self.sep_id]]).astype(np.int64)
        types = (np.arange(len(tokens)) > len(a) + 1).astype(np.int64)
        return tokens, {"token_type_ids": types, "next_sentence_label": np.array(label, dtype=np.int64)}

    def __call__(self, chunk: np.ndarray, i: int, other: np.ndarray | None = None,
                 pieces: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Sample ``i`` from ``chunk``; ``other`` (another chunk) is the random B of next-sentence pairs;
        ``pieces`` (the lengths of the chunk's document pieces) add ``document_ids`` ([CLS] joins the first
        document, [SEP] the last)."""
        rng = np.random.default_rng([self.seed, i])
        if self.pairs == "none":
            tokens, extra = np.concatenate([[self.cls_id], chunk, [self.sep_id]]).astype(np.int64), {}
        else:
            tokens, extra = self.pair(chunk, other, rng)
        if pieces is not None:
            docs = np.repeat(np.arange(len(pieces), dtype=np.int64), pieces)
            extra["document_ids"] = np.concatenate([docs[:1], docs, docs[-1:]])
        chosen = self.choose(tokens, rng)
        action = rng.random(len(tokens))  # < 0.8: [MASK]; < 0.9: random token; else kept
        random_tokens = rng.integers(0, self.vocab_size, len(tokens))
        inputs = np.where(chosen & (action < 0.8), self.mask_id, tokens)
        inputs = np.where(chosen & (action >= 0.8) & (action < 0.9), random_tokens, inputs)
        return {"input_ids": inputs, "labels": tokens, "loss_mask": chosen.astype(np.float32), **extra}


class MLMDataset(MLMMasking):
    """Masked-LM samples from packed chunks of a shard.

    Args:
        indexed, documents, num_samples, seed, cache_dir, add_eod: as for
            :class:`~pretrain.data.gpt_dataset.GPTDataset` (chunks of ``seq_len - 2`` tokens, no extra token).
        tokenizer: gives the special ids (:func:`special_ids`) and, with ``whole_word``, the word starts.
        seq_len, mask_rate, pairs: as for :class:`MLMMasking`. mask_token: overrides the mask token's spelling.
        document_masking: add ``document_ids`` (packed documents attend only within themselves; the model's
            ``document_masking`` uses them).
    """

    def __init__(self, indexed: IndexedDataset, documents: np.ndarray, num_samples: int | None, seq_len: int,
                 seed: int, *, tokenizer: Tokenizer, mask_rate: float = 0.15, mask_token: str | None = None,
                 whole_word: bool = False, pairs: str = "none", document_masking: bool = False,
                 add_eod: bool = False, cache_dir: str | Path | None = None):
        self.document_masking = document_masking
        super().__init__(seq_len, seed, mask_rate=mask_rate,
                         **masking_options(tokenizer, mask_token, whole_word, pairs, document_masking))
        self.chunks = GPTDataset(indexed, documents, num_samples, self.chunk_len, seed, tokenizer.eod_id,
                                 add_eod=add_eod, extra_token=0, cache_dir=cache_dir)

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        other = None
        if self.pairs == "nsp":  # the random B: another chunk, picked from (seed, i) alone
            other = self.chunks.window(int(np.random.default_rng([self.seed, i, 1]).integers(len(self))))[0]
        tokens, pieces = self.chunks.window(i)
        return self(tokens, i, other, pieces if self.document_masking else None)
