"""HF export: the sentencepiece -> HF tokenizer gives the same ids on real text (Shakespeare/KJV prose and Python
code: indentation, whitespace runs, blank lines, digits); every architecture exports with logits equal to ours;
configs that cannot be represented exactly are refused by name."""

from __future__ import annotations

import json
import os
import sysconfig
from itertools import islice
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from pretrain.data.tokenizer import train_sentencepiece
from pretrain import checkpoint as ckpt_io
from pretrain.checkpoint import CheckpointError
from pretrain.config import Config
from pretrain.hf import configs
from pretrain.hf.export import export
from pretrain.hf.tokenizer import save_hf_tokenizer
from pretrain.config import dataclass_from_dict
from pretrain.models import build_model, config_class

LLAMA_STYLE = dict(normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
                   allow_whitespace_only_pieces=True)


@pytest.fixture(scope="module")
def real_text() -> list[str]:
    """~4,000 prose lines (demo corpus) and ~4,000 lines of CPython source, plus multi-line chunks."""
    from pretrain.data.demo_corpus import ensure_demo_corpus

    docs = [json.loads(line)["text"] for line in islice(open(ensure_demo_corpus(), encoding="utf-8"), 0, 3000, 25)]
    prose = [line for doc in docs for line in doc.split("\n")][:4000]
    std = Path(sysconfig.get_paths()["stdlib"])
    code = "".join((std / f).read_text(encoding="utf-8") for f in ("textwrap.py", "argparse.py", "calendar.py"))
    code_lines = code.split("\n")[:4000]
    chunks = [code[i:i + 2000] for i in range(0, 40000, 2000)] + ["\n\n".join(docs[:3])]
    edge = ["   The PCI", " leading", "a  b   c", "\tx\t\ty", "x\ny\n\n z ", "1234567 89.01", "", " ", "  \n",
            "naïve café ☃ 日本語 \u00a0nbsp", "ﬁ ligature ①"]
    return prose + code_lines + chunks + edge


def _mismatches(sp_model: Path, out_dir: Path, lines: list[str]) -> list[str]:
    from transformers import AutoTokenizer

    save_hf_tokenizer(sp_model, out_dir, model_max_length=256)
    hf = AutoTokenizer.from_pretrained(out_dir)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    return [s for s in lines if hf(s, add_special_tokens=True)["input_ids"] != sp.encode(s)]


def _train_sp(tmp_path: Path, lines: list[str], name: str, **options) -> Path:
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / name),
                                   vocab_size=1500, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
                                   num_threads=1, minloglevel=2, **options)
    return tmp_path / f"{name}.model"


def _train_lines(real_text):
    return [s for s in real_text if s.strip() and len(s) < 4000]


def test_project_tokenizer_ids_match(tmp_path, real_text):
    """The project's trainer (data.tokenizer, with T5 sentinels): every text encodes identically."""
    tok = train_sentencepiece(_train_lines(real_text), tmp_path / "tok", vocab_size=1500, t5_sentinels=True,
                              num_threads=1, verbose=False)
    bad = _mismatches(Path(tok.path), tmp_path / "hf", real_text)
    assert bad == [], f"{len(bad)}/{len(real_text)} texts differ, e.g. {bad[:3]!r}"


NORMALISATIONS = {
    "llama_style": LLAMA_STYLE,  # identity: leading spaces, whitespace runs and newlines survive
    "nmt_nfkc_default": {},  # sentencepiece's default: NFKC + collapsing/stripping whitespace
    "identity_no_dummy_prefix": dict(normalization_rule_name="identity", remove_extra_whitespaces=False,
                                     add_dummy_prefix=False),
}


@pytest.mark.parametrize("options", list(NORMALISATIONS))
def test_bpe_tokenizer_ids_match(tmp_path, real_text, options):
    """Sentencepiece BPE under each normaliser setting: identical ids on every text."""
    model = _train_sp(tmp_path, _train_lines(real_text), "bpe", model_type="bpe", **NORMALISATIONS[options])
    bad = _mismatches(model, tmp_path / "hf", real_text)
    assert bad == [], f"{len(bad)}/{len(real_text)} texts differ, e.g. {bad[:3]!r}"


