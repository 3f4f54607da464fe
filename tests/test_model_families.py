"""The family registry: a new model family is one folder (here: the definitions below) plus one registration,
and the whole stack (config, validation, data, training, FLOPs, errors) uses it through its spec."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
import torch.nn as nn

from pretrain.config import ConfigError, load_config
from pretrain.models import build_model, family_spec, registry
from pretrain.models.layers import LayerFactory, LocalLayers
from pretrain.models.mlp import MLP
from pretrain.models.moe import MoEConfig
from pretrain.models.output import ModelOutput, lm_output
from pretrain.models.spec import ModelSpec
from pretrain.parallel.parallelize import checkpoint_blocks, keep_blocks, shell

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the toy family's "folder": config, model, spec -------------------------------------------------------

@dataclass
class MLPLMConfig:
    vocab_size: int = 64
    hidden_size: int = 32
    num_layers: int = 2
    activation_checkpointing: str = "none"
    moe: MoEConfig = field(default_factory=MoEConfig)  # no Switch layers

    def validate(self) -> None:
        if self.hidden_size < 1:
            raise ValueError(f"model.hidden_size={self.hidden_size}: must be a positive integer")


class MLPLM(nn.Module):
    """A language model without attention: embed -> residual MLP blocks -> head."""

    def __init__(self, cfg: MLPLMConfig, factory: LayerFactory | None = None):
        super().__init__()
        self.cfg, self.factory = cfg, factory or LocalLayers()
        self.emb = self.factory.embedding(cfg.vocab_size, cfg.hidden_size, 0.02)
        self.blocks = nn.ModuleList(MLP(self.factory, cfg.hidden_size, 2 * cfg.hidden_size, "gelu", True, 0.02, 0.02)
                                    for _ in range(cfg.num_layers))
        self.head = self.factory.lm_head(cfg.hidden_size, cfg.vocab_size, 0.02)

    def forward(self, input_ids, labels, loss_mask=None, position_ids=None, document_ids=None) -> ModelOutput:
        h = self.emb(input_ids)
        for block in self.blocks:
            h = h + block(h)
        return lm_output(self.factory.head_cross_entropy(h, self.head, labels), loss_mask, {}, 0.0, 0.0)


def _stage(model: MLPLM, blocks: range, first: bool, last: bool) -> MLPLM:
    stage = shell(model)
    stage.blocks = keep_blocks(model.blocks, blocks)
    return stage


TOY = ModelSpec(
    name="mlp_lm", config=MLPLMConfig, model=MLPLM, dataset="gpt",
    tp_sizes=lambda cfg: {"model.hidden_size": 2 * cfg.hidden_size, "model.vocab_size": cfg.vocab_size},
    pipeline_blocks=lambda cfg: cfg.num_layers,
    parallelize=lambda m: checkpoint_blocks(m.blocks, m.cfg.activation_checkpointing, 1),
    pipeline_stage=_stage, stage_inputs=lambda batch: (batch["input_ids"],),
    batch_flops=lambda cfg, batch: 6.0 * batch["input_ids"].numel() * 4 * cfg.hidden_size ** 2 * cfg.num_layers,
    param_count=lambda cfg, active: 4 * cfg.hidden_size ** 2 * cfg.num_layers,
)


@pytest.fixture
def toy_family(monkeypatch):
    monkeypatch.setattr(registry, "_SPECS", dict(registry._SPECS))  # the one registration, undone after the test
    registry.register(TOY)
    return TOY


# --- tests --------------------------------------------------------------------------------------------------

def test_toy_family_trains_one_step_through_the_normal_path(toy_family, tmp_path, tiny_shard_prefix,
                                                            tiny_tokenizer):
    from pretrain.train import build_datasets
    from pretrain.trainer import EXIT_OK, Trainer

    cfg = load_config(None, [
        "model.family=mlp_lm", f"model.vocab_size={tiny_tokenizer.vocab_size}", "model.activation_checkpointing=full",
        f"data.train=[{tiny_shard_prefix}]", f"data.tokenizer={tiny_tokenizer.path}", "data.seq_length=16",
        f"data.cache_dir={tmp_path / 'index'}", f"checkpoint.dir={tmp_path / 'run'}", "train.steps=1",
        "train.micro_batch_size=2", "train.global_batch_size=2", "train.device=cpu", "logging.tensorboard=false",
        "schedule.decay=constant", "schedule.rampup_start=null"])
    assert isinstance(cfg.model, MLPLMConfig) and cfg.model.vocab_size == tiny_tokenizer.vocab_size
    torch.manual_seed(0)
    trainer = Trainer(cfg, *build_datasets(cfg))
    before = {n: p.detach().clone() for n, p in trainer.engine.model.named_parameters()}
    assert trainer.fit() == EXIT_OK and trainer.step == 1
    assert "forward" in vars(trainer.engine.model.blocks[0])  # the spec's parallelize step ran
    changed = [n for n, p in trainer.engine.model.named_parameters() if not torch.equal(p, before[n])]
    assert sorted(changed) == sorted(before)  # one optimizer step moved every parameter


def test_toy_family_in_validation_and_errors(toy_family):
    from pretrain.parallel.validate import validate

    with pytest.raises(ConfigError, match=r"parallel.tp=3 does not divide model.hidden_size=64"):
        validate(load_config(None, ["model.family=mlp_lm", "parallel.tp=3"]))
    with pytest.raises(ConfigError, match=r"parallel.pp=2 x vpp=1 stages need at least that many layers; the "
                                          r"model has 1"):
        validate(load_config(None, ["model.family=mlp_lm", "model.num_layers=1", "parallel.pp=2"]))
    with pytest.raises(ConfigError, match="model.hidden_size=0: must be a positive integer"):
        build_model("mlp_lm", {"hidden_size": 0})
    with pytest.raises(ConfigError, match="one of encoder, gpt, mlp_lm, t5"):  # the registered families, nothing else
        load_config(None, ["model.vocab_size=8"])


def test_missing_family_lists_the_registered_ones():
    with pytest.raises(ConfigError, match=r"model.family is required: set it to one of encoder, gpt, t5 "):
        load_config(None, ["model.vocab_size=8"])
    with pytest.raises(ConfigError, match="unknown model family 'bert'; set model.family to one of encoder, gpt, t5"):
        family_spec("bert")


@pytest.mark.parametrize("family,cfg", [
    ("gpt", dict(vocab_size=48, hidden_size=32, num_layers=4, num_heads=4, max_seq_len=16, tie_embeddings=True,
                 flavour="llama", ffn_hidden_size=64, document_masking=True,
                 moe=dict(num_experts=2, every=2, jitter=0.0))),
    ("t5", dict(vocab_size=48, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
                moe=dict(num_experts=2, every=2, jitter=0.0))),
])
def test_pipeline_stages_are_the_cut_model(family, cfg):
    """Stages chained by hand give the whole model's logits; every parameter is in exactly one stage (a tied or
    shared embedding in two) under the whole model's name."""
    from pretrain.parallel.stage import split_model

    torch.manual_seed(0)
    model = build_model(family, cfg).eval()
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(0, 48, (2, 12), generator=g), "labels": torch.zeros(2, 12, dtype=torch.long)}
    if family == "t5":
        batch.update(decoder_input_ids=torch.randint(0, 48, (2, 6), generator=g), attention_mask=torch.ones(2, 12))
    else:  # packed documents: positions (RoPE on every stage) and document masks travel between the stages
        batch.update(document_ids=(torch.arange(12) >= 5).long().expand(2, -1),
                     position_ids=torch.cat([torch.arange(5), torch.arange(7)]).expand(2, -1))
    names = dict(model.named_parameters())
    stages = split_model(model, [0, 1, 2, 3], 4)
    x = stages[0].inputs(batch)
    with torch.no_grad():
        for stage in stages:
            x = stage(*(x if isinstance(x, tuple) else (x,)))
        want = model.logits(*[batch[k] for k in ("input_ids", "decoder_input_ids", "position_ids", "document_ids")
                              if k in batch])
    torch.testing.assert_close(x, want, rtol=0, atol=1e-6)
    held = [n for s in stages for n, p in s.named_parameters() if p is names[n]]
    assert set(held) == set(names)
    assert len(held) - len(names) == (1 if family == "gpt" else 2)  # GPT: tied embedding; T5: 2 bias tables
    assert [len(s.aux_losses) for s in stages] == [0, 1, 0, 1]  # the Switch layers (blocks 1, 3) report aux
