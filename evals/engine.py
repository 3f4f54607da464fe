"""Scoring engine: turns (context, continuation) requests into log-likelihoods, fast and batch-size stable.

Conventions are lm-evaluation-harness's (``hf`` backend), so the numbers are the same:

* a pair is encoded as ``encode(context + continuation)`` split at ``len(encode(context))``, with trailing
  spaces of the context moved into the continuation; an empty context becomes the prefix token;
* the model input is ``(context + continuation)[-(max_length + 1):][:-1]`` (left truncation, counted here);
* rolling log-likelihoods use disjoint windows of ``max_length`` tokens, each conditioned on the previous
  token, the first on the prefix token.

Where it differs is speed: requests whose model input is a prefix of another request's input (MMLU-style
one-token answers, repeated contexts) share one forward pass; continuations of the same context (multiple
choice) are packed into one input after a single copy of the context, each attending to the context and to
itself only (a tree mask), when the model supports it; the output layer runs only on scored positions;
tokenisation is one batched call. An input is right-padded to a width fixed by its own length and batched only
with inputs of that width, so a request's numbers do not depend on the batch size (bit-identical on CPU;
lm-eval's depend on its batch padding, lm-eval#1645). With
``torch.distributed`` initialised, ranks split the batches and exchange results.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pretrain.evals.model import EvalModel

TokenPair = tuple[list[int], list[int]]


def rolling_windows(tokens: list[int], prefix_token: int, max_length: int) -> list[TokenPair]:
    """lm-eval's ``get_rolling_token_windows(context_len=1)`` + ``make_disjoint_window``: (context, target)
    pairs that score every token exactly once, each window seeing at most ``max_length`` tokens."""
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    windows = [([prefix_token], tokens[:first])]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_length)
        end = done + n
        window = tokens[max(end - max_length - 1, 0):end - 1]
        windows.append((window[: len(window) - (n - 1)], tokens[end - n:end]))
        done = end
    return windows


def move_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval: trailing whitespace of the context belongs to the continuation (word-boundary tokens)."""
    n = len(context) - len(context.rstrip())
    return (context[:-n], context[-n:] + continuation) if n else (context, continuation)


def longest_extensions(seqs: list[tuple]) -> dict[tuple, tuple]:
    """Each sequence -> the longest of ``seqs`` it is a prefix of (itself if none): a causal model scores
    the shorter one as part of the longer one's forward pass."""
    # In lexicographic order, a sequence that is a prefix of some other sequence is directly followed by a
    # sequence starting with it; walking backwards assigns every sequence the longest one it is a prefix of.
    lex = sorted(set(seqs))
    owner: dict[tuple, tuple] = {}
    for k in range(len(lex) - 1, -1, -1):
        nxt = lex[k + 1] if k + 1 < len(lex) else None
        owner[lex[k]] = owner[nxt] if nxt is not None and nxt[:len(lex[k])] == lex[k] else lex[k]
    return owner


@dataclass
class _Row:
    """One model input and the requests that read their scores from it."""
    input_ids: list[int]
    readers: list[tuple[int, int, list[int]]]  # (request index, end position in input, continuation)
    shared: int = 0  # leading context tokens other rows may share (0: none, e.g. after truncation)


@dataclass
class _Pack:
    """Rows with the same context as one model input: the context once, then each row's remaining tokens
    (segment k), which see the context and their own segment only, at the positions of their own row."""
    rows: list[_Row]

    def __post_init__(self) -> None:
        n = self.rows[0].shared
        self.input_ids, self.position_ids, self.segment_ids = self.rows[0].input_ids[:n], list(range(n)), [0] * n
        self.offsets = []  # where each row's own tokens start in the pack
        for k, row in enumerate(self.rows, 1):
            rest = row.input_ids[n:]
            self.offsets.append(len(self.input_ids))
            self.input_ids += rest
            self.position_ids += range(n, n + len(rest))
            self.segment_ids += [k] * len(rest)

    @property
    def readers(self) -> list[tuple[int, int, list[int]]]:
        return [r for row in self.rows for r in row.readers]

    def positions(self, k: int, start: int) -> list[int]:
        """Pack positions of row ``k``'s positions ``start..`` (the first may be in the shared context)."""
        n, row = self.rows[k].shared, self.rows[k]
        return [p if p < n else self.offsets[k] + p - n for p in range(start, len(row.input_ids))]


