"""A training forward+backward of every model family runs without a host sync or a data-dependent shape.

On a GPU each ``.item()`` / ``.nonzero()`` stalls the CPU until the GPU catches up; on CPU they are visible as
dispatcher ops (:class:`tests.host_syncs.HostSyncCounter`).
"""

import pytest
import torch

from pretrain.models import build_model
from pretrain.models.moe import MoEConfig, SwitchMLP
from tests.host_syncs import HostSyncCounter

V = 48
GPT_TINY = dict(vocab_size=V, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, max_seq_len=32)
T5_TINY = dict(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)
SWITCH = dict(moe=dict(num_experts=4, every=2, capacity_factor_train=0.5))  # capacity 0.5: tokens are dropped
MODELS = {
    "gpt_documents": ("gpt", dict(GPT_TINY, document_masking=True)),
    "switch_gpt_documents": ("gpt", dict(GPT_TINY, document_masking=True, **SWITCH)),
    "t5": ("t5", T5_TINY),
    "switch_t5": ("t5", dict(T5_TINY, **SWITCH)),
}


def _batch(family: str, b: int = 2, s: int = 16) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (b, s + 1), generator=g)
    if family == "gpt":
        docs = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 16])
        return dict(input_ids=ids[:, :-1], labels=ids[:, 1:], loss_mask=torch.ones(b, s), document_ids=docs)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, -3:] = 0
    dec = torch.randint(0, V, (b, s // 2 + 1), generator=g)
    return dict(input_ids=ids[:, :-1], attention_mask=mask, decoder_input_ids=dec[:, :-1], labels=dec[:, 1:],
                loss_mask=torch.ones(b, s // 2))


@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_has_no_host_sync(name):
    family, cfg = MODELS[name]
    torch.manual_seed(0)
    model = build_model(family, cfg).train()
    batch = _batch(family)
    with HostSyncCounter() as syncs:
        out = model(**batch)
        out.loss.backward()
    assert syncs.ops == []
    if "switch" in name:
        assert out.metrics["moe_drop_frac"] > 0  # the dropping path ran


def test_switch_dispatch_has_no_host_sync():
    torch.manual_seed(0)
    layer = SwitchMLP(MoEConfig(num_experts=4, capacity_factor_train=0.5), dim=8, hidden=16, activation="gelu",
                      bias=True, in_std=0.1, out_std=0.1)
    x = torch.randn(2, 10, 8, requires_grad=True)
    with HostSyncCounter() as syncs:
        y, aux = layer(x)
        y.sum().backward()
    assert syncs.ops == [] and aux["drop_frac"] > 0