def test_decode_and_specials(tmp_path, real_text):
    from transformers import AutoTokenizer

    model = _train_sp(tmp_path, _train_lines(real_text)[:3000], "llama", model_type="bpe", **LLAMA_STYLE)
    save_hf_tokenizer(model, tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    sp = spm.SentencePieceProcessor(model_file=str(model))
    for s in ["   indented line", "two  spaces\n\nnew para 42", real_text[5]]:
        assert hf.decode(hf(s)["input_ids"]) == sp.decode(sp.encode(s)) == s
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (1, 2, 3, 0)
    assert len(hf) == sp.get_piece_size()


def test_unigram_differs_only_on_score_ties(tmp_path, real_text):
    """Unigram Viterbi ties (equal total score) are broken differently by sentencepiece and HF; anything else
    would be a conversion bug. BPE (the project default) has no such ambiguity."""
    model = _train_sp(tmp_path, _train_lines(real_text)[:4000], "uni", model_type="unigram", **LLAMA_STYLE)
    bad = _mismatches(model, tmp_path / "hf", real_text)
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    sp = spm.SentencePieceProcessor(model_file=str(model))
    score = lambda ids: sum(sp.get_score(i) for i in ids)  # noqa: E731
    for s in bad:
        assert score(hf(s)["input_ids"]) == pytest.approx(score(sp.encode(s)), abs=1e-3), s
    assert len(bad) < 0.05 * len(real_text)


# --- model export: random-init ours -> export -> transformers, same logits ------------------------------------

LLAMA = dict(flavour="llama", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=96,
             max_seq_len=128, rope_theta=50000.0, norm_eps=1e-5, tie_embeddings=False)
MOE = dict(num_experts=4, every=2, capacity_factor_eval=4.0)
CASES = {  # name: (family, model config, HF architecture)
    "llama_gqa": ("gpt", LLAMA, configs.LLAMA),
    "llama_tied": ("gpt", dict(LLAMA, num_kv_heads=None, tie_embeddings=True, norm_eps=1e-6), configs.LLAMA),
    "gpt2": ("gpt", dict(flavour="gpt2", hidden_size=64, num_layers=2, num_heads=4, max_seq_len=128,
                         tie_embeddings=True), configs.GPT2),
    "switch_gpt": ("gpt", dict(LLAMA, moe=MOE), configs.QWEN2_MOE),
    "t5": ("t5", dict(d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4, activation="geglu",
                      tie_embeddings=True), configs.T5),
    "switch_t5": ("t5", dict(d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4, activation="relu", moe=MOE),
                  configs.SWITCH),
}


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory, real_text) -> Path:
    tok = train_sentencepiece(_train_lines(real_text)[:4000], tmp_path_factory.mktemp("sp"), vocab_size=600,
                              t5_sentinels=True, num_threads=1, verbose=False)
    return Path(tok.path)


def make_checkpoint(root: Path, family: str, values: dict, tokenizer: Path, seed: int = 0):
    """A random-init model of ours saved as a training checkpoint; returns (model, step dir)."""
    vocab = spm.SentencePieceProcessor(model_file=str(tokenizer)).get_piece_size()
    cfg = dataclass_from_dict(config_class(family), {"vocab_size": vocab, **values}, "model")
    torch.manual_seed(seed)
    model = build_model(family, cfg).eval()
    full = Config(model=cfg, family=family)
    full.data.tokenizer = str(tokenizer)
    path = ckpt_io.save_checkpoint(root, 7, model.state_dict(), {}, {"consumed_samples": 0, "config": full.to_dict()})
    return model, path


def _hf_logits(hf, family, ids, dec):
    with torch.no_grad():
        if family == "t5":
            return hf(input_ids=ids, decoder_input_ids=dec).logits
        return hf(input_ids=ids).logits


def _our_logits(model, family, ids, dec):
    with torch.no_grad():
        return model.logits(ids, dec) if family == "t5" else model.logits(ids)


@pytest.mark.parametrize("name", list(CASES))
def test_export_logits_match(tmp_path, sp_tokenizer, real_text, name):
    import transformers
    from transformers import AutoTokenizer

    family, values, arch = CASES[name]
    model, step = make_checkpoint(tmp_path / "ckpt", family, values, sp_tokenizer)
    out = export(tmp_path / "ckpt", tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [arch]
    hf = getattr(transformers, arch).from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    sp = spm.SentencePieceProcessor(model_file=str(sp_tokenizer))
    text = "\n".join(real_text[100:110])
    ids = tok(text, return_tensors="pt")["input_ids"][:, :96]
    assert ids[0].tolist() == sp.encode(text)[:96]
    dec = ids[:, :24] if family == "t5" else None
    ours, theirs = _our_logits(model, family, ids, dec), _hf_logits(hf, family, ids, dec)
    diff = (ours - theirs).abs().max().item()
    print(f"{name}: {arch} max |logit diff| = {diff:.2e}")
    assert diff <= 1e-4
    # greedy generate() runs and produces our model's tokens (T5: decoder_start_token_id + new tokens)
    prompt = ids[:, :8]
    hf_out = hf.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert hf_out.tolist() == model.generate(prompt, 6).tolist()


@pytest.mark.parametrize("family,values,field", [
    ("gpt", dict(flavour="gpt2", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2), "model.num_kv_heads"),
    ("gpt", dict(flavour="gpt2", hidden_size=32, num_layers=2, num_heads=4, moe=MOE), "model.flavour"),
    ("t5", dict(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4), "tie_word_embeddings"),
    ("t5", dict(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, activation="gelu", tie_embeddings=True),
     "model.activation"),
    ("t5", dict(d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4, activation="relu", moe=dict(MOE, every=3)),
     "model.moe.every"),
    ("gpt", dict(LLAMA, vocab_size=100), "model.vocab_size"),
])
def test_export_refuses_inexact_configs(tmp_path, sp_tokenizer, family, values, field):
    """Configs with no exact HF counterpart are refused naming the field, and nothing is written."""
    make_checkpoint(tmp_path / "ckpt", family, values, sp_tokenizer)
    with pytest.raises(configs.UnsupportedConfig, match=field.replace(".", r"\.")):
        export(tmp_path / "ckpt", tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_export_cli_errors(tmp_path, sp_tokenizer, capsys):
    from pretrain.cli import main

    make_checkpoint(tmp_path / "ckpt", "gpt", LLAMA, sp_tokenizer)
    (tmp_path / "hf").mkdir()
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 1
    assert "exists" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "hf2")]) == 1
    assert "nothing" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--force"]) == 0
    assert (tmp_path / "hf" / "generation_config.json").exists()


