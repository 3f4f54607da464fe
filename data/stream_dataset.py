"""One lane of a raw-text source: documents in a seeded order, tokenized on the fly, packed into samples.

Order. A source is cut into units (:mod:`pretrain.data.raw_source`: byte ranges of JSON Lines, parquet row groups,
row ranges). Epoch ``e`` visits the units in the permutation ``default_rng([seed, e]).permutation(U)`` and the
records of unit ``u`` in ``default_rng([seed, e, u]).permutation(n)`` (shard-level + in-shard shuffle; with
``shuffle=False`` both are the identity, which is file order). Lane ``l`` of ``L`` takes the units at positions
``l, l + L, l + 2L, ...`` of an epoch's permutation and wraps into the next epoch on its own.

Packing. A lane's documents, each followed by EOD, form one token stream; GPT sample ``m`` of the lane is the
``seq_len + 1`` tokens starting at token ``m * seq_len`` (Megatron's windows: consecutive samples share one
token), a T5 chunk is ``raw_len`` tokens starting at ``m * raw_len`` and is span-corrupted with the generator
``[seed, m * L + l]``, a masked-LM chunk is ``seq_len - 2`` tokens (``seq_len - 3`` with sentence-order pairs)
starting at ``m`` times that and is masked as sample ``m * L + l`` (80/10/10, :class:`~pretrain.data.mlm_dataset.
MLMMasking`). Samples have exactly the format of :class:`~pretrain.data.gpt_dataset.GPTDataset` /
:class:`~pretrain.data.t5_dataset.T5Dataset` / :class:`~pretrain.data.mlm_dataset.MLMDataset`.

Resume. :class:`Cursor` ``[epoch, slot, record, offset, m]`` says where the lane's next sample starts (the
``record``-th record, in the unit's order, of the ``slot``-th unit of the lane in ``epoch``, at token ``offset``)
and its number ``m``: a few integers that let a lane continue exactly, whatever process holds it. Bad input is
counted per lane as its units are read (a unit read again after a resume counts again).

Equivalence with shards: with ``L = 1`` and ``shuffle=False`` the samples are those of ``GPTDataset`` /
``T5Dataset`` / ``MLMDataset`` with ``shuffle=False`` over the shard ``pretrain prepare --append-eod`` writes from
the same files (test_stream.py and test_encoder_stream.py check it); the shard path shuffles with Megatron's
indices instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pretrain.data.corpus import BadInputs, CorpusError, CorpusReader
from pretrain.data.gpt_dataset import gpt_sample
from pretrain.data.mlm_dataset import MLMMasking
from pretrain.data.raw_source import read_unit
from pretrain.data.t5_dataset import SpanCorruption
from pretrain.data.tokenizer import Tokenizer

Cursor = list  # [epoch, slot, record, offset, m]
START: Cursor = [0, 0, 0, 0, 0]
_ENCODE_BATCH = 64  # documents tokenized per call


@dataclass
class SourceSpec:
    """What a process needs to rebuild the lanes of one raw source (picklable)."""

    entry: str        # the data.train entry, for messages
    units: list       # raw_source units
    lanes: int
    seed: int
    shuffle: bool
    text_key: str
    strict: bool


@dataclass
class Packing:
    """How samples are cut from a lane's token stream and built (picklable): GPT windows, or T5 chunks
    (``corruption``), or masked-LM chunks (``masking``)."""

    seq_length: int
    eod_id: int
    eod_mask_loss: bool = False
    document_mask: bool = False
    corruption: SpanCorruption | None = None  # t5
    masking: MLMMasking | None = None  # mlm

    @property
    def span(self) -> int:
        """Tokens from one sample's start to the next."""
        if self.masking is not None:
            return self.masking.chunk_len
        return self.seq_length if self.corruption is None else self.corruption.raw_len

    @property
    def extra(self) -> int:
        """Tokens a sample reads past its span: a GPT window's shifted label."""
        return int(self.corruption is None and self.masking is None)

    def sample(self, tokens: np.ndarray, pieces: np.ndarray, sample_id: int) -> dict[str, np.ndarray]:
        if self.masking is not None:
            return self.masking(tokens, sample_id, pieces=pieces if self.document_mask else None)
        if self.corruption is None:
            return gpt_sample(tokens, pieces, self.eod_id, self.eod_mask_loss, self.document_mask)
        return self.corruption(tokens, sample_id)


