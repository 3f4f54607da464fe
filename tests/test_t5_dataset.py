"""T5 span corruption: T5's lengths, sentinel order, exact reconstruction, per-index determinism."""

import numpy as np
import pytest

from pretrain.data.t5_dataset import T5Dataset, compute_input_and_target_lengths, random_spans_noise_mask
from tests.test_gpt_dataset import random_docs, write_shard

EOS, PAD, VOCAB = 1, 0, 2000  # document tokens are < 1000, below the sentinels
SENTINELS = list(range(VOCAB - 1, VOCAB - 101, -1))  # <extra_id_0> = vocab - 1, counting down as in T5


def test_lengths_match_t5():
    assert compute_input_and_target_lengths(512, 0.15, 3.0) == (568, 114)  # T5 / HF run_t5_mlm_flax values
    assert compute_input_and_target_lengths(512, 0.5, 3.0)[1] <= 512  # the noise_density=0.5 adjustment


def test_noise_mask_shape():
    mask = random_spans_noise_mask(568, 0.15, 3.0, np.random.default_rng(0))
    spans = np.flatnonzero(np.diff(mask.astype(int)) == 1).size
    assert mask.sum() == 85 and spans == 28  # round(568 * .15), round(85 / 3)
    assert not mask[0] and mask[-1]  # starts with a kept span, ends with a noise span


def reconstruct(inputs: np.ndarray, labels: np.ndarray) -> list[int]:
    """Put the targets' spans back where the encoder input (without EOS and padding) has sentinels."""
    spans, current = {}, None
    for t in labels.tolist()[:-1]:  # drop EOS
        if t in SENTINELS:
            current = t
            spans[t] = []
        else:
            spans[current].append(t)
    out = []
    for t in inputs.tolist():
        out.extend(spans[t] if t in SENTINELS else [t])
    return out


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    path = tmp_path_factory.mktemp("t5") / "s"
    return write_shard(path, random_docs(4, 300, max_len=60, eod=EOS))


def test_samples_have_fixed_lengths_and_reconstruct(shard):
    ds = T5Dataset(shard, np.arange(300), 40, encoder_len=64, seed=3, sentinel_ids=SENTINELS, eos_id=EOS,
                   pad_id=PAD)
    raw_len, target_len = compute_input_and_target_lengths(64)
    assert (ds.raw_len, ds.decoder_len) == (raw_len, target_len)
    for i in range(len(ds)):
        s = ds[i]
        assert s["input_ids"].shape == (64,) and s["labels"].shape == (target_len,)
        n_in = int(s["attention_mask"].sum())
        assert s["input_ids"][n_in - 1] == EOS and (s["input_ids"][n_in:] == PAD).all()
        assert s["labels"][-1] == EOS and s["loss_mask"].tolist() == [1.0] * target_len
        used = [t for t in s["labels"].tolist() if t in SENTINELS]
        assert used == SENTINELS[:len(used)]  # <extra_id_0>, <extra_id_1>, ... in order
        assert [t for t in s["input_ids"].tolist() if t in SENTINELS] == used
        np.testing.assert_array_equal(s["decoder_input_ids"], np.r_[PAD, s["labels"][:-1]])
        assert reconstruct(s["input_ids"][:n_in - 1], s["labels"]) == ds.chunks.window(i)[0].tolist()


def test_deterministic_per_index(shard):
    kw = dict(sentinel_ids=SENTINELS, eos_id=EOS, pad_id=PAD)
    a = T5Dataset(shard, np.arange(300), 40, 64, 3, **kw)
    b = T5Dataset(shard, np.arange(300), 40, 64, 3, **kw)
    for i in (7, 0, 7, 39):  # any order, any instance: a resumed run sees the same sample
        np.testing.assert_array_equal(a[i]["input_ids"], b[i]["input_ids"])
        np.testing.assert_array_equal(a[i]["labels"], b[i]["labels"])
    masks = {tuple(a[i]["attention_mask"].tolist() + a[i]["labels"].tolist()) for i in range(10)}
    assert len(masks) == 10
    other_seed = T5Dataset(shard, np.arange(300), 40, 64, 4, **kw)
    assert not np.array_equal(other_seed[7]["input_ids"], a[7]["input_ids"])


def test_decoder_padding_and_errors(shard):
    kw = dict(eos_id=EOS, pad_id=PAD)
    ds = T5Dataset(shard, np.arange(300), 10, 64, 0, sentinel_ids=SENTINELS, decoder_len=24, **kw)
    s, target_len = ds[0], ds.target_len
    assert s["labels"].shape == (24,) and s["loss_mask"].sum() == target_len and (s["labels"][target_len:] == PAD).all()
    with pytest.raises(ValueError, match="shorter than"):
        T5Dataset(shard, np.arange(300), 10, 64, 0, sentinel_ids=SENTINELS, decoder_len=8, **kw)
    with pytest.raises(ValueError, match="sentinel ids"):
        T5Dataset(shard, np.arange(300), 10, 64, 0, sentinel_ids=SENTINELS[:2], **kw)
