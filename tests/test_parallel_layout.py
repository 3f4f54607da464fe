"""Layout arithmetic and config validation: no processes needed."""

from __future__ import annotations

import pytest

from pretrain.parallel.mesh import Layout
from pretrain.parallel.validate import validate, validate_layout
from pretrain.config import ConfigError, from_dict as load

GPT = {"family": "gpt", "vocab_size": 512, "hidden_size": 64, "num_layers": 4, "num_heads": 8,
       "num_kv_heads": 2, "ffn_hidden_size": 128, "max_seq_len": 64}


def from_dict(raw: dict):
    """The config, with the world-size independent layout checks of the pre-flight step."""
    cfg = load(raw)
    validate(cfg)
    return cfg


def config(parallel: dict, model: dict | None = None, **train):
    return from_dict({"model": {**GPT, **(model or {})}, "data": {"seq_length": 64},
                      "train": {"global_batch_size": 16, "micro_batch_size": 2, **train}, "parallel": parallel})


def test_groups_follow_megatron_rank_order():
    lay = Layout.from_world(16, tp=2, pp=2, ep=2)  # dp = 4, expert dp = 2
    assert (lay.dp, lay.expert_dp) == (4, 2)
    g = lay.groups()
    assert g["tp"][:2] == [[0, 1], [2, 3]]
    assert g["dp"][0] == [0, 2, 4, 6] and g["dp"][1] == [1, 3, 5, 7]
    assert g["pp"][0] == [0, 8]
    assert g["mp"][0] == [0, 1, 8, 9]
    assert g["ep"][:2] == [[0, 2], [4, 6]]  # consecutive data ranks hold different experts
    assert g["edp"][:2] == [[0, 4], [2, 6]]  # same expert index: gradients averaged here
    for kind, lists in g.items():  # every kind partitions the world
        assert sorted(r for ranks in lists for r in ranks) == list(range(16)), kind
    assert lay.coords(13) == (1, 2, 1) and lay.rank_of(1, 2, 1) == 13


@pytest.mark.parametrize("world,kw,msg", [
    (6, {"tp": 4}, "not divisible by tp\\*pp"),
    (8, {"tp": 2, "ep": 3}, "expert parallel size 3 must divide the data-parallel size 4"),
])
def test_layout_from_world_errors(world, kw, msg):
    with pytest.raises(ValueError, match=msg):
        Layout.from_world(world, **kw)


@pytest.mark.parametrize("parallel,model,msg", [
    ({"tp": 4}, {"num_kv_heads": 2}, "tp=4 does not divide model.num_kv_heads=2"),
    ({"tp": 2}, {"vocab_size": 501}, "model.vocab_size=501"),
    ({"tp": 2}, {"num_heads": 6, "hidden_size": 48, "num_kv_heads": 6}, None),  # fine: 6 heads over 2
    ({"tp": 3}, {"num_heads": 6, "hidden_size": 48, "num_kv_heads": 6}, "model.ffn_hidden_size=128"),
    ({"sp": True}, {}, "parallel.sp=true needs parallel.tp > 1"),
    ({"zero": 2, "pp": 2}, {}, "Nearest supported: parallel.zero=1 with pp=2"),
    ({"zero": 3, "ep": 2}, {"moe": {"num_experts": 4}}, "Nearest supported: parallel.zero=1 with ep=2"),
    ({"ep": 2}, {}, "needs a Switch model"),
    ({"ep": 2, "zero": 2}, {"moe": {"num_experts": 4}}, "use parallel.zero=1 with ep=2"),
    ({"ep": 2, "tp": 2, "sp": True}, {"moe": {"num_experts": 4}}, None),  # experts replicated over tp
    ({"ep": 2, "pp": 2}, {"moe": {"num_experts": 4}}, None),
    ({"pp": 2, "tp": 2}, {"moe": {"num_experts": 4}, "tie_embeddings": True}, None),
    ({"ep": 3}, {"moe": {"num_experts": 4}}, "must divide model.moe.num_experts=4"),
    ({"offload_params": True, "zero": 2}, {}, "offload_params needs parallel.zero=3"),
    ({"offload_optimizer": True}, {}, "offload_optimizer needs parallel.zero >= 1"),
    ({"vpp": 2}, {}, "needs parallel.pp > 1"),
    ({"pp": 2, "vpp": 2}, {"document_masking": True}, None),  # document ids travel between stages
    ({"pp": 3, "vpp": 2}, {}, "stages need at least that many layers; the model has 4"),
    ({"pp": 2, "zero": 1}, {}, None),
])
def test_validation_names_the_key(parallel, model, msg):
    if msg is None:
        config(parallel, model)
        return
    with pytest.raises(ConfigError, match=msg):
        config(parallel, model)


