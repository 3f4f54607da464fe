"""``pretrain tokenizer``: train a sentencepiece tokenizer on corpus files (any format ``pretrain prepare`` reads)."""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from pretrain.data.corpus import CorpusError, CorpusReader, expand_inputs
from pretrain.data.tokenizer import META_FILE, SP_MODEL, text_lines, train_sentencepiece
from pretrain.data.wordpiece import train_wordpiece


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_GLOB",
                   help=".jsonl[.gz], .txt[.gz], .parquet, datasets save_to_disk dirs, or hf:NAME")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-type", choices=("bpe", "unigram", "wordpiece"), default="bpe",
                   help="sentencepiece bpe / unigram, or a BERT WordPiece tokenizer.json (HF tokenizers)")
    p.add_argument("--output", required=True, metavar="DIR", help=f"writes DIR/{SP_MODEL} and DIR/{META_FILE}")
    p.add_argument("--t5-sentinels", action="store_true", help="add <extra_id_0..99> for T5 span corruption")
    p.add_argument("--mask-token", action="store_true", help="add <mask> for masked language modelling (encoders)")
    p.add_argument("--text-key", default="text")
    p.add_argument("--txt-mode", choices=("line", "paragraph"), default="line")
    p.add_argument("--max-sentences", type=int, default=2_000_000,
                   help="lines sampled for training (sentencepiece keeps them in memory)")
    p.add_argument("--quiet", action="store_true", help="no sentencepiece training log")


def run(args: argparse.Namespace) -> int:
    try:
        paths = expand_inputs(args.input)
        reader = CorpusReader(paths, text_key=args.text_key, txt_mode=args.txt_mode)
        docs = tqdm((d.text for d in reader), desc="reading corpus", unit=" docs", file=sys.stderr,
                    disable=args.quiet)
        if args.model_type == "wordpiece":
            tok = train_wordpiece(text_lines(docs), args.output, args.vocab_size)
        else:
            tok = train_sentencepiece(text_lines(docs), args.output, vocab_size=args.vocab_size,
                                      model_type=args.model_type, t5_sentinels=args.t5_sentinels,
                                      mask_token=args.mask_token,
                                      max_sentences=args.max_sentences, verbose=not args.quiet, inputs=paths)
    except (CorpusError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if reader.bad.total:
        print(f"warning: skipped {reader.bad.total} bad input records ({reader.bad.summary()})", file=sys.stderr)
    print(f"wrote {tok.path} ({tok.vocab_size} pieces, identity {tok.identity[:12]})",
          file=sys.stderr)
    return 0
