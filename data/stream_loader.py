"""Training data with raw-text sources: the global sample sequence, a rank's micro-batches, the saved position.

Global sequence. Position ``k`` of the run belongs to dataset ``d = dataset_index[k]`` of the blend (Megatron's
greedy blend, :func:`~pretrain.data.blend.build_blending_indices`: exact proportions in every prefix; one
dataset: always 0). A shard dataset gives its sample ``dataset_sample_index[k]``, as in ``BlendedDataset``. A raw
source gives the next sample of its lane ``l = ((k - c) * L) // G``, where ``[c, c + G)`` is the global batch
holding ``k``: every global batch gives each of the ``L = data.stream_lanes`` lanes one contiguous slot of
``G / L`` positions. Lanes do not depend on the data-parallel size: rank ``r`` of ``dp`` holds positions
``[c + rG/dp, c + (r+1)G/dp)``, which are the whole lanes ``[rL/dp, (r+1)L/dp)`` when ``L % dp == 0`` and
``G % L == 0`` (checked), so no lane is read by two ranks and nothing is tokenized twice.

Workers. A rank's lanes are spread over ``num_workers`` processes (the rank's ``i``-th lane -> worker
``i % num_workers``), each tokenizing and packing its lanes in order, ``ahead`` steps ahead of training; with 0
workers the training process does it. Sample content never depends on the number of workers.

Position. :meth:`StreamTrainData.state_dict` (a collective when distributed: every rank holds some lanes) gives,
for ``consumed_samples``, every lane's :data:`~pretrain.data.stream_dataset.Cursor` plus the lane count, seed,
shuffle and each source's fingerprint; resuming from it at any data-parallel size or worker count continues the
same global sequence. A changed source, lane count or seed is refused with a message naming it. Asked to start
past the saved position (a spike rollback skips the window that made the spike), the loader reads the window
and drops it.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
from collections import OrderedDict, deque
from dataclasses import asdict
from typing import Callable, Iterator, NamedTuple

import numpy as np

from pretrain.data.blend import build_blending_indices
from pretrain.data.corpus import BadInputs
from pretrain.data.raw_source import check_fingerprint
from pretrain.data.stream_dataset import LaneStream, Packing, SourceSpec
from pretrain.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

HISTORY = 64  # step boundaries whose lane cursors are kept (saves happen at the consumer's position)


class Answer(NamedTuple):
    """A worker's reply: the samples asked of lane ``key``, its cursor after them, its bad-input counts (on an
    error: ``samples`` None and ``cursor`` the message)."""

    key: tuple
    samples: list | None
    cursor: list | str
    bad: dict | None


def _answer(lanes: dict, key, n: int) -> Answer:
    """Lane ``key``'s next ``n`` samples, with its cursor and bad-input counts after them."""
    lane = lanes[key]
    return Answer(key, [lane.next_sample() for _ in range(n)], list(lane.cursor), asdict(lane.bad))


def _serve(lanes: dict, requests, results) -> None:
    """Worker loop: for each request ``(key, n)`` send ``(key, samples, cursor, bad counts)``; None stops."""
    while True:
        request = requests.get()
        if request is None:
            return
        key, n = request
        try:
            results.put(_answer(lanes, key, n))
        except Exception as e:  # noqa: BLE001 - reported to the training process, which raises it
            results.put((key, None, f"{type(e).__name__}: {e}", None))