def _bucket(n: int, max_length: int) -> int:
    """Padded width of an ``n``-token input; depends on ``n`` only. Steps grow with ``n`` (4 up to 64 tokens,
    then about n/8) so padding wastes at most ~12% while batches still fill up."""
    step = max(4, 1 << max(0, n.bit_length() - 4))
    return min(-(-n // step) * step, max_length)


def _pad(seqs: list[list[int]], width: int, pad_id: int) -> torch.Tensor:
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for b, seq in enumerate(seqs):
        ids[b, :len(seq)] = torch.tensor(seq, dtype=torch.long)
    return ids


def _first_scored(row: _Row) -> int:
    """The first input position whose logits a reader of ``row`` needs."""
    return min(end - len(cont) for _, end, cont in row.readers)


def _read(row: _Row, start: int, logits: torch.Tensor) -> dict[int, tuple[float, bool]]:
    """(log-likelihood, is greedy) of each request reading ``row``; ``logits`` cover positions ``start..``."""
    logprobs = F.log_softmax(logits.float(), dim=-1).cpu()
    out = {}
    for i, end, cont in row.readers:
        lp = logprobs[end - len(cont) - start:end - start]
        target = torch.tensor(cont)
        out[i] = (float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
    return out


class Scorer:
    """Batched scorer over an :class:`EvalModel`. ``truncated`` counts left-truncated requests.

    Under ``torch.distributed`` the ranks of ``group`` (default: all) split the requests; ranks outside it with
    the same group rank (e.g. the tensor-parallel peers of a data-parallel replica) score the same share."""

    def __init__(self, model: EvalModel, batch_size: int = 16, progress: bool = True, group=None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.batch_size, self.progress, self.group = model, batch_size, progress, group
        self.truncated = 0

    # ---- tokenisation ---------------------------------------------------------------------------------------
    def encode_pairs(self, pairs: list[tuple[str, str]]) -> list[TokenPair]:
        moved = [move_trailing_space(ctx, cont) for ctx, cont in pairs]
        texts = [c + t for c, t in moved] + [c for c, _ in moved if c]
        encoded = iter(self.model.encode_batch(texts))
        wholes = [next(encoded) for _ in moved]
        out = []
        for (ctx, cont), whole in zip(moved, wholes):
            if ctx:
                n_ctx = len(next(encoded))
                out.append((whole[:n_ctx], whole[n_ctx:]))
            else:
                out.append(self._empty_context_pair(cont))
        return out

    def _empty_context_pair(self, cont: str) -> TokenPair:
        """lm-eval: the continuation alone, without special tokens, after the prefix token."""
        cont_ids, prefix = self.model.encode_plain(cont), self.model.prefix_token_id
        return ([prefix], cont_ids) if cont_ids[:1] != [prefix] else (cont_ids[:1], cont_ids[1:])

    # ---- public request types -------------------------------------------------------------------------------
    def loglikelihood(self, pairs: list[tuple[str, str]], desc: str = "loglikelihood") -> list[tuple[float, bool]]:
        return self.loglikelihood_tokens(self.encode_pairs(pairs), desc)

    def loglikelihood_rolling(self, texts: list[str], desc: str = "rolling") -> list[tuple[float, int]]:
        """Total log-likelihood and token count of each text."""
        token_lists = self.model.encode_batch(texts)
        windows, owner = [], []
        for i, tokens in enumerate(token_lists):
            for w in rolling_windows(tokens, self.model.prefix_token_id, self.model.max_length):
                windows.append(w)
                owner.append(i)
        totals = [0.0] * len(texts)
        for i, (ll, _) in zip(owner, self.loglikelihood_tokens(windows, desc)):
            totals[i] += ll
        return [(totals[i], len(t)) for i, t in enumerate(token_lists)]

    def generate_until(self, contexts: list[str], until: list[str], max_gen_toks: int,
                       desc: str = "generate") -> list[str]:
        """Greedy generation; the output is cut at the first stop string. Identical contexts run once."""
        stops = list(until) + [self.model.decode([self.model.eot_token_id])]
        stops = [s for s in stops if s]
        unique = sorted(set(contexts), key=lambda c: -len(c))
        mine = self._my_share(list(range(len(unique))))
        done: dict[int, str] = {}
        for j in tqdm(mine, desc=desc, disable=not self.progress, unit="req"):
            ids, max_new = self._generation_input(self.model.encode(unique[j]), max_gen_toks)
            text = self.model.decode(self.model.greedy_generate(ids, max_new, stops))
            for s in stops:
                text = text.split(s)[0]
            done[j] = text
        done = self._gather(done)
        by_ctx = {unique[j]: t for j, t in done.items()}
        return [by_ctx[c] for c in contexts]

    def _generation_input(self, ids: list[int], max_gen_toks: int) -> tuple[list[int], int]:
        """(prompt, tokens to generate): lm-eval keeps the last ``max_length - max_gen_toks`` prompt tokens."""
        keep = self.model.max_length - max_gen_toks
        if len(ids) > keep:
            self.truncated += 1
            ids = ids[-keep:]
        return ids, max_gen_toks

    # ---- core -----------------------------------------------------------------------------------------------
    def loglikelihood_tokens(self, requests: list[TokenPair], desc: str = "loglikelihood") -> list[tuple[float, bool]]:
        # Inputs are right-padded to widths fixed by their own lengths, and a batch only holds inputs of the same
        # kind and width: each is computed with the same shapes and values whatever the batch size (the batch
        # dimension itself does not change the numbers).
        units = self._pack(self._plan(requests))
        units.sort(key=lambda u: (self._key(u), u.input_ids))
        batches: list[list[_Row | _Pack]] = []
        for unit in units:
            if not batches or len(batches[-1]) == self.batch_size or self._key(batches[-1][0]) != self._key(unit):
                batches.append([])
            batches[-1].append(unit)
        mine = [batches[b] for b in self._my_share(list(range(len(batches))))]
        results: dict[int, tuple[float, bool]] = {}
        bar = tqdm(total=sum(len(u.readers) for b in mine for u in b), desc=desc, disable=not self.progress,
                   unit="req")
        for batch in mine:
            for row, start, logits in (self._score_packs(batch) if isinstance(batch[0], _Pack)
                                       else self._score_rows(batch)):
                results.update(_read(row, start, logits))
            bar.update(sum(len(u.readers) for u in batch))
        bar.close()
        results = self._gather(results)
        return [results[i] for i in range(len(requests))]

    def _plan(self, requests: list[TokenPair]) -> list[_Row]:
        """One row per distinct model input that is not a prefix of another input."""
        L = self.model.max_length
        inputs, shared = [], []
        for i, (ctx, cont) in enumerate(requests):
            if not ctx or not cont:
                raise ValueError(f"request {i}: empty context or continuation tokens (ctx={ctx}, cont={cont})")
            if len(cont) > L:
                raise ValueError(f"request {i}: continuation of {len(cont)} tokens exceeds max_length {L}")
            truncated = len(ctx) + len(cont) > L + 1
            self.truncated += truncated
            inputs.append(tuple((ctx + cont)[-(L + 1):][:-1]))
            shared.append(0 if truncated else len(ctx))
        owner = longest_extensions(inputs)
        rows: dict[tuple, _Row] = {}
        for i, inp in enumerate(inputs):
            key = owner[inp]
            row = rows.setdefault(key, _Row(list(key), [], shared[i]))
            row.readers.append((i, len(inp), requests[i][1]))
            row.shared = min(row.shared, shared[i])
        return list(rows.values())

    def _pack(self, rows: list[_Row]) -> list[_Row | _Pack]:
        """Rows sharing a context become packs (of at most ``max_length`` tokens each) when the model can
        score packs; every other row stays as it is."""
        if not self.model.supports_packing:
            return list(rows)
        groups: dict[tuple, list[_Row]] = {}
        out: list[_Row | _Pack] = []
        for row in rows:
            if row.shared:
                groups.setdefault(tuple(row.input_ids[:row.shared]), []).append(row)
            else:
                out.append(row)
        for context, group in groups.items():
            chunks, size = [[]], len(context)
            for row in sorted(group, key=lambda r: r.input_ids):
                rest = len(row.input_ids) - len(context)
                if chunks[-1] and size + rest > self.model.max_length:
                    chunks.append([])
                    size = len(context)
                chunks[-1].append(row)
                size += rest
            out += [_Pack(c) if len(c) > 1 else c[0] for c in chunks]
        return out

    def _key(self, unit: _Row | _Pack) -> tuple[bool, int]:
        return isinstance(unit, _Pack), _bucket(len(unit.input_ids), self.model.max_length)

    def _score_rows(self, batch: list[_Row]) -> list[tuple[_Row, int, torch.Tensor]]:
        ids = _pad([r.input_ids for r in batch], self._key(batch[0])[1], self.model.prefix_token_id)
        spans = [(_first_scored(r), len(r.input_ids)) for r in batch]
        return [(r, s, lg) for r, (s, _), lg in zip(batch, spans, self.model.logits(ids, spans))]

    def _score_packs(self, batch: list[_Pack]) -> list[tuple[_Row, int, torch.Tensor]]:
        width = self._key(batch[0])[1]
        wanted, positions = [], []  # (row, first scored position) in pack order; each pack's positions to score
        for pack in batch:
            positions.append([])
            for k, row in enumerate(pack.rows):
                wanted.append((row, _first_scored(row)))
                positions[-1] += pack.positions(k, wanted[-1][1])
        logits = self.model.packed_logits(_pad([p.input_ids for p in batch], width, self.model.prefix_token_id),
                                          _pad([p.position_ids for p in batch], width, 0),
                                          _pad([p.segment_ids for p in batch], width, -1), positions)
        parts = torch.cat(logits).split([len(row.input_ids) - start for row, start in wanted])
        return [(row, start, part) for (row, start), part in zip(wanted, parts)]

    # ---- data parallel --------------------------------------------------------------------------------------
    def _world(self) -> tuple[int, int]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(self.group), torch.distributed.get_world_size(self.group)
        return 0, 1

    def _my_share(self, items: list[int]) -> list[int]:
        rank, world = self._world()
        return items[rank::world]  # round-robin over a length-sorted list keeps ranks balanced

    def _gather(self, part: dict) -> dict:
        rank, world = self._world()
        if world == 1:
            return part
        parts: list[dict] = [None] * world  # type: ignore[list-item]
        torch.distributed.all_gather_object(parts, part, group=self.group)
        return {k: v for p in parts for k, v in p.items()}