def test_t5_layouts():
    t5 = {"family": "t5", "vocab_size": 512, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2,
          "num_heads": 6}
    data = {"seq_length": 64, "decoder_seq_length": 31}
    assert from_dict({"model": t5, "data": data, "parallel": {"tp": 2, "pp": 2}}).parallel.pp == 2
    for parallel, msg in (({"tp": 4}, "does not divide model.num_heads=6"),
                          ({"tp": 2, "sp": True}, "data.decoder_seq_length \\(31\\) divisible by tp"),
                          ({"pp": 3, "vpp": 2}, "stages need at least that many layers; the model has 4")):
        with pytest.raises(ConfigError, match=msg):
            from_dict({"model": t5, "data": data, "parallel": parallel})


def test_sequence_parallel_needs_divisible_sequence():
    cfg = from_dict({"model": GPT, "data": {"seq_length": 63}, "parallel": {"tp": 2}})
    assert cfg.parallel.tp == 2
    with pytest.raises(ConfigError, match="data.seq_length \\(63\\) divisible by tp"):
        from_dict({"model": GPT, "data": {"seq_length": 63}, "parallel": {"tp": 2, "sp": True}})


def test_world_size_checks():
    cfg = config({"tp": 2})
    validate_layout(cfg, 4)  # dp 2: 16 = 2 micro x 2 dp x 4 accumulation steps
    with pytest.raises(ConfigError, match="not divisible by parallel.tp x parallel.pp"):
        validate_layout(cfg, 3)
    with pytest.raises(ConfigError, match="global_batch_size=16 must be a multiple of .* 2 x 3"):
        validate_layout(cfg, 6)


def test_pipeline_needs_enough_micro_batches():
    cfg = config({"pp": 2}, global_batch_size=8, micro_batch_size=2)
    validate_layout(cfg, 4)  # dp 2: 2 micro-batches for 2 stages
    with pytest.raises(ConfigError, match="needs at least 2 micro-batches per step"):
        validate_layout(cfg, 8)  # dp 4: 1 micro-batch


def test_mesh_creates_only_its_own_groups_at_512_ranks(monkeypatch):
    """At 512 ranks (tp 8, dp 64) the mesh used to call ``new_group`` 1,168 times, each a barrier of all 512
    ranks, 1,024 of them for size-1 groups. Now each rank creates only the groups it belongs to, with a
    group-local barrier, and one group for all its size-1 kinds."""
    import torch.distributed as dist

    from pretrain.parallel.mesh import Mesh

    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 512)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 77)
    monkeypatch.setattr(dist, "new_group", lambda ranks=None, **kw: calls.append((list(ranks), kw)) or len(calls))
    mesh = Mesh(Layout.from_world(512, tp=8))
    assert len(calls) == 3, calls  # tp (= mp: one replica), dp (= edp), and one group of {77} for pp and ep
    assert all(77 in ranks and kw.get("use_local_synchronization") for ranks, kw in calls)
    assert mesh.ranks["tp"] == list(range(72, 80)) and mesh.ranks["dp"] == list(range(5, 512, 8))
    assert mesh.group("tp") == mesh.group("mp") and mesh.group("pp") == mesh.group("ep") != mesh.group("dp")
