"""Context parallelism without processes: the config checks, the mesh's context groups, the load-balanced split
and the exact mask from global positions. Training parity (CP2, CP4, with TP+SP, ZeRO-1/3 and PP, with and
without packed documents) is in tests/test_parallel_parity.py."""

from __future__ import annotations

import pytest
import torch

from pretrain.config import ConfigError, from_dict
from pretrain.models.attention import attention_mask
from pretrain.parallel import ring
from pretrain.parallel.context import ContextAttention, chunk_index, context_mask, split_batch
from pretrain.parallel.mesh import Layout
from pretrain.preflight import check

GPT = {"family": "gpt", "vocab_size": 128, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "max_seq_len": 64}


def config(parallel: dict, model: dict | None = None, seq: int = 64, family_model: dict | None = None):
    return from_dict({"model": family_model or {**GPT, **(model or {})}, "data": {"seq_length": seq},
                      "train": {"global_batch_size": 8, "micro_batch_size": 2}, "parallel": parallel})


@pytest.mark.parametrize("parallel,model,seq,world,msg", [
    ({"cp": 3}, {}, 64, 3, r"parallel.cp=3 needs data.seq_length \(64\) divisible by 2 x cp = 6"),
    ({"cp": 4}, {}, 36, 4, r"data.seq_length \(36\) divisible by 2 x cp = 8"),
    ({"cp": 2, "tp": 4, "sp": True}, {}, 36, 8, r"data.seq_length / cp = 18 divisible by tp"),
    ({"cp": 2}, {"attention_backend": "flash_attn"}, 64, 2, r"attention_backend=auto"),
    ({"cp": 4}, {}, 64, 2, r"parallel.cp=4 must divide the data-parallel size 2"),
    ({"cp": 2}, {}, 64, 12, r"global_batch_size=8 must be a multiple of train.micro_batch_size x data-parallel "
                            r"size = 2 x 6"),  # 12 ranks = 6 replicas x cp 2
    ({"cp": 0}, {}, 64, 1, r"parallel.cp must be >= 1"),
    ({"cp": 2, "cp_comm": "p2p"}, {}, 64, 2, r"parallel.cp_comm must be all_gather or ring, got 'p2p'"),
])
def test_bad_context_parallel_layouts_fail_before_processes_start(parallel, model, seq, world, msg):
    with pytest.raises(ConfigError, match=msg):
        check(config(parallel, model, seq), world, data=False)


def t5_config(parallel: dict, decoder_seq: int):
    t5 = {"family": "t5", "vocab_size": 128, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4}
    cfg = config(parallel, family_model=t5)
    cfg.data.decoder_seq_length = decoder_seq
    return cfg


@pytest.mark.parametrize("parallel,decoder_seq,world,msg", [
    ({"cp": 4}, 36, 4, r"parallel.cp=4 needs data.decoder_seq_length \(36\) divisible by 2 x cp = 8; pad the "
                       r"targets"),
    ({"cp": 2, "tp": 4, "sp": True}, 36, 8, r"data.decoder_seq_length \(36\) divisible by 2 x cp = 4 and by 2 x cp "
                                            r"x tp = 16 \(parallel.sp\)"),
])
def test_bad_t5_context_parallel_layouts_fail_before_processes_start(parallel, decoder_seq, world, msg):
    """T5's decoder sequence is split by its own length."""
    with pytest.raises(ConfigError, match=msg):
        check(t5_config(parallel, decoder_seq), world, data=False)
    for good in ({"cp": 2, "tp": 2, "sp": True, "zero": 3}, {"cp": 4, "cp_comm": "ring"}):
        check(t5_config(good, 8), 8, data=False)


def test_split_batch_splits_the_decoder_side_by_its_own_length():
    enc, dec = torch.arange(16)[None], 100 + torch.arange(8)[None]
    batch = {"input_ids": enc, "attention_mask": enc, "decoder_input_ids": dec, "labels": dec, "loss_mask": dec,
             "next_sentence_label": torch.tensor([1])}
    part = split_batch(batch, 1, 2)  # rank 1 of 2: chunks 1 and 2 of 4
    assert part["input_ids"].tolist() == part["attention_mask"].tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    assert part["decoder_input_ids"].tolist() == part["labels"].tolist() == [[102, 103, 104, 105]]
    assert part["next_sentence_label"].tolist() == [1]
    with pytest.raises(ValueError, match="sequence length 6 is not divisible by 2 x parallel.cp = 4"):
        split_batch({"input_ids": enc, "decoder_input_ids": dec[:, :6]}, 0, 2)


