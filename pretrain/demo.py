"""``pretrain demo``: the whole pipeline on a small bundled default, on a CPU, in a few minutes.

demo corpus -> sentencepiece tokenizer -> ``.bin/.idx`` shards -> train a tiny GPT (configs/gpt_tiny.yaml)
-> checkpoint -> loss curve -> zero-shot evaluation (``evals``, local King James tasks) -> Hugging Face export,
loaded back with transformers and checked against our logits. Each stage reuses its output when it already exists, so running the demo again
is cheap (training resumes from its last checkpoint, i.e. does nothing once finished).
The loss must end well below the unigram entropy of the corpus: the model has learned more than token
frequencies.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "gpt_tiny.yaml"
VOCAB_SIZE = 2048
# Offline tasks built from the KJV text, which is also in the demo corpus: in-domain, so above chance.
EVAL_TASKS, EVAL_LIMIT = ["kjv_cont", "kjv_lastword"], 200


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="working directory (default: runs/demo)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="overrides of configs/gpt_tiny.yaml, e.g. train.steps=100")


def build_tokenizer(corpus: Path, out: Path) -> Path:
    from pretrain.data.corpus import CorpusReader
    from pretrain.data.tokenizer import text_lines, train_sentencepiece

    model = out / "tokenizer" / "tokenizer.model"
    if not model.exists():
        print(f"[demo] training a {VOCAB_SIZE}-token BPE tokenizer on {corpus.name}", flush=True)
        texts = (doc.text for doc in CorpusReader([str(corpus)]))
        train_sentencepiece(text_lines(texts), model.parent, VOCAB_SIZE, model_type="bpe", t5_sentinels=True,
                            verbose=False, inputs=[str(corpus)])
    return model


def build_shards(corpus: Path, tokenizer: Path, out: Path) -> str:
    from pretrain.data.prepare import prepare

    prefix = out / "data" / "demo_text_document"
    if not Path(f"{prefix}.json").exists():
        print(f"[demo] tokenizing {corpus.name} into {prefix}.bin/.idx", flush=True)
        prepare([str(corpus)], tokenizer, prefix, workers=2, append_eod=True)
    return str(prefix)


def unigram_entropy(prefix: str) -> float:
    """Entropy (nats/token) of the corpus's token frequencies: the loss of the best context-free model."""
    from pretrain.data.indexed import IndexedDataset

    tokens = np.fromfile(f"{prefix}.bin", dtype=IndexedDataset(prefix).dtype)
    counts = np.bincount(tokens)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def train_model(prefix: str, tokenizer: Path, out: Path, overrides: list[str]):
    from pretrain.config import load_config
    from pretrain.console import setup_logging
    from pretrain.train import train

    cfg = load_config(CONFIG, [f"data.train=[{prefix}]", f"data.tokenizer={tokenizer}",
                               f"checkpoint.dir={out / 'gpt_tiny'}", *overrides])
    setup_logging(0)
    print(f"[demo] training a tiny GPT ({CONFIG.name}) for {cfg.train.steps} steps on the CPU", flush=True)
    code = train(cfg, resume="auto")
    return cfg, code


def report(cfg, entropy: float) -> int:
    from pretrain.metrics import read_metrics
    from pretrain.plot import plot_run

    records = read_metrics(cfg.log_dir)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    print(f"\n[demo] unigram entropy of the corpus: {entropy:.3f} nats/token")
    print(f"{'step':>6} {'train loss':>11}")
    shown = train[:: max(1, len(train) // 8)]
    for r in shown + ([] if shown[-1] is train[-1] else train[-1:]):
        print(f"{r['step']:>6} {r['loss']:>11.4f}")
    final = val[-1]["val_loss"] if val else train[-1]["loss"]
    kind = "validation" if val else "training"
    print(f"[demo] final {kind} loss {final:.4f} (perplexity {math.exp(final):.1f}) vs unigram entropy "
          f"{entropy:.3f}: {entropy - final:+.3f} nats below")
    print(f"[demo] checkpoint: {cfg.checkpoint.dir}/latest, curves: {plot_run(cfg.log_dir)}")
    if final > entropy - 0.5:
        print("[demo] FAILED: the loss did not fall well below the unigram entropy", file=sys.stderr)
        return 1
    return 0


def evaluate(cfg, out: Path):
    """Zero-shot table of the trained checkpoint on the local tasks; returns the loaded model."""
    from pretrain.evals.harness import evaluate_tasks
    from pretrain.evals.metrics import markdown_table, write_results
    from pretrain.evals.loading import load_model

    print(f"\n[demo] zero-shot evaluation on {', '.join(EVAL_TASKS)} (first {EVAL_LIMIT} items each)", flush=True)
    model = load_model(checkpoint=cfg.checkpoint.dir)
    results = evaluate_tasks(model, EVAL_TASKS, 0, limit=EVAL_LIMIT, progress=False)
    results["model"] = cfg.checkpoint.dir
    print(markdown_table(results))
    write_results(results, out / "eval" / "results.json")
    return model


def export_hf(cfg, out: Path, model) -> int:
    """Export to a Hugging Face directory and check transformers loads it and gives our logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pretrain.hf.export import export

    hf_dir = export(cfg.checkpoint.dir, out / "hf", force=True)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    text = "In the beginning God created the heaven and the earth."
    ids = AutoTokenizer.from_pretrained(hf_dir)(text, add_special_tokens=False)["input_ids"]
    if ids != model.encode(text):
        print("[demo] FAILED: the exported tokenizer encodes differently from ours", file=sys.stderr)
        return 1
    with torch.no_grad():
        ours = model.model.logits(torch.tensor([ids]))
        theirs = hf(torch.tensor([ids])).logits
    diff = (ours - theirs).abs().max().item()
    print(f"[demo] exported {hf_dir} ({type(hf).__name__}); transformers' logits match ours to {diff:.2e}")
    if diff > 1e-3:
        print("[demo] FAILED: the exported model computes different logits", file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    from pretrain.data.demo_corpus import ensure_demo_corpus

    start = time.time()
    out = Path(args.out).resolve()
    corpus = ensure_demo_corpus()
    tokenizer = build_tokenizer(corpus, out)
    prefix = build_shards(corpus, tokenizer, out)
    cfg, code = train_model(prefix, tokenizer, out, args.overrides)
    if code:
        return code
    code = report(cfg, unigram_entropy(prefix))
    model = evaluate(cfg, out)
    code = export_hf(cfg, out, model) or code
    print(f"[demo] done in {time.time() - start:.0f} s")
    return code
