"""MoE <-> Hugging Face (issue 16): the tiny Mixtral, Qwen2-MoE and DeepSeek-style configs export with logits equal
to transformers' and import back to the same model; HF models of each class import with equal logits and export
back exactly; what a class cannot compute is refused naming the field; the realistic configs have the published
total and active parameter counts, exactly those of transformers' classes."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch

from pretrain import checkpoint as ckpt_io
from pretrain.cli import main as cli_main
from pretrain.config import load_config
from pretrain.hf.configs import QWEN2_MOE, UnsupportedConfig
from pretrain.hf.export import export
from pretrain.hf.importer import import_hf
from pretrain.hf.moe import DEEPSEEK_V3, GLM4_MOE, MIXTRAL, QWEN3_MOE
from pretrain.hf.tokenizer import save_hf_tokenizer
from pretrain.models import build_model
from pretrain.models.flops import gpt_param_count
from pretrain.models.gpt import hf as gpt_hf
from tests.test_hf_export import make_checkpoint
from tests.test_hf_import import IGNORED, _save_hf, _state

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STYLES = {"mixtral_tiny": MIXTRAL, "qwen_moe_tiny": QWEN2_MOE, "qwen3_moe_tiny": QWEN3_MOE,
          "deepseek_moe_tiny": GLM4_MOE}


def _model_section(name: str, **moe) -> dict:
    model = load_config(CONFIGS / f"{name}.yaml").to_dict()["model"]
    model.pop("family")
    model["moe"].update(moe)
    return model


def _sharpen(model: torch.nn.Module) -> None:
    """Make routing decisive (larger router logits) and the expert bias non-zero, so a wrong mapping shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.router") or name.endswith("shared_gate"):
                p.mul_(30)
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.copy_(torch.randn_like(b) * 0.05)


@pytest.mark.parametrize("name", list(STYLES))
def test_moe_export_logits_match_and_import_back(tmp_path, tiny_tokenizer, name):
    import transformers

    model, step = make_checkpoint(tmp_path / "ckpt", "gpt", _model_section(name), Path(tiny_tokenizer.path))
    _sharpen(model)
    _, _, meta = ckpt_io.load_checkpoint(step)
    ckpt_io.save_checkpoint(tmp_path / "ckpt", 8, model.state_dict(), {}, meta)
    out = export(tmp_path / "ckpt", tmp_path / "hf")
    arch = STYLES[name]
    assert json.loads((out / "config.json").read_text())["architectures"] == [arch]
    hf = getattr(transformers, arch).from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([tiny_tokenizer.encode(" ".join(["the quick brown fox jumps over the lazy dog"] * 8))[:96]])
    with torch.no_grad():
        ours, theirs = model.logits(ids), hf(input_ids=ids).logits
    diff = (ours - theirs).abs().max().item()
    print(f"{name}: {arch} max |logit diff| = {diff:.2e} (max |logit| {ours.abs().max():.2f})")
    assert diff <= 1e-4
    assert hf.generate(ids[:, :8], max_new_tokens=6, min_new_tokens=6, do_sample=False).tolist() == \
        model.generate(ids[:, :8], 6).tolist()
    # and back: the exported directory imports to exactly our weights, hence the same logits
    back = import_hf(out, tmp_path / "back")
    state, _, back_meta = ckpt_io.load_checkpoint(back)
    assert sorted(state) == sorted(model.state_dict())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    again = build_model("gpt", {k: v for k, v in back_meta["config"]["model"].items() if k != "family"})
    again.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(again.eval().logits(ids), ours)


def test_export_architecture_flag(tmp_path, tiny_tokenizer):
    """``--architecture`` writes another class that computes the same function: Mixtral-style as Qwen2-MoE."""
    import transformers

    model, _ = make_checkpoint(tmp_path / "ckpt", "gpt", _model_section("mixtral_tiny"), Path(tiny_tokenizer.path))
    assert cli_main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--architecture", QWEN2_MOE]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [QWEN2_MOE]
    hf = transformers.Qwen2MoeForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.randint(4, 1000, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model.logits(ids) - hf(input_ids=ids).logits).abs().max().item() <= 1e-4


