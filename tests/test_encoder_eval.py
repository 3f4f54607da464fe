"""Masked-LM evaluation (:mod:`pretrain.evals.mlm`): the numbers of our encoder equal those of its Hugging Face
export computed the same way, pseudo-log-likelihood is exact on a known model, ``pretrain eval`` scores an
encoder checkpoint; a trained checkpoint's export (model and tokenizer) loads in transformers with the same
numbers, imports back and continues pretraining; the WordPiece tokenizer matches transformers'."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pretrain.data.mlm_dataset import MLMMasking
from pretrain.evals import mlm
from pretrain.hf.mapping import to_hf
from pretrain.models import build_model
from pretrain.models.encoder import hf as enc_hf

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPECIALS = {"cls": 1, "sep": 2, "mask": 4}


def test_pll_of_a_uniform_model_is_exact():
    uniform = lambda ids, mask: torch.zeros(*ids.shape, 50)  # noqa: E731
    assert mlm.pseudo_log_likelihood(uniform, [7, 8, 9], **{f"{k}_id": v for k, v in SPECIALS.items()},
                                     batch_size=2) == pytest.approx(-3 * math.log(50))


@pytest.mark.parametrize("flavour", ["roberta", "modernbert"])
def test_our_numbers_equal_the_exported_model(flavour):
    import transformers

    torch.manual_seed(0)
    extra = {"roberta": dict(type_vocab_size=1, pad_token_id=0),
             "modernbert": dict(type_vocab_size=0, global_every=2, local_window=4)}[flavour]
    model = build_model("encoder", dict(flavour=flavour, vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                                        ffn_hidden_size=48, max_seq_len=32, **extra)).eval()
    arch = enc_hf.architecture(model.cfg)
    hf_model = getattr(transformers, arch)(getattr(transformers, enc_hf.HF.classes[arch])(
        **enc_hf.to_config(model.cfg, arch, {}))).eval()
    hf_model.load_state_dict(to_hf(model.state_dict(), *enc_hf.rules(model.cfg, arch)))
    masking = MLMMasking(24, seed=3, vocab_size=64, cls_id=1, sep_id=2, mask_id=4)
    rng = np.random.default_rng(0)
    samples = [masking(rng.integers(5, 64, 22), i) for i in range(10)]
    items = [(rng.integers(5, 64, 6).tolist(), [rng.integers(5, 64, 3).tolist() for _ in range(3)], 1)
             for _ in range(4)]
    got = {name: (mlm.masked_token_accuracy(score, samples, batch_size=4), mlm.cloze_accuracy(score, items, SPECIALS),
                  mlm.pll_per_token(score, [it[0] for it in items], SPECIALS))
           for name, score in (("ours", mlm.ours(model)), ("hf", mlm.hf(hf_model)))}
    (acc, cloze, pll), (hf_acc, hf_cloze, hf_pll) = got["ours"], got["hf"]
    assert acc["tokens"] == hf_acc["tokens"] == 10 * round(0.15 * 22)
    assert acc["accuracy"] == hf_acc["accuracy"] and abs(acc["loss"] - hf_acc["loss"]) < 1e-5
    assert cloze == hf_cloze and abs(pll["pll_per_token"] - hf_pll["pll_per_token"]) < 1e-5
    assert pll["pll_per_token"] < 0


def test_pretrain_eval_scores_an_encoder_checkpoint(tmp_path, tiny_shard_prefix, tiny_tokenizer):
    from pretrain.cli import main
    from pretrain.config import load_config
    from pretrain.train import build_datasets
    from pretrain.trainer import EXIT_OK, Trainer
    from tests.test_encoder import CONFIGS

    torch.manual_seed(0)
    cfg_args = [
        f"data.train=[{tiny_shard_prefix}]", f"data.tokenizer={tiny_tokenizer.path}", "data.seq_length=32",
        f"data.cache_dir={tmp_path / 'index'}", f"model.vocab_size={tiny_tokenizer.vocab_size}",
        "logging.tensorboard=false", "model.hidden_size=32", "model.num_layers=1", "model.ffn_hidden_size=64",
        "train.steps=1", "train.global_batch_size=2", "train.micro_batch_size=2", "train.eval_interval=0",
        "data.mask_rate=0.15"]
    cfg = load_config(CONFIGS / "bert_tiny.yaml", [*cfg_args, f"checkpoint.dir={tmp_path / 'run'}"])
    assert Trainer(cfg, *build_datasets(cfg)).fit() == EXIT_OK
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--tasks", "mlm", "--limit", "6",
                 "--device", "cpu", "--output", str(out)]) == 0
    result = json.loads(out.read_text())["results"]["mlm"]
    assert result["tokens"] == 6 * round(0.15 * 30) and 0 <= result["accuracy"] <= 1
    assert abs(result["loss"] - math.log(tiny_tokenizer.vocab_size)) < 1.0  # one step: still near uniform
    # the exported BertForMaskedLM, loaded by transformers, gives the same numbers on the same samples
    from transformers import AutoModelForMaskedLM

    from pretrain.hf.export import export, load_model_state

    export(tmp_path / "run", tmp_path / "hf")
    hf_model = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    samples = mlm.validation_samples(load_model_state(tmp_path / "run")[1], tiny_tokenizer, 6)
    theirs = mlm.masked_token_accuracy(mlm.hf(hf_model), samples)
    assert theirs["accuracy"] == result["accuracy"] and abs(theirs["loss"] - result["loss"]) < 1e-5
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")  # names the mask token training used, and [CLS]/[SEP]
    assert (hf_tok.mask_token, hf_tok.cls_token, hf_tok.sep_token) == ("<extra_id_99>", "<s>", "</s>")
    assert hf_tok.mask_token_id == tiny_tokenizer.token_to_id("<extra_id_99>")
    # import the export back and continue pretraining from it: the run starts from exactly the trained weights
    from pretrain.hf.importer import import_hf

    import_hf(tmp_path / "hf", tmp_path / "imported")
    again = load_config(CONFIGS / "bert_tiny.yaml", [*cfg_args, f"checkpoint.dir={tmp_path / 'run2'}",
                               f"checkpoint.init_from={tmp_path / 'imported'}"])
    trainer = Trainer(again, *build_datasets(again))
    trainer.resume(None)
    trained = load_model_state(tmp_path / "run")[0]
    assert all(torch.equal(p, trained[n]) for n, p in trainer.engine.model.state_dict().items())
    assert trainer.fit() == EXIT_OK
    with pytest.raises(ValueError, match="'kjv_cont' is no encoder task"):
        main(["eval", "--checkpoint", str(tmp_path / "run"), "--tasks", "kjv_cont", "--device", "cpu",
              "--output", str(out)])


def test_wordpiece_tokenizer_for_bert(tiny_corpus, tmp_path):
    """`pretrain tokenizer --model-type wordpiece`: BERT's specials at ids 0-4 found by the masked-LM data, and
    transformers' fast tokenizer over the same file gives our ids on real text (leading spaces, accents, an
    unknown character, punctuation)."""
    from transformers import PreTrainedTokenizerFast

    from pretrain.cli import main
    from pretrain.data.mlm_dataset import special_ids
    from pretrain.data.tokenizer import load_tokenizer

    assert main(["tokenizer", "--input", str(tiny_corpus), "--vocab-size", "600", "--model-type", "wordpiece",
                 "--output", str(tmp_path / "wp"), "--quiet"]) == 0
    tok = load_tokenizer(tmp_path / "wp")
    assert special_ids(tok) == {"cls": 2, "sep": 3, "mask": 4} and (tok.pad_id, tok.unk_id, tok.eod_id) == (0, 1, 3)
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "wp" / "tokenizer.json"))
    text = "  Thou art more lovely, and more témperate: 🜚 ROUGH winds do shake the darling buds of May"
    ids = tok.encode(text)
    assert ids == hf_tok(text, add_special_tokens=False)["input_ids"] and 1 in ids  # [UNK] for the glyph
    assert any(tok.decode([i]).startswith("##") for i in ids)  # continuation pieces