def test_good_layouts_pass():
    for parallel, world in (({"cp": 2}, 2), ({"cp": 4}, 8), ({"cp": 2, "tp": 2, "sp": True, "zero": 3}, 8),
                            ({"cp": 2, "pp": 2}, 4)):
        check(config(parallel, {"num_layers": 2}), world, data=False)
    # Switch / MoE: each MoE layer gathers the whole sequence (capacity decided over it; parity rows cp2 ep2)
    for parallel, world in (({"cp": 2, "ep": 2}, 2), ({"cp": 2, "ep": 2, "tp": 2, "sp": True, "zero": 1}, 8)):
        check(config(parallel, {"moe": {"num_experts": 4}}), world, data=False)


def test_context_groups_are_consecutive_data_ranks():
    lay = Layout.from_world(16, tp=2, pp=2, cp=2)  # dp = 4 = 2 replicas x cp 2
    assert (lay.dp, lay.replicas) == (4, 2)
    g = lay.groups()
    assert g["cp"][:3] == [[0, 2], [4, 6], [1, 3]]  # tensor fastest, then context, then data, then pipeline
    assert g["dp"][0] == [0, 2, 4, 6]  # gradients are reduced over replicas and context ranks together
    assert sorted(r for ranks in g["cp"] for r in ranks) == list(range(16))
    with pytest.raises(ValueError, match="context parallel size 4 must divide the data-parallel size 2"):
        Layout.from_world(4, tp=2, cp=4)


def test_load_balanced_split_holds_a_chunk_and_its_mirror():
    assert chunk_index(0, 2, 4).tolist() == [0, 1, 6, 7]
    assert chunk_index(1, 2, 4).tolist() == [2, 3, 4, 5]
    assert chunk_index(1, 4, 4).tolist() == [2, 3, 12, 13]
    everyone = torch.cat([chunk_index(r, 4, 4) for r in range(4)])
    assert sorted(everyone.tolist()) == list(range(16))
    # each rank gets the same share of the causal triangle: sum over its queries of (index + 1) keys
    assert len({int((chunk_index(r, 4, 4) + 1).sum()) for r in range(4)}) == 1
    batch = {"input_ids": torch.arange(16).repeat(2, 1), "loss_mask": torch.ones(2, 16), "scalar": torch.tensor(3)}
    part = split_batch(batch, 3, 4)
    assert part["input_ids"][0].tolist() == [6, 7, 8, 9] and part["loss_mask"].shape == (2, 4)
    assert part["scalar"] is batch["scalar"]
    with pytest.raises(ValueError, match="not divisible by 2 x parallel.cp = 6"):
        split_batch(batch, 0, 3)


def test_mask_from_global_positions_equals_the_dense_mask():
    """Each rank's rows of the mask over the gathered keys are the dense causal x document mask's rows and
    columns at the global indices: documents spanning chunk borders included."""
    torch.manual_seed(0)
    seq, cp = 24, 3
    docs = (torch.rand(2, seq) < 0.25).long().cumsum(1)
    dense = attention_mask(seq, seq, causal=True, document_ids=docs)
    keys = torch.cat([chunk_index(r, cp, seq // cp) for r in range(cp)])
    for r in range(cp):
        q = chunk_index(r, cp, seq // cp)
        got = context_mask(q, keys, causal=True, q_docs=docs[:, q], k_docs=docs[:, keys])
        assert torch.equal(got, dense[:, :, q][:, :, :, keys])
    assert context_mask(q, keys, causal=False) is None


def test_ring_mask_tiles_equal_the_whole_mask(monkeypatch):
    """Ring attention builds its masks a tile of query rows x one rank's block at a time; with a sparse pattern
    (a window in global positions) and documents, every tile equals that part of the whole mask, and the tiles
    it skips (decided on the host from causality) are entirely masked."""
    monkeypatch.setattr(ring, "TILE", 3)
    cp, local = 2, 8
    docs = torch.tensor([[0] * 5 + [1] * 9 + [2] * 2, [0] * 16]).long()
    keys = torch.cat([chunk_index(r, cp, local) for r in range(cp)])
    q = chunk_index(0, cp, local)  # [0..3, 12..15]: its first tile sees nothing of rank 1's block [4..11]
    att = ContextAttention(None, "ring", q, keys, docs[:, q], docs[:, keys], pattern=lambda a, b: (a - b).abs() < 3)
    whole = att.mask(True)
    assert whole.shape == (2, 1, local, cp * local) and not whole[0, 0, 0, keys > q[0]].any()
    tiles = ring.RingPlan.tiles(local)
    assert [(t.start, t.stop) for t in tiles] == [(0, 3), (3, 6), (6, 8)]
    skipped = []
    for src in range(cp):
        block = slice(src * local, (src + 1) * local)
        for rows in tiles:
            assert torch.equal(att.mask(True, rows, block), whole[:, :, rows, block])
            if not att.visible(True, rows, block):  # skipped by the ring: must be entirely masked
                assert not whole[:, :, rows, block].any()
                skipped.append((src, rows.start))
    assert skipped == [(1, 0)] and att.visible(False, slice(0, 3), slice(8, 16))
