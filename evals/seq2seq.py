"""Scoring for encoder-decoder models (T5, Switch-T5): the context is the encoder input, the continuation is
scored by the decoder after its start token.

Conventions are lm-evaluation-harness's ``hf`` backend with ``backend="seq2seq"``, so the numbers are the same:

* context and continuation are encoded *separately*, the context with the tokenizer's special tokens (an HF T5
  tokenizer appends ``</s>``), the continuation without; trailing spaces of the context move to the
  continuation; an empty context becomes the prefix token;
* the encoder sees the context's last ``max_length`` tokens (left truncation, counted here), the decoder
  ``[start] + continuation[:-1]`` and predicts the continuation, which must fit ``max_length``;
* rolling log-likelihoods use the same windows as the decoder-only path: each window's conditioning tokens
  (the prefix token first) go to the encoder, its scored tokens are the decoder's target;
* generation encodes the prompt (last ``max_length`` tokens) and decodes greedily. lm-eval passes
  ``max_length = prompt tokens + max_gen_toks`` to ``generate``, which for an encoder-decoder bounds the
  decoder sequence *including* its start token: up to ``prompt + max_gen_toks - 1`` new tokens (with batch
  size 1; lm-eval's bound grows with the batch's padded prompt width). We generate up to that many, so the
  text cut at the first stop string is the same.

As in :class:`~pretrain.evals.engine.Scorer`, rows are batched only with rows of the same padded widths (numbers do not
depend on the batch size), a request whose decoder input is a prefix of another's with the same encoder input
reads its scores from that row (MMLU-style one-token answers share one decoder row), and each distinct encoder
input runs once per batch (multiple-choice endings of one context share the encoder pass). :func:`make_scorer`
picks the scorer for a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from pretrain.evals.engine import Scorer, TokenPair, _bucket, _pad, _read, longest_extensions, move_trailing_space
from pretrain.evals.model import EvalModel


@dataclass
class _Pair:
    """One encoder input + decoder input and the requests reading their scores from it."""
    encoder: list[int]
    decoder: list[int]  # starts with the decoder start token
    readers: list[tuple[int, int, list[int]]]  # (request index, end position in the decoder, continuation)


class Seq2SeqScorer(Scorer):
    """:class:`~pretrain.evals.engine.Scorer` for models with ``is_encoder_decoder`` (same public methods)."""

    def encode_pairs(self, pairs: list[tuple[str, str]]) -> list[TokenPair]:
        moved = [move_trailing_space(ctx, cont) for ctx, cont in pairs]
        contexts = iter(self.model.encode_batch([c for c, _ in moved if c]))
        return [(next(contexts), self.model.encode_plain(cont)) if ctx else self._empty_context_pair(cont)
                for ctx, cont in moved]

    def _generation_input(self, ids: list[int], max_gen_toks: int) -> tuple[list[int], int]:
        """The encoder keeps the prompt's last ``max_length`` tokens; the decoder budget is lm-eval's (module
        docstring)."""
        if len(ids) > self.model.max_length:
            self.truncated += 1
            ids = ids[-self.model.max_length:]
        return ids, len(ids) + max_gen_toks - 1

    def loglikelihood_tokens(self, requests: list[TokenPair], desc: str = "loglikelihood") -> list[tuple[float, bool]]:
        rows = self._plan_pairs(requests)
        rows.sort(key=lambda r: (self._widths(r), r.encoder, r.decoder))
        batches: list[list[_Pair]] = []
        for row in rows:
            if not batches or len(batches[-1]) == self.batch_size or self._widths(batches[-1][0]) != self._widths(row):
                batches.append([])
            batches[-1].append(row)
        mine = [batches[b] for b in self._my_share(list(range(len(batches))))]
        results: dict[int, tuple[float, bool]] = {}
        bar = tqdm(total=sum(len(r.readers) for b in mine for r in b), desc=desc, disable=not self.progress, unit="req")
        for batch in mine:
            for row, logits in zip(batch, self._score_pairs(batch)):
                results.update(_read(row, 0, logits))
            bar.update(sum(len(r.readers) for r in batch))
        bar.close()
        results = self._gather(results)
        return [results[i] for i in range(len(requests))]

    def _plan_pairs(self, requests: list[TokenPair]) -> list[_Pair]:
        """One row per distinct (encoder input, decoder input) whose decoder input does not extend to another."""
        L, start = self.model.max_length, self.model.decoder_start_token_id
        by_encoder: dict[tuple, dict[tuple, list]] = {}
        for i, (ctx, cont) in enumerate(requests):
            if not ctx or not cont:
                raise ValueError(f"request {i}: empty context or continuation tokens (ctx={ctx}, cont={cont})")
            if len(cont) > L:
                raise ValueError(f"request {i}: continuation of {len(cont)} tokens exceeds max_length {L}")
            self.truncated += len(ctx) > L
            decoders = by_encoder.setdefault(tuple(ctx[-L:]), {})
            decoders.setdefault((start, *cont[:-1]), []).append((i, len(cont), cont))
        rows = []
        for encoder, decoders in by_encoder.items():
            owner = longest_extensions(list(decoders))
            merged: dict[tuple, list] = {}
            for dec, readers in decoders.items():
                merged.setdefault(owner[dec], []).extend(readers)
            rows += [_Pair(list(encoder), list(dec), readers) for dec, readers in merged.items()]
        return rows

    def _widths(self, row: _Pair) -> tuple[int, int]:
        L = self.model.max_length
        return _bucket(len(row.encoder), L), _bucket(len(row.decoder), L)

    def _score_pairs(self, batch: list[_Pair]) -> list[torch.Tensor]:
        """Each distinct encoder input of the batch once, then every row's decoder input on its output."""
        index: dict[tuple, int] = {}
        owner = [index.setdefault(tuple(r.encoder), len(index)) for r in batch]
        we, wd = self._widths(batch[0])
        pad = self.model.decoder_start_token_id
        return self.model.seq2seq_logits(_pad([list(e) for e in index], we, pad), [len(e) for e in index],
                                         _pad([r.decoder for r in batch], wd, pad), owner,
                                         [len(r.decoder) for r in batch])


def make_scorer(model: EvalModel, **kwargs) -> Scorer:
    """The scorer for ``model`` (an ``EvalModel``): :class:`Seq2SeqScorer` for encoder-decoder models, else
    :class:`~pretrain.evals.engine.Scorer`."""
    return (Seq2SeqScorer if model.is_encoder_decoder else Scorer)(model, **kwargs)
