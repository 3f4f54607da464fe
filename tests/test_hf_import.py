"""HF -> our checkpoint: Llama, GPT-2 and T5 import; import -> export reproduces the HF weights exactly;
unsupported architectures and settings are refused by name; SmolLM2-135M (a real pretrained model) round trip."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from pretrain.cli import main as cli_main
from pretrain.hf.configs import UnsupportedConfig
from pretrain.hf.export import export
from pretrain.hf.importer import import_hf
from pretrain.hf.tokenizer import save_hf_tokenizer


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory) -> Path:
    """HF tokenizer files converted from a small sentencepiece model trained on CPython source."""
    root = tmp_path_factory.mktemp("tok")
    text = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text(encoding="utf-8")
    spm.SentencePieceTrainer.train(sentence_iterator=iter([s for s in text.split("\n") if s.strip()]),
                                   model_prefix=str(root / "sp"), vocab_size=400, byte_fallback=True,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=3, num_threads=1, minloglevel=2)
    save_hf_tokenizer(root / "sp.model", root / "hf")
    return root / "hf"


def _hf_configs():
    import transformers as T

    common = dict(vocab_size=400, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    return {
        "llama": T.LlamaConfig(hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                               rope_parameters={"rope_type": "default", "rope_theta": 1e5},
                               tie_word_embeddings=False, architectures=["LlamaForCausalLM"], **common),
        "gpt2": T.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, layer_norm_epsilon=1e-5,
                             architectures=["GPT2LMHeadModel"], **common),
        "t5": T.T5Config(d_model=64, d_kv=16, d_ff=80, num_layers=2, num_decoder_layers=3, num_heads=4,
                         feed_forward_proj="gated-gelu", decoder_start_token_id=3,
                         architectures=["T5ForConditionalGeneration"], **common),
    }


def _save_hf(cfg, out: Path, tok_dir: Path, seed: int = 0) -> Path:
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, cfg.architectures[0])(cfg)
    with torch.no_grad():  # make norms and biases non-trivial so a dropped or swapped tensor shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)
    for f in tok_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


def _state(hf_dir: Path):
    import transformers

    arch = json.loads((hf_dir / "config.json").read_text())["architectures"][0]
    return getattr(transformers, arch).from_pretrained(hf_dir, dtype=torch.float32).eval()


# Config fields that may differ after a round trip: bookkeeping, training-only dropout (our models have none, so
# export writes 0), and GPT-2's n_inner=None which export writes out as the 4*n_embd it means.
IGNORED = {"transformers_version", "dtype", "attn_pdrop", "embd_pdrop", "resid_pdrop", "dropout_rate", "n_inner"}


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5"])
def test_import_export_round_trip_exact(tmp_path, hf_tokenizer_dir, name):
    cfg = _hf_configs()[name]
    src = _save_hf(cfg, tmp_path / "src", hf_tokenizer_dir)
    assert cli_main(["import", str(src), str(tmp_path / "ckpt")]) == 0
    assert cli_main(["export", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 0
    a, b = _state(src), _state(tmp_path / "out")
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])][:3]
    orig = json.loads((src / "config.json").read_text())
    back = json.loads((tmp_path / "out" / "config.json").read_text())
    changed = {k: (orig[k], back.get(k)) for k in orig if k not in IGNORED and orig[k] != back.get(k)}
    assert changed == {}
    ids = torch.tensor([[5, 17, 42, 99, 7, 300, 12, 8]])
    with torch.no_grad():
        kw = dict(decoder_input_ids=ids[:, :4]) if name == "t5" else {}
        assert torch.equal(a(input_ids=ids, **kw).logits, b(input_ids=ids, **kw).logits)


def test_import_refuses_unsupported(tmp_path, hf_tokenizer_dir):
    import transformers as T

    bert = tmp_path / "electra"  # an encoder architecture no family imports (BERT's are: the encoder family)
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"architectures": ["ElectraForMaskedLM"], "model_type": "electra"}))
    with pytest.raises(UnsupportedConfig, match="ElectraForMaskedLM"):
        import_hf(bert, tmp_path / "c1")
    moe = T.Qwen2MoeConfig(vocab_size=400, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           architectures=["Qwen2MoeForCausalLM"])
    moe.save_pretrained(tmp_path / "moe")
    with pytest.raises(UnsupportedConfig, match="Qwen2MoeForCausalLM"):
        import_hf(tmp_path / "moe", tmp_path / "c2")
    biased = _hf_configs()["llama"]
    biased.attention_bias = True
    _save_hf(biased, tmp_path / "biased", hf_tokenizer_dir)
    with pytest.raises(UnsupportedConfig, match="attention_bias"):
        import_hf(tmp_path / "biased", tmp_path / "c3")
    assert not (tmp_path / "c3" / "latest").exists()
    assert cli_main(["import", str(bert), str(tmp_path / "c4")]) == 1


@pytest.mark.slow
def test_smollm2_import_train_export(tmp_path):
    """A real pretrained model: import SmolLM2-135M, same logits as transformers on real text, exact
    import -> export weights, a few training steps, export again and load the trained weights."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from pretrain.data.demo_corpus import ensure_demo_corpus
    from pretrain import checkpoint as ckpt_io
    from pretrain.hf.export import rules_for
    from pretrain.hf.mapping import to_hf
    from pretrain.hf.smollm2 import ensure_smollm2
    from pretrain.models import build_model

    torch.manual_seed(0)
    src = ensure_smollm2()
    step = import_hf(src, tmp_path / "ckpt")
    state, _, meta = ckpt_io.load_checkpoint(step)
    model_cfg = dict(meta["config"]["model"])
    family = model_cfg.pop("family")
    model = build_model(family, model_cfg)
    model.load_state_dict(state)
    model.eval()
    hf = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(src)
    text = json.loads(open(ensure_demo_corpus(), encoding="utf-8").readline())["text"]
    ids = tok(text, return_tensors="pt")["input_ids"][:, :64]
    with torch.no_grad():
        ours, theirs = model.logits(ids), hf(ids).logits
    diff = (ours - theirs).abs().max().item()
    print(f"SmolLM2-135M: max |logit diff| ours vs transformers = {diff:.2e} (max |logit| {theirs.abs().max():.1f})")
    # 30 fp32 layers and logits up to ~37: measured 9.3e-5 absolute, 2.5e-6 relative (fp32 summation order)
    assert diff <= 1e-5 * theirs.abs().max().item()
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))

    # the export table maps the imported weights back to exactly the original ones (in memory: one export
    # to disk below is enough for a 540 MB model)
    table, alias = rules_for(family, model.cfg, "LlamaForCausalLM")
    original, back = hf.state_dict(), to_hf(state, table, alias)
    assert sorted(original) == sorted(back) and all(torch.equal(original[k], back[k]) for k in original)
    del back

    # continued pretraining: a few AdamW steps on the same real text
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = dict(input_ids=ids[:, :-1], labels=ids[:, 1:])
    losses = []
    for _ in range(3):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    ckpt_io.save_checkpoint(tmp_path / "ckpt", 3, model.state_dict(), {}, {**meta, "step": 3})
    out = export(tmp_path / "ckpt", tmp_path / "hf3")
    trained = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        assert (model.logits(ids) - trained.eval()(ids).logits).abs().max().item() <= 1e-5 * 40
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == tok(text)["input_ids"]
    assert json.loads((out / "config.json").read_text())["rms_norm_eps"] == hf.config.rms_norm_eps
