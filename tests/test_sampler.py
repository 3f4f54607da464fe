"""The data-parallel sampler: the global sample sequence is independent of the data-parallel size, so a run
resumes exactly at another size, with batch-size ramp-up and gradient accumulation."""

import numpy as np
import pytest

from pretrain.data.sampler import DataParallelSampler, ramp_up

N = 1000  # dataset length (the sequence wraps past it)


def run(dp_size: int, steps: int, consumed: int = 0, mbs: int = 2, gbs=ramp_up(8, 8, 96, 32), **kw):
    """Global batches of ``steps`` optimizer steps with ``dp_size`` ranks: per step, the samples of all ranks in
    rank order (each rank's micro-batches concatenated), plus the consumed samples afterwards."""
    samplers = [DataParallelSampler(N, r, dp_size, mbs, gbs, consumed_samples=consumed, **kw)
                for r in range(dp_size)]
    batches = []
    for _ in range(steps):
        sizes = {s.global_batch_size() for s in samplers}
        assert len(sizes) == 1  # every rank agrees on the step's batch size
        per_rank = [s.next_global_batch() for s in samplers]
        assert {len(m) for m in per_rank} == {sizes.pop() // (mbs * dp_size)}  # gradient-accumulation steps
        assert all(len(mb) == mbs for m in per_rank for mb in m)
        batches.append([i for m in per_rank for mb in m for i in mb])
    assert len({s.consumed_samples for s in samplers}) == 1
    return batches, samplers[0].consumed_samples


def test_ramp_up():
    f = ramp_up(8, 8, 96, 32)  # 3 increments, one every 32 samples
    assert [f(c) for c in (0, 31, 32, 64, 95, 96, 10_000)] == [8, 8, 16, 24, 24, 32, 32]
    assert ramp_up(32, 8, 0, 32)(0) == 32
    with pytest.raises(ValueError, match="divisible"):
        ramp_up(8, 5, 100, 32)


@pytest.mark.parametrize("shuffle", [False, True])
def test_global_sequence_independent_of_dp_size(shuffle):
    ref, consumed = run(1, 12, shuffle=shuffle, seed=3)
    assert [len(b) for b in ref] == [8] * 4 + [16] * 2 + [24] * 2 + [32] * 4  # ramped up over 96 samples
    for dp in (2, 4):
        assert run(dp, 12, shuffle=shuffle, seed=3) == (ref, consumed)
    flat = [i for b in ref for i in b]
    if shuffle:
        assert flat != list(range(len(flat))) and len(set(flat)) == len(flat)
    else:
        assert flat == list(range(len(flat)))


@pytest.mark.parametrize("before,after", [(2, 4), (4, 1), (1, 2)])
def test_resume_at_another_dp_size(before, after):
    full, total = run(before, 14, shuffle=True, seed=5)
    head, consumed = run(before, 5, shuffle=True, seed=5)  # stop mid ramp-up, save consumed samples
    tail, end = run(after, 9, consumed=consumed, shuffle=True, seed=5)
    assert head + tail == full and end == total


def test_epochs_wrap_with_fresh_permutations():
    s = DataParallelSampler(N, 0, 1, 10, 100, shuffle=True, seed=1)
    epoch0 = [i for _ in range(10) for mb in s.next_global_batch() for i in mb]
    epoch1 = [i for _ in range(10) for mb in s.next_global_batch() for i in mb]
    assert sorted(epoch0) == sorted(epoch1) == list(range(N)) and epoch0 != epoch1
    cross = DataParallelSampler(N, 0, 1, 10, 100, consumed_samples=950, shuffle=True, seed=1).next_global_batch()
    assert [i for mb in cross for i in mb] == epoch0[950:] + epoch1[:50]  # a batch straddling two epochs
    other_seed = DataParallelSampler(N, 0, 1, 10, 100, shuffle=True, seed=2).next_global_batch()
    assert [i for mb in other_seed for i in mb] != epoch0[:100]


def test_rank_slices_and_state():
    s = DataParallelSampler(N, 1, 2, 2, 8, consumed_samples=16)
    assert s.next_global_batch() == [[20, 21], [22, 23]]  # rank 1 of 2 takes the second half: 2 micro-batches
    assert s.state_dict() == {"consumed_samples": 24, "seed": 0, "shuffle": False}
    assert s.next_global_batch(16) == [[32, 33], [34, 35], [36, 37], [38, 39]]  # an explicit size
    restored = DataParallelSampler(N, 1, 2, 2, 8)
    restored.load_state_dict(s.state_dict())
    assert restored.consumed_samples == 40 and next(iter(restored)) == [44, 45]
    assert np.array_equal(s.global_batch(16, 8), np.arange(16, 24))


def test_bad_sizes():
    with pytest.raises(ValueError, match="not a positive multiple"):
        DataParallelSampler(N, 0, 4, 2, 12).next_global_batch()
    with pytest.raises(ValueError, match="dp_rank"):
        DataParallelSampler(N, 2, 2, 2, 8)
    with pytest.raises(ValueError, match="empty"):
        DataParallelSampler(0, 0, 1, 2, 8)
