"""WordPiece tokenizers (BERT's) trained with the Hugging Face ``tokenizers`` library.

:func:`train_wordpiece` writes ``DIR/tokenizer.json``: BERT's normalizer (lower-casing and accent stripping
unless ``lowercase=False``), pre-tokenizer (whitespace and punctuation) and ``##`` continuation pieces, with the
specials ``[PAD] [UNK] [CLS] [SEP] [MASK]`` at ids 0-4. :class:`pretrain.data.tokenizer.HFTokenizer` loads it
(BOS = ``[CLS]``, EOS = EOD = ``[SEP]``, pad, unk), the masked-LM data find ``[MASK]``, and ``pretrain export``
copies the same file, so transformers' fast tokenizer gives the same ids (``pretrain tokenizer --model-type
wordpiece``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pretrain.data.tokenizer import HF_FILE, HFTokenizer, _atomic_write

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def train_wordpiece(texts: Iterable[str], output_dir: str | Path, vocab_size: int,
                    lowercase: bool = True) -> HFTokenizer:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS)))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / HF_FILE, tok.to_str(pretty=True).encode())
    return HFTokenizer(out / HF_FILE)