class LaneStream:
    """Samples of lane ``lane`` of a source, from ``cursor`` on; ``self.bad`` counts bad input met."""

    def __init__(self, spec: SourceSpec, lane: int, tokenizer: Tokenizer, packing: Packing,
                 cursor: Cursor | None = None):
        if not 0 <= lane < spec.lanes:
            raise ValueError(f"lane {lane} outside [0, {spec.lanes})")
        self.spec, self.lane = spec, lane
        self.tokenizer, self.packing = tokenizer, packing
        self.reader = CorpusReader([], text_key=spec.text_key, strict=spec.strict)
        self._epoch_units: tuple[int, np.ndarray] | None = None
        self._unit: tuple[int, int] | None = None
        self._texts: list = []
        self._tokens: dict[int, np.ndarray] = {}
        self.order = np.zeros(0, dtype=np.int64)  # the loaded unit's record order (file positions)
        self.cursor = list(cursor if cursor is not None else START)
        if cursor is None:
            self.cursor[:3] = self._valid(0, 0, 0)

    @property
    def bad(self) -> BadInputs:
        return self.reader.bad

    def _units(self, epoch: int) -> np.ndarray:
        """Unit ids of this lane in ``epoch``, in visiting order."""
        if self._epoch_units is None or self._epoch_units[0] != epoch:
            n = len(self.spec.units)
            order = (np.random.default_rng([self.spec.seed, epoch]).permutation(n) if self.spec.shuffle
                     else np.arange(n))
            self._epoch_units = (epoch, order[self.lane::self.spec.lanes])
        return self._epoch_units[1]

    def _load(self, epoch: int, slot: int) -> None:
        if self._unit == (epoch, slot):
            return
        unit = int(self._units(epoch)[slot])
        texts = read_unit(self.spec.units[unit], self.reader)
        self.order = np.arange(len(texts))
        if self.spec.shuffle:
            self.order = np.random.default_rng([self.spec.seed, epoch, unit]).permutation(len(texts))
            texts = [texts[i] for i in self.order]
        self._unit, self._texts = (epoch, slot), texts
        self._tokens = {}

    def documents(self, epoch: int):
        """(unit id, record number in the unit's file order) of the lane's good documents in ``epoch``, in the
        order the lane packs them (reads the whole epoch: for measuring how well the order mixes)."""
        for slot, unit in enumerate(self._units(epoch).tolist()):
            self._load(epoch, slot)
            yield from ((unit, int(self.order[r])) for r, text in enumerate(self._texts) if text is not None)

    def _valid(self, epoch: int, slot: int, record: int) -> list[int]:
        """The first good record at or after (epoch, slot, record) in the lane's order."""
        start_epoch = epoch
        while True:
            if slot >= len(self._units(epoch)):
                epoch, slot = epoch + 1, 0
                record = 0
                if epoch - start_epoch > 1:
                    raise CorpusError(f"data.train source {self.spec.entry}: lane {self.lane} of "
                                      f"{self.spec.lanes} found no usable document in a whole epoch ("
                                      f"{len(self.spec.units)} units, bad input: {self.bad.summary()}); lower "
                                      f"data.stream_lanes or data.stream_chunk_mb, or fix the source")
                continue
            self._load(epoch, slot)
            while record < len(self._texts) and self._texts[record] is None:
                record += 1
            if record < len(self._texts):
                return [epoch, slot, record]
            slot, record = slot + 1, 0

    def _doc(self, record: int) -> np.ndarray:
        """Tokens of a record of the loaded unit, EOD appended (tokenized a batch at a time)."""
        if record not in self._tokens:
            ids = [r for r in range(record, min(record + _ENCODE_BATCH, len(self._texts)))
                   if self._texts[r] is not None and r not in self._tokens]
            for r, tokens in zip(ids, self.tokenizer.encode_batch([self._texts[r] for r in ids])):
                self._tokens[r] = np.append(np.asarray(tokens, dtype=np.int64), self.packing.eod_id)
        return self._tokens[record]

    def next_sample(self) -> dict[str, np.ndarray]:
        """The lane's next sample; advances the cursor."""
        position, offset = self.cursor[:3], self.cursor[3]
        m = self.cursor[4]
        need, advance = self.packing.span + self.packing.extra, self.packing.span
        pieces: list[np.ndarray] = []
        after = None
        while True:
            self._load(*position[:2])
            doc = self._doc(position[2])
            left = len(doc) - offset
            if need:
                take = min(need, left)
                pieces.append(doc[offset:offset + take])
                need -= take
            if after is None and advance < left:
                after = [*position, offset + advance]
            elif after is None:
                advance -= left
            if not need and after is not None:
                break
            position, offset = self._valid(position[0], position[1], position[2] + 1), 0
        self.cursor = after + [m + 1]
        tokens = np.concatenate(pieces)
        lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
        return self.packing.sample(tokens, lengths, m * self.spec.lanes + self.lane)
