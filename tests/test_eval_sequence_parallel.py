"""Evaluation of a model trained with sequence parallelism (the live model of ``train.eval_tasks``).

Under ``parallel.sp`` the sequence is split over the tensor ranks between blocks: every width the scorer
hands the model is padded to a multiple of ``tp`` (right padding: causal attention and masked keys keep it out
of the real positions), a pipeline stage receives its neighbour's sequence shard, and generation recomputes
the sequence instead of running one-token KV-cache steps (one token cannot be split). Under context parallelism
(``parallel.cp``) only the training and validation steps split sequences; the live model scores whole ones.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.dist_utils import run_distributed

pytestmark = pytest.mark.dist

TASKS = ["kjv_cont", "kjv_lastword"]


def trainer_worker(args: dict) -> dict:
    from pretrain.train import build_datasets
    from pretrain.trainer import Trainer
    from tests.test_trainer import make_cfg

    tok = SimpleNamespace(path=args["tokenizer"], vocab_size=args["vocab_size"])
    cfg = make_cfg("gpt_tiny.yaml", Path(args["tmp"]), args["prefix"], tok, "train.steps=2",
                   "train.global_batch_size=4", "train.micro_batch_size=2", "train.eval_interval=2",
                   "train.eval_steps=1", f"train.eval_tasks={','.join(TASKS)}", "train.eval_tasks_limit=8",
                   *args["layout"])
    torch.manual_seed(0)
    return {"code": Trainer(cfg, *build_datasets(cfg)).fit()}


@pytest.mark.parametrize("layout", [["parallel.tp=2", "parallel.pp=2", "parallel.sp=true"],
                                    ["parallel.tp=2", "parallel.sp=true"],
                                    ["parallel.cp=2", "parallel.cp_comm=ring", "data.document_mask=true",
                                     "model.document_masking=true"]],
                         ids=["tp2_sp_pp2", "dp2_tp2_sp", "dp2_cp2_ring"])  # cp: scoring sees whole sequences
def test_eval_tasks_during_sequence_parallel_training(layout, tmp_path, tiny_shard_prefix, tiny_tokenizer):
    """4 gloo ranks train with sequence parallelism and score tasks on the live model at the last step: the
    scores equal one process scoring the saved checkpoint (log-likelihood metrics within 1e-5)."""
    from pretrain import checkpoint as ckpt
    from pretrain.evals.harness import evaluate_tasks, scalar_metrics
    from pretrain.evals.local_data import ensure_local_eval_data
    from pretrain.evals.pretrain_model import load_checkpoint_model
    from tests.test_trainer import make_cfg, metrics

    ensure_local_eval_data()
    args = {"tmp": str(tmp_path), "prefix": tiny_shard_prefix, "tokenizer": str(tiny_tokenizer.path),
            "vocab_size": tiny_tokenizer.vocab_size, "layout": layout}
    assert all(r["code"] == 0 for r in run_distributed("tests.test_eval_sequence_parallel:trainer_worker", 4, args,
                                                       timeout=600))
    cfg = make_cfg("gpt_tiny.yaml", tmp_path, tiny_shard_prefix, tiny_tokenizer)
    during = next(r for r in metrics(cfg) if "eval/kjv_cont/0shot/acc" in r)
    model = load_checkpoint_model(ckpt.resolve(cfg.checkpoint.dir))
    after = scalar_metrics(evaluate_tasks(model, TASKS, 0, 8, progress=False))
    assert set(after) == set(during) - {"step"}
    for key, value in after.items():
        assert math.isclose(during[key], value, rel_tol=1e-5), (key, during[key], value)


def scoring_worker(args: dict) -> dict:
    """A GPT and a T5 split 2-way with sequence parallelism, scored on widths that are not multiples of 2,
    against the same models in one process (built from the same seed on every rank)."""
    import torch.distributed as dist

    from pretrain.evals.pretrain_model import PretrainModel
    from pretrain.models import build_model
    from pretrain.parallel.tensor import TensorParallelLayers

    tok = SimpleNamespace(bos_id=1, eos_id=2)
    sp = TensorParallelLayers(dist.new_group([0, 1]), sequence_parallel=True)
    gpt_cfg = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=31,
                   moe=dict(num_experts=2, every=2))
    t5_cfg = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)
    models = {}
    for name, layers in (("one", None), ("sp", sp)):
        torch.manual_seed(0)
        models[name] = (PretrainModel(build_model("gpt", gpt_cfg, layers), tok),
                        PretrainModel(build_model("t5", t5_cfg, layers), tok))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 64, (2, 13), generator=g)
    seg = torch.tensor([[0] * 5 + [1] * 4 + [2] * 4, [0] * 7 + [1] * 6])
    pos = torch.tensor([list(range(5)) + list(range(5, 9)) * 2, list(range(7)) + list(range(7, 13))])
    enc, dec = torch.randint(3, 64, (2, 9), generator=g), torch.randint(3, 64, (3, 5), generator=g)
    out = {}
    for name, (gpt, t5) in models.items():
        out[name] = {
            "logits": torch.cat(gpt.logits(ids, [(0, 13), (4, 11)])),
            "packed": torch.cat(gpt.packed_logits(ids, pos, seg, [[4, 8, 12], [6, 12]])),
            "generated": torch.tensor(gpt.greedy_generate([5, 6, 7], 5, [])),
            "seq2seq": torch.cat(t5.seq2seq_logits(enc, [9, 6], dec, [0, 1, 1], [5, 3, 4])),
            "t5_generated": torch.tensor(t5.greedy_generate([5, 6, 7, 8, 9], 4, [])),
        }
    assert [gpt.max_length for gpt, _ in models.values()] == [31, 30]  # the longest width splitting over 2 ranks
    return {k: (out["sp"][k].float() - out["one"][k].float()).abs().max() for k in out["one"]}


def test_sequence_parallel_model_scores_any_width():
    for rank in run_distributed("tests.test_eval_sequence_parallel:scoring_worker", 2, timeout=300):
        assert all(diff <= 1e-5 for diff in rank.values()), rank
