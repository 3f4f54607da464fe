"""TensorParallelLayers against LocalLayers, layer by layer, on 2 gloo ranks.

The parity test covers whole models; this one pins down the pieces a model can use in ways the test models
do not: fused sections (``stride``), sequence-parallel entry/exit, the vocab-parallel loss and the logits
gather. Outputs and input gradients are compared with the single-process layers built from the same seed.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_distributed

pytestmark = pytest.mark.dist


def tensor_worker(args: dict) -> dict:
    import torch.distributed as dist
    import torch.nn.functional as F

    from pretrain.parallel.tensor import TensorParallelLayers, shard
    from pretrain.models.layers import LocalLayers

    group = dist.new_group([0, 1])
    rank = dist.get_rank()
    out = {}
    for sp in (False, True):
        tp = TensorParallelLayers(group, sequence_parallel=sp)
        layers = {}
        for name, factory in (("local", LocalLayers()), ("tp", tp)):
            torch.manual_seed(3)
            layers[name] = (factory.embedding(64, 16, 0.1), factory.column(16, 24, True, 0.1, stride=2),
                            factory.row(12, 16, True, 0.1), factory.norm(16, "layernorm"),
                            factory.lm_head(16, 64, 0.1))
        ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(5))
        labels = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(6))

        def run(factory, mods):
            emb, col, row, norm, head = mods
            h = factory.scatter_sequence(emb(ids))
            gate, up = col(norm(h)).chunk(2, dim=-1)  # [gate_r; up_r] on each rank
            h = h + row(F.silu(gate) * up)
            logits = head(factory.gather_sequence(h))
            loss = factory.cross_entropy(logits, labels).mean()
            loss.backward()
            return loss.detach(), factory.gather_logits(logits.detach())

        ref_loss, ref_logits = run(LocalLayers(), layers["local"])
        loss, logits = run(tp, layers["tp"])
        emb_l, col_l, row_l, norm_l, _ = layers["local"]
        emb_t, col_t, row_t, norm_t, _ = layers["tp"]
        norm_grad = norm_t.weight.grad.clone()
        if sp:  # what the engine's hook does: sum the sequence shards' contributions
            dist.all_reduce(norm_grad, group=group)
        out[f"sp={sp}"] = {
            "loss": (loss - ref_loss).abs().item(),
            "logits": (logits - ref_logits).abs().max().item(),
            "col_weight": (col_t.weight - shard(col_l.weight, 0, rank, 2, stride=2)).abs().max().item(),
            "col_grad": (col_t.weight.grad - shard(col_l.weight.grad, 0, rank, 2, stride=2)).abs().max().item(),
            "row_grad": (row_t.weight.grad - shard(row_l.weight.grad, 1, rank, 2)).abs().max().item(),
            "emb_grad": (emb_t.weight.grad - shard(emb_l.weight.grad, 0, rank, 2)).abs().max().item(),
            "norm_grad": (norm_grad - norm_l.weight.grad).abs().max().item(),
            "sp_marked": float(getattr(norm_t.weight, "sequence_parallel", False)),
        }
    return out


def test_layers_match_local_layers():
    results = run_distributed("tests.test_parallel_tensor:tensor_worker", 2, timeout=300)
    for rank, res in enumerate(results):
        for mode, diffs in res.items():
            assert diffs.pop("sp_marked") == float(mode == "sp=True"), (rank, mode)
            for key, diff in diffs.items():
                assert diff < 1e-6, (rank, mode, key, diff)