class _Worker:
    """A process (or, with ``process=False``, this process) serving some lanes' samples in request order."""

    def __init__(self, lanes: dict, process: bool):
        self.lanes = lanes
        self.proc = None
        self.done: deque = deque()
        if process:
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            self.requests, self.results = ctx.Queue(), ctx.Queue()
            self.proc = ctx.Process(target=_serve, args=(lanes, self.requests, self.results), daemon=True)
            self.proc.start()

    def ask(self, key, n: int) -> None:
        if self.proc is not None:
            self.requests.put((key, n))
            return
        self.done.append(_answer(self.lanes, key, n))

    def answer(self) -> Answer:
        if self.proc is None:
            return Answer(*self.done.popleft())
        while True:
            try:
                answer = Answer(*self.results.get(timeout=5))
            except queue.Empty:
                if not self.proc.is_alive():
                    raise RuntimeError(f"data worker {self.proc.pid} died (exit code {self.proc.exitcode})") from None
                continue
            if answer.samples is None:
                raise RuntimeError(f"data worker for lane {answer.key[1]} of data.train source #{answer.key[0]}: "
                                   f"{answer.cursor}")
            return answer

    def close(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.requests.put(None)
            self.proc.join(timeout=5)
            if self.proc.is_alive():
                self.proc.kill()


class StreamLoader:
    """This rank's collated micro-batches, step after step, from ``consumed_samples``; see the module docstring."""

    def __init__(self, data: StreamTrainData, dp_rank: int, dp_size: int, micro_batch_size: int,
                 batch_size: Callable[[int], int], consumed_samples: int, state: dict | None, num_workers: int,
                 ahead: int = 2):
        lanes = data.lanes
        if lanes % dp_size:
            raise ValueError(f"data.stream_lanes={lanes} is not a multiple of the data-parallel size {dp_size}; "
                             f"set data.stream_lanes to a multiple of it that divides train.global_batch_size")
        self.data, self.dp_rank = data, dp_rank
        self.dp_size, self.mbs = dp_size, micro_batch_size
        self.batch_size, self.ahead = batch_size, max(ahead, 1)
        mine = range(dp_rank * lanes // dp_size, (dp_rank + 1) * lanes // dp_size)
        cursors = data.cursors_from(state, consumed_samples)
        keys = [(d, lane) for d in data.raw for lane in mine]
        count = max(min(num_workers, len(keys)), 1)
        self.owner = {key: i % count for i, key in enumerate(keys)}
        self.workers = [_Worker({k: LaneStream(data.datasets[k[0]], k[1], data.tokenizer, data.packing,
                                               cursors.get(f"{k[0]}:{k[1]}"))
                                 for k in keys if self.owner[k] == w}, process=num_workers > 0)
                        for w in range(count)]
        start = state["position"] if state else consumed_samples
        self.history: OrderedDict[int, dict] = OrderedDict({start: {f"{d}:{l}": cursors.get(f"{d}:{l}")
                                                                    for d, l in keys}})
        self.bad: dict = {}
        self.requested = start
        self.pending: deque = deque()  # (consumed after, (plan, requests)) of steps asked of the workers
        self.ready: deque = deque()
        while self.requested < consumed_samples:  # a window skipped after a rollback: read and drop it
            self._request_step()
            self._collect_step()
        if self.requested != consumed_samples:
            raise ValueError(f"cannot continue raw data at {consumed_samples} samples: the saved position "
                             f"{start} plus whole batches gives {self.requested}")
        self.ready.clear()

    def _plan(self, consumed: int, gbs: int) -> tuple[list, OrderedDict]:
        lanes, dp = self.data.lanes, self.dp_size
        if gbs % lanes or gbs % (self.mbs * dp):
            raise ValueError(f"global batch size {gbs} must be a multiple of data.stream_lanes={lanes} and of "
                             f"micro_batch_size {self.mbs} x data-parallel size {dp}")
        per_rank = gbs // dp
        positions = np.arange(consumed + self.dp_rank * per_rank, consumed + (self.dp_rank + 1) * per_rank)
        datasets, samples = self.data.blend_at(positions)
        plan, requests = [], OrderedDict()
        for k, d, i in zip(positions.tolist(), datasets.tolist(), samples.tolist()):
            if d in self.data.raw:
                key = (d, (k - consumed) * lanes // gbs)
                requests[key] = requests.get(key, 0) + 1
                plan.append(("raw", key))
            else:
                plan.append(("shard", (d, i)))
        return plan, requests

    def _request_step(self) -> None:
        gbs = int(self.batch_size(self.requested))
        plan, requests = self._plan(self.requested, gbs)
        for key, n in requests.items():
            self.workers[self.owner[key]].ask(key, n)
        self.pending.append((self.requested + gbs, (plan, requests)))
        self.requested += gbs

    def _collect_step(self) -> None:
        end, work = self.pending.popleft()
        plan, requests = work
        cursors = dict(next(reversed(self.history.values())))
        got = {}
        for key in requests:
            answer = self.workers[self.owner[key]].answer()
            assert answer.key == key, (answer.key, key)
            got[key] = iter(answer.samples)
            cursors[f"{key[0]}:{key[1]}"] = answer.cursor
            self.bad[key] = answer.bad
        self.history[end] = cursors
        while len(self.history) > HISTORY:
            self.history.popitem(last=False)
        samples = [next(got[ref]) if kind == "raw" else self.data.datasets[ref[0]][ref[1]] for kind, ref in plan]
        self.ready.extend(self.data.collate(samples[i:i + self.mbs]) for i in range(0, len(samples), self.mbs))

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        while not self.ready:
            while len(self.pending) < self.ahead and (self.data.blend is None or not self.pending
                                                      or self.requested < self.data.num_samples):
                self._request_step()  # read ahead, but not past a blend's end (unless asked for)
            self._collect_step()
        return self.ready.popleft()

    def cursors_at(self, consumed_samples: int) -> dict:
        if consumed_samples not in self.history:
            raise RuntimeError(f"no data position recorded for {consumed_samples} consumed samples (known: "
                               f"{list(self.history)})")
        return self.history[consumed_samples]

    def bad_inputs(self) -> BadInputs:
        total = BadInputs()
        for counts in self.bad.values():
            for kind, n in counts.items():
                setattr(total, kind, getattr(total, kind) + n)
        return total

    def close(self) -> None:
        for w in self.workers:
            w.close()
        bad = self.bad_inputs()
        if bad.total:
            log.warning("raw data.train sources: %d bad input records skipped or repaired (%s)", bad.total,
                        bad.summary())


class StreamTrainData:
    """Training data whose ``data.train`` holds raw sources (and maybe shards): see the module docstring.

    Args:
        datasets: one entry per ``data.train`` entry: a :class:`SourceSpec` (raw) or a map-style dataset (shard).
        weights: blend weights (one per dataset; needed with more than one).
        num_samples: samples of the whole run (the blend's length).
        tokenizer, packing: how lanes tokenize and cut samples.
        fingerprints: per raw dataset, what the source's files look like now (checked against a resumed state).
        collate: samples -> a micro-batch (``pretrain.data.loader.collate``).
    """

    def __init__(self, datasets: list, weights: list[float] | None, num_samples: int, tokenizer: Tokenizer,
                 packing: Packing, fingerprints: dict[int, list], collate: Callable[[list[dict]], dict]):
        self.datasets, self.num_samples = datasets, num_samples
        self.tokenizer, self.packing = tokenizer, packing
        self.fingerprints, self.collate = fingerprints, collate
        self.raw = [d for d, ds in enumerate(datasets) if isinstance(ds, SourceSpec)]
        first = datasets[self.raw[0]]
        self.lanes, self.seed = first.lanes, first.seed
        self.shuffle = first.shuffle
        self.blend = build_blending_indices(weights, num_samples) if len(datasets) > 1 else None
        self.loader: StreamLoader | None = None

    def __len__(self) -> int:
        return self.num_samples

    def blend_at(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dataset, sample index in it) of global positions (sample index is meaningful for shards only)."""
        if self.blend is None:
            return np.zeros_like(positions), positions
        if positions[-1] >= self.num_samples:
            raise ValueError(f"position {positions[-1]} past the {self.num_samples} samples the blend was built for")
        return self.blend[0][positions], self.blend[1][positions]

    def cursors_from(self, state: dict | None, consumed_samples: int) -> dict:
        """Lane cursors to start from: ``state``'s (checked against this data), or the start of the run."""
        if state is None:
            if consumed_samples:  # (a state may lie before consumed_samples: that window is skipped)
                raise ValueError(f"resuming at {consumed_samples} consumed samples without a saved raw-data "
                                 f"position (the checkpoint has no 'data' entry): the stream cannot continue "
                                 f"exactly; start a new run (checkpoint.init_from) instead")
            return {}
        mine = {"lanes": self.lanes, "seed": self.seed, "shuffle": self.shuffle,
                "sources": [self.datasets[d].entry for d in self.raw]}
        saved = {k: state.get(k) for k in mine}
        saved["sources"] = [s["entry"] for s in state.get("sources", [])]
        for key in mine:
            if saved[key] != mine[key]:
                raise ValueError(f"the checkpoint's raw-data position was saved with {key}={saved[key]!r}, this run "
                                 f"has {mine[key]!r} (data.stream_lanes / data.seed / data.stream_shuffle / "
                                 f"data.train): resuming would not continue the same sample sequence")
        for d, source in zip(self.raw, state["sources"]):
            check_fingerprint(source["entry"], source["fingerprint"], self.fingerprints[d])
        return state["cursors"]

    def micro_batches(self, dp_rank: int, dp_size: int, micro_batch_size: int, batch_size: Callable[[int], int],
                      consumed_samples: int, state: dict | None = None, num_workers: int = 0) -> StreamLoader:
        """This rank's micro-batches from ``consumed_samples`` on (``state``: a saved :meth:`state_dict`)."""
        if self.loader is not None:
            self.loader.close()
        self.loader = StreamLoader(self, dp_rank, dp_size, micro_batch_size, batch_size, consumed_samples, state,
                                   num_workers)
        return self.loader

    def metrics(self) -> dict:
        """Bad input records met so far by this rank's lanes, by kind (``data/bad_*``; all 0 when clean)."""
        bad = self.loader.bad_inputs() if self.loader is not None else BadInputs()
        return {f"data/bad_{kind}": n for kind, n in asdict(bad).items()}

    def state_dict(self, consumed_samples: int) -> dict:
        """The position at ``consumed_samples``, all ranks' lanes (a collective when torch.distributed is up)."""
        import torch.distributed as dist

        local = self.loader.cursors_at(consumed_samples) if self.loader is not None else {}
        parts = [local]
        if dist.is_available() and dist.is_initialized():
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, local)
        cursors = {k: v for part in parts for k, v in part.items()}
        return {"position": consumed_samples, "lanes": self.lanes, "seed": self.seed, "shuffle": self.shuffle,
                "cursors": cursors,
                "sources": [{"entry": self.datasets[d].entry, "fingerprint": self.fingerprints[d]}
                            for d in self.raw]}