def _hf_configs() -> dict:
    import transformers as T

    common = dict(vocab_size=1000, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1,
                  eos_token_id=2, pad_token_id=3, output_router_logits=False)
    rope = {"rope_type": "default", "rope_theta": 1e5}
    return {
        MIXTRAL: T.MixtralConfig(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                                 rope_parameters=rope, sliding_window=None, router_jitter_noise=0.0,
                                 router_aux_loss_coef=0.02, architectures=[MIXTRAL], **common),
        QWEN2_MOE: T.Qwen2MoeConfig(intermediate_size=56, moe_intermediate_size=24, num_experts=6,
                                    shared_expert_intermediate_size=40, num_experts_per_tok=3, norm_topk_prob=False,
                                    decoder_sparse_step=1, mlp_only_layers=[0], qkv_bias=False,
                                    use_sliding_window=False, router_aux_loss_coef=0.001, rope_parameters=rope,
                                    architectures=[QWEN2_MOE], **common),
        QWEN3_MOE: T.Qwen3MoeConfig(intermediate_size=56, moe_intermediate_size=24, num_experts=6,
                                    num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=2,
                                    mlp_only_layers=[], head_dim=8, attention_bias=False, use_sliding_window=False,
                                    router_aux_loss_coef=0.001, rope_parameters=rope, architectures=[QWEN3_MOE],
                                    **common),
        GLM4_MOE: T.Glm4MoeConfig(intermediate_size=56, moe_intermediate_size=16, n_routed_experts=8,
                                  n_shared_experts=2, num_experts_per_tok=3, routed_scaling_factor=2.5, n_group=1,
                                  topk_group=1, first_k_dense_replace=1, norm_topk_prob=True, use_qk_norm=True,
                                  attention_bias=False, head_dim=8,
                                  rope_parameters=dict(rope, partial_rotary_factor=1.0),
                                  architectures=[GLM4_MOE], **common),
    }


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory, tiny_tokenizer) -> Path:
    out = tmp_path_factory.mktemp("tok") / "hf"
    save_hf_tokenizer(Path(tiny_tokenizer.path), out)
    return out


