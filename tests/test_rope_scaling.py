"""RoPE base and scaling (pretrain.models.rope): each scaling type gives transformers' logits on a sequence longer
than the original context (fp32, <= 1e-4), the HF config carries it (rope_parameters) and imports back to the
same values, and bad scaling configs are refused naming the key."""

from __future__ import annotations

import pytest
import torch

from pretrain.config import ConfigError, dataclass_from_dict, from_dict
from pretrain.hf import configs
from pretrain.hf.mapping import to_hf
from pretrain.models import build_model, config_class, registry

BASE = dict(flavour="llama", vocab_size=96, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
            ffn_hidden_size=48, max_seq_len=64, rope_theta=5000.0, norm_eps=1e-5, init_std=0.2)
SCALINGS = {
    "linear": dict(type="linear", factor=4.0),
    "dynamic": dict(type="dynamic", factor=4.0, original_max_seq_len=16),
    "yarn": dict(type="yarn", factor=4.0, original_max_seq_len=16),
    "yarn_explicit": dict(type="yarn", factor=4.0, original_max_seq_len=16, beta_fast=16.0, beta_slow=2.0,
                          attention_factor=1.25),
    "llama3": dict(type="llama3", factor=4.0, original_max_seq_len=16, low_freq_factor=1.0, high_freq_factor=4.0),
}
SEQ = 48  # three times the original context


def hf_model(cfg, arch=None):
    """Our GPT config -> the transformers model ``pretrain export`` writes (same config translation and weights)."""
    import transformers

    spec = registry.family_spec("gpt").hf
    arch = arch or spec.architecture(cfg)
    kwargs = spec.to_config(cfg, arch, dict(bos_token_id=1, eos_token_id=2, pad_token_id=3))
    config = getattr(transformers, spec.classes[arch])(**kwargs, architectures=[arch])
    return config, getattr(transformers, arch)(config).eval(), spec


def build(values: dict):
    cfg = dataclass_from_dict(config_class("gpt"), values, "model")
    cfg.validate()
    torch.manual_seed(0)
    return cfg, build_model("gpt", cfg).eval()


@pytest.mark.parametrize("name", list(SCALINGS))
def test_scaled_rope_matches_transformers_beyond_original_context(tmp_path, name):
    import transformers

    cfg, model = build(dict(BASE, rope_scaling=SCALINGS[name]))
    config, hf, spec = hf_model(cfg)
    table, alias = spec.rules(cfg, configs.LLAMA)
    hf.load_state_dict(to_hf(model.state_dict(), table, alias), strict=True)
    assert config.rope_parameters["rope_type"] == SCALINGS[name]["type"]
    ids = torch.randint(0, 96, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model.logits(ids), hf(input_ids=ids).logits
        plain = build(BASE)[1].logits(ids)
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (ours - plain).abs().max().item() > 1e-2  # the scaling changed the model

    # the config survives config.json and imports back to the same values
    config.save_pretrained(tmp_path)
    again = transformers.AutoConfig.from_pretrained(tmp_path)
    back = dataclass_from_dict(config_class("gpt"), dict(spec.from_config[configs.LLAMA](again), vocab_size=96),
                               "model")
    assert back.rope_scaling.type == cfg.rope_scaling.type and back.rope_theta == cfg.rope_theta
    for key in ("factor", "original_max_seq_len", "beta_fast", "beta_slow", "low_freq_factor", "high_freq_factor"):
        assert getattr(back.rope_scaling, key) == getattr(cfg.rope_scaling, key), key
    assert back.rope_scaling.yarn_attention_factor() == pytest.approx(cfg.rope_scaling.yarn_attention_factor())
    assert back.max_seq_len == cfg.max_seq_len


def test_dynamic_scaling_leaves_short_sequences_alone():
    """Within the original context dynamic NTK is plain RoPE (transformers resets to the original frequencies)."""
    ids = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        scaled = build(dict(BASE, rope_scaling=SCALINGS["dynamic"]))[1].logits(ids)
        plain = build(BASE)[1].logits(ids)
    assert torch.equal(scaled, plain)


def test_import_refuses_what_it_cannot_reproduce():
    import transformers

    spec = registry.family_spec("gpt").hf
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=64)
    longrope = transformers.LlamaConfig(**common, rope_parameters={
        "rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
        "original_max_position_embeddings": 16})
    with pytest.raises(configs.UnsupportedConfig, match="rope_type='longrope'"):
        spec.from_config[configs.LLAMA](longrope)
    mscale = transformers.LlamaConfig(**common, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 16,
        "mscale": 0.7, "mscale_all_dim": 0.7})
    with pytest.raises(configs.UnsupportedConfig, match="rope_parameters.mscale"):
        spec.from_config[configs.LLAMA](mscale)


@pytest.mark.parametrize("scaling,message", [
    (dict(type="ntk"), "model.rope_scaling.type='ntk'"),
    (dict(type="none", factor=2.0), "model.rope_scaling.factor=2.0 with model.rope_scaling.type=none"),
    (dict(type="linear", factor=0.5), "model.rope_scaling.factor=0.5: must be >= 1"),
    (dict(type="yarn", factor=4.0), "model.rope_scaling.type=yarn needs model.rope_scaling.original_max_seq_len"),
    (dict(type="llama3", factor=4.0, original_max_seq_len=128), r"original_max_seq_len=128: must be in \[1, "),
    (dict(type="yarn", factor=4.0, original_max_seq_len=16, beta_fast=1.0), "model.rope_scaling.beta_fast=1.0"),
    (dict(type="llama3", factor=4.0, original_max_seq_len=16, low_freq_factor=4.0),
     "model.rope_scaling.high_freq_factor=4.0 must be above"),
])
def test_bad_scaling_configs_are_refused_by_name(scaling, message):
    raw = {"model": dict(BASE, family="gpt", rope_scaling=scaling), "data": {"seq_length": 64}}
    with pytest.raises(ConfigError, match=message):
        from_dict(raw)


def test_scaling_needs_the_llama_flavour():
    gpt2 = dict(BASE, family="gpt", flavour="gpt2", rope_scaling=dict(type="linear", factor=2.0))
    with pytest.raises(ConfigError, match="model.rope_scaling.type needs model.flavour=llama"):
        from_dict({"model": gpt2, "data": {"seq_length": 64}})
