"""Context parallelism for the encoder family: the config checks that admit it, the bidirectional mask (padding
keys, documents, a local window) built from global positions, and evaluation under CP2 (2 gloo processes)
equal to one process's. Training parity (ModernBERT style with and without packed documents, all-gathered and
on the ring, with TP+SP, ZeRO-1/3 and PP; BERT with its next-sentence head, RoBERTa) is in
tests/test_parallel_parity.py."""

from __future__ import annotations

import pytest
import torch

from pretrain.config import from_dict
from pretrain.engines import build_engine
from pretrain.models.attention import attention_mask
from pretrain.models.encoder.model import band_mask
from pretrain.parallel import ring
from pretrain.parallel.context import ContextAttention, chunk_index
from pretrain.preflight import check
from tests.dist_utils import run_distributed
from tests.test_parallel_parity import make_config, micro_batches

MODERN = {"family": "encoder", "flavour": "modernbert", "vocab_size": 128, "hidden_size": 32, "num_layers": 2,
          "num_heads": 4, "ffn_hidden_size": 64, "max_seq_len": 64, "type_vocab_size": 0, "global_every": 2,
          "local_window": 4, "document_masking": True}
BERT = {"family": "encoder", "flavour": "bert", "vocab_size": 128, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
        "ffn_hidden_size": 64, "max_seq_len": 64, "nsp_head": True}


def test_encoders_pass_the_context_parallel_checks():
    for model, parallel, world in ((MODERN, {"cp": 2}, 2), (MODERN, {"cp": 2, "cp_comm": "ring"}, 2),
                                   (MODERN, {"cp": 2, "tp": 2, "sp": True, "zero": 3}, 8),
                                   (BERT, {"cp": 4}, 4), (BERT, {"cp": 2, "pp": 2}, 4)):
        cfg = from_dict({"model": model, "data": {"seq_length": 64},
                         "train": {"global_batch_size": 8, "micro_batch_size": 2}, "parallel": parallel})
        check(cfg, world, data=False)


@pytest.mark.parametrize("cp", [2, 3])
def test_bidirectional_mask_from_global_positions_equals_the_dense_mask(cp, monkeypatch):
    """Each rank's rows of the mask over the gathered keys are the dense bidirectional mask's (documents spanning
    chunk borders, padding keys hidden, a local window for the local layers) at the global indices; the ring's
    tiles are those parts of it, and it skips exactly the tiles the window hides (none without a window: no
    causality hides a block)."""
    monkeypatch.setattr(ring, "TILE", 3)
    torch.manual_seed(0)
    seq, half = 24, 2
    docs = (torch.rand(2, seq) < 0.25).long().cumsum(1)
    keep = (torch.arange(seq)[None] < torch.tensor([[seq - 5], [seq]])).long()  # row 0: 5 padding tokens
    dense = attention_mask(seq, seq, causal=False, document_ids=docs, key_mask=keep)
    band = band_mask(seq, half, None)
    local = dense & band
    keys = torch.cat([chunk_index(r, cp, seq // cp) for r in range(cp)])
    skipped = 0
    for r in range(cp):
        q = chunk_index(r, cp, seq // cp)
        att = ContextAttention(None, "ring", q, keys, docs[:, q], docs[:, keys], k_keep=keep[:, keys].bool())
        windowed = att.with_pattern(lambda a, b: (a - b).abs() <= half, reach=half)
        for got, want, reach in ((att, dense, None), (windowed, local, band)):
            whole = want[:, :, q][:, :, :, keys]
            assert torch.equal(got.mask(False), whole)
            for src in range(cp):
                block = slice(src * len(q), (src + 1) * len(q))
                for rows in ring.RingPlan.tiles(len(q)):
                    seen = True if reach is None else bool(reach[:, :, q][:, :, :, keys][:, :, rows, block].any())
                    assert got.visible(False, rows, block) == seen
                    skipped += not seen
                    assert torch.equal(got.mask(False, rows, block), whole[:, :, rows, block])
    assert skipped > 0
    # padding keys are hidden from every query, and some padding query sees no key in its window at all
    assert not local[0, 0, :, seq - 5:].any() and not local[0, 0, seq - 1].any()


EVAL_LAYOUTS = {"cp2 modernbert_packed": ("modernbert_packed", {"cp": 2}),
                "cp2 ring roberta": ("roberta", {"cp": 2, "cp_comm": "ring"}), "cp2 bert_nsp": ("bert_nsp", {"cp": 2})}


def eval_worker(args: dict) -> dict:
    """Each layout's evaluation sums (masked-LM loss sum, predicted tokens) of step 0's batch at initialization."""
    out = {}
    for name, (model, parallel) in args["layouts"].items():
        engine = build_engine(make_config(model, parallel), parallel=True)
        r = engine.eval_step(micro_batches(0, model, engine.dp_rank, engine.dp_size))
        out[name] = (r.lm_loss_sum, r.num_tokens)
    return out


def test_evaluation_under_context_parallelism_equals_one_process():
    """The masked tokens fall unevenly on the chunks; the sums over the context group are one process's."""
    got = run_distributed("tests.test_context_parallel_encoder:eval_worker", 2, {"layouts": EVAL_LAYOUTS})[0]
    for name, (model, _) in EVAL_LAYOUTS.items():
        ref = build_engine(make_config(model, {})).eval_step(micro_batches(0, model, 0, 1))
        assert got[name][1] == ref.num_tokens > 0, name
        assert abs(got[name][0] - ref.lm_loss_sum) <= 1e-6 * ref.lm_loss_sum, (name, got[name], ref)