@pytest.mark.parametrize("arch", [MIXTRAL, QWEN2_MOE, QWEN3_MOE, GLM4_MOE])
def test_moe_import_matches_transformers_and_exports_back_exactly(tmp_path, hf_tokenizer, arch):
    cfg = _hf_configs()[arch]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = _save_hf(cfg, tmp_path / "src", hf_tokenizer)
    hf = _state(src)
    with torch.no_grad():  # decisive routing and a non-zero selection bias, saved again
        for name, t in hf.state_dict().items():
            if name.endswith("mlp.gate.weight") or name.endswith("shared_expert_gate.weight"):
                t.normal_(0, 0.5)
            if name.endswith("e_score_correction_bias"):
                t.normal_(0, 0.05)
    hf.save_pretrained(src)
    step = import_hf(src, tmp_path / "ckpt")
    state, _, meta = ckpt_io.load_checkpoint(step)
    ours = build_model("gpt", {k: v for k, v in meta["config"]["model"].items() if k != "family"}).eval()
    ours.load_state_dict(state)
    ids = torch.randint(4, 1000, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours.logits(ids) - hf(input_ids=ids).logits).abs().max().item()
    print(f"{arch}: import max |logit diff| = {diff:.2e}")
    assert diff <= 1e-4
    assert cli_main(["export", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 0
    back = _state(tmp_path / "out").state_dict()
    assert sorted(back) == sorted(hf.state_dict())
    assert all(torch.equal(back[k], v) for k, v in hf.state_dict().items())
    orig = json.loads((src / "config.json").read_text())
    again = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {k: (orig[k], again.get(k)) for k in orig if k not in IGNORED and orig[k] != again.get(k)} == {}


MOE = dict(num_experts=4, every=1, top_k=2, dropless=True, jitter=0.0)
LLAMA = dict(flavour="llama", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
             max_seq_len=64)


@pytest.mark.parametrize("family,values,arch,field", [
    ("gpt", dict(LLAMA, moe=dict(MOE, normalize_top_k=True, shared_ffn_size=32)), MIXTRAL, "model.moe.shared_ffn_size"),
    ("gpt", dict(LLAMA, moe=dict(MOE, normalize_top_k=True, every=2)), MIXTRAL, "model.moe.every"),
    ("gpt", dict(LLAMA, moe=dict(MOE, normalize_top_k=False)), MIXTRAL, "model.moe.normalize_top_k"),
    ("gpt", dict(LLAMA, moe=dict(MOE, score="sigmoid")), QWEN2_MOE, "model.moe.score"),
    ("gpt", dict(LLAMA, moe=dict(MOE, bias_update_rate=1e-3)), QWEN2_MOE, "model.moe.bias_update_rate"),
    ("gpt", dict(LLAMA, moe=dict(MOE, normalize_top_k=True, routed_scale=2.0)), MIXTRAL, "model.moe.routed_scale"),
    ("gpt", dict(LLAMA, moe=dict(MOE, shared_ffn_size=32)), QWEN2_MOE, "model.moe.shared_gate"),
    ("gpt", dict(LLAMA, moe=dict(MOE, score="sigmoid", shared_ffn_size=32, shared_gate=True)), None,
     "model.moe.shared_gate"),
    ("gpt", dict(LLAMA, moe=dict(MOE, score="sigmoid", expert_ffn_size=16, shared_ffn_size=24)), None,
     "model.moe.shared_ffn_size"),
    ("gpt", dict(LLAMA, moe=dict(MOE, score="sigmoid", every=2)), None, "model.moe.every"),
    ("gpt", dict(LLAMA, moe=dict(MOE, score="sigmoid")), DEEPSEEK_V3, "kv_lora_rank"),
    ("gpt", dict(LLAMA, moe=dict(MOE, normalize_top_k=True)), QWEN3_MOE, "model.qk_norm=false"),
    ("gpt", dict(LLAMA, qk_norm=True, moe=dict(MOE, normalize_top_k=True)), MIXTRAL, "model.qk_norm=true"),
    ("gpt", dict(LLAMA, qk_norm=True), None, "model.qk_norm=true"),
    ("gpt", dict(LLAMA, moe=MOE), "LlamaForCausalLM", "model.moe.num_experts"),
    ("gpt", LLAMA, MIXTRAL, "model.moe.num_experts=0"),
    ("gpt", dict(LLAMA, sparse=dict(pattern="sliding_window", window=8), moe=dict(MOE, normalize_top_k=True)),
     MIXTRAL, "model.sparse.pattern"),
    ("gpt", LLAMA, "BertForMaskedLM", "--architecture"),
    ("t5", dict(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, activation="relu", moe=MOE), None,
     "model.moe.top_k"),
    ("t5", dict(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, activation="relu",
                moe=dict(MOE, top_k=1, shared_ffn_size=16)), None, "model.moe.shared_ffn_size"),
])
def test_moe_export_refuses_what_the_class_cannot_compute(tmp_path, tiny_tokenizer, family, values, arch, field):
    make_checkpoint(tmp_path / "ckpt", family, values, Path(tiny_tokenizer.path))
    with pytest.raises(UnsupportedConfig, match=field.replace(".", r"\.")):
        export(tmp_path / "ckpt", tmp_path / "hf", architecture=arch)
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("arch,change,field", [
    (QWEN3_MOE, dict(attention_bias=True), "attention_bias"),
    (DEEPSEEK_V3, {}, "kv_lora_rank"),
    (GLM4_MOE, dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     "partial_rotary_factor"),
    (GLM4_MOE, dict(n_group=2, topk_group=1), "n_group"),
    (QWEN2_MOE, dict(mlp_only_layers=[1]), "mlp_only_layers"),
    (QWEN2_MOE, dict(qkv_bias=True), "qkv_bias"),
    (MIXTRAL, dict(sliding_window=16), "sliding_window"),
])
def test_moe_import_refuses_by_field(tmp_path, arch, change, field):
    import transformers as T

    configs = _hf_configs()
    cfg = configs[arch] if arch in configs else getattr(T, gpt_hf.HF.classes[arch])(architectures=[arch])
    for key, value in change.items():
        setattr(cfg, key, value)
    cfg.save_pretrained(tmp_path / "hf")
    with pytest.raises(UnsupportedConfig, match=field):
        import_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


PUBLISHED = {  # config: (total, active) in billions as published, the HF class that counts it exactly
    "mixtral_8x7b": (46.7, 12.9, MIXTRAL),  # Mistral AI, "Mixtral of experts" (2023)
    "qwen_moe_a2.7b": (14.3, 2.7, QWEN2_MOE),  # Qwen team, "Qwen1.5-MoE" (2024), less its 147K qkv biases
    "deepseek_moe_16b": (16.4, 2.8, GLM4_MOE),  # Dai et al. 2024; softmax router, counted by Glm4-MoE's layout
    "olmoe_1b_7b": (6.9, 1.3, QWEN3_MOE),  # Muennighoff et al. 2024 (its q/k norms span all heads: 61K more)
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_realistic_moe_configs_have_the_published_parameter_counts(name):
    """Rounded as published (3 significant digits), and exactly the number of parameters transformers' class
    builds for the exported config (on the meta device)."""
    import transformers

    total, active, arch = PUBLISHED[name]
    cfg = load_config(CONFIGS / f"{name}.yaml").model
    assert (round(gpt_param_count(cfg) / 1e9, 1), round(gpt_param_count(cfg, True) / 1e9, 1)) == (total, active)
    counted = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, score="sigmoid")) if arch == GLM4_MOE else cfg
    hf_config = getattr(transformers, gpt_hf.HF.classes[arch])(**gpt_hf.to_config(counted, arch, {}))
    with torch.device("meta"):
        hf = getattr(transformers, arch)(hf_config)
    assert sum(p.numel() for p in hf.parameters()) == gpt_param_count(cfg)