def test_switch_export_warns_when_our_capacity_can_drop(tmp_path, sp_tokenizer):
    make_checkpoint(tmp_path / "ckpt", "gpt", dict(LLAMA, moe=dict(MOE, capacity_factor_eval=2.0)), sp_tokenizer)
    with pytest.warns(UserWarning, match="capacity_factor_eval"):
        export(tmp_path / "ckpt", tmp_path / "hf")


def test_export_from_data_parallel_checkpoint(tmp_path, sp_tokenizer):
    """Two ranks save (threads standing in for processes): pure DP exports rank 0's full model; a TP layout is
    saved without a sharding index cannot be consolidated and is refused by name."""
    import threading

    import transformers

    torch.manual_seed(0)
    cfg = dataclass_from_dict(config_class("gpt"), dict(LLAMA, vocab_size=spm.SentencePieceProcessor(
        model_file=str(sp_tokenizer)).get_piece_size()), "model")
    model = build_model("gpt", cfg).eval()
    for tp, root in ((1, tmp_path / "dp"), (2, tmp_path / "tp")):
        full = Config(model=cfg, family="gpt")
        full.data.tokenizer, full.parallel.tp = str(sp_tokenizer), tp
        meta = {"consumed_samples": 0, "config": full.to_dict()}
        barrier = threading.Barrier(2)
        ranks = [threading.Thread(target=ckpt_io.save_checkpoint, args=(root, 3, model.state_dict(), {}, meta),
                                  kwargs=dict(rank=r, world_size=2, barrier=barrier.wait)) for r in range(2)]
        for t in ranks:
            t.start()
        for t in ranks:
            t.join()
    old = os.umask(0o022)
    try:
        out = export(tmp_path / "dp", tmp_path / "hf")
    finally:
        os.umask(old)
    assert {f.stat().st_mode & 0o777 for f in out.iterdir() if f.is_file()} == {0o644}  # weights too
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.arange(5, 40)[None]
    with torch.no_grad():
        assert (hf(ids).logits - model.logits(ids)).abs().max().item() <= 1e-4
    with pytest.raises(CheckpointError, match="parallel.tp=2"):  # split, but saved without a sharding index
        export(tmp_path / "tp", tmp_path / "hf_tp")


def test_export_force_never_deletes_what_it_did_not_write(tmp_path, sp_tokenizer, monkeypatch):
    """OUT_DIR that is, contains or is inside the checkpoint, or the working directory, is refused even with
    --force; --force replaces only an earlier export (and an empty directory)."""
    src = tmp_path / "x" / "ck"
    _, step = make_checkpoint(src, "gpt", LLAMA, sp_tokenizer)
    (tmp_path / "x" / "notes.txt").write_text("mine")
    work = tmp_path / "y"
    work.mkdir()
    (work / "data.txt").write_text("mine")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    for out, why in ((src, "is or contains the checkpoint"), (step, "inside the checkpoint"),
                     (tmp_path / "x", "is or contains the checkpoint"), (src / "hf", "inside the checkpoint"),
                     (Path("."), "the working directory"), (Path(".."), "the working directory"),
                     (theirs, "not an earlier export")):
        with pytest.raises(FileExistsError, match=why):
            export(src, out, force=True)
    assert (tmp_path / "x" / "notes.txt").exists() and (work / "data.txt").exists() and (theirs / "keep.txt").exists()
    assert ckpt_io.load_checkpoint(step)[2]["step"] == 7
    export(src, tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text("{}")  # an earlier export, edited: replaced as a whole
    export(src, tmp_path / "hf", force=True)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [configs.LLAMA]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "theirs", "x", "y"]  # no temporary leftovers


def test_export_refuses_root_and_home(tmp_path, monkeypatch):
    from pretrain.hf.export import check_out_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    for out in (Path("/"), tmp_path / "home", tmp_path):
        with pytest.raises(FileExistsError, match="home directory|root directory"):
            check_out_dir(out, tmp_path / "elsewhere" / "ck", force=True)
