"""Masked-LM evaluation of encoders (``pretrain eval --checkpoint ENCODER_CKPT --tasks ...``).

Tasks (``--limit N`` caps the items of each; default 200):

* ``mlm``: masked-token accuracy and mean loss on the training config's validation data (its split of
  ``data.train``, or ``data.valid``), masked exactly as in training (:mod:`pretrain.data.mlm_dataset`, same seed).
* ``kjv_pll``: pseudo-log-likelihood (Salazar et al. 2020: each token masked in turn, the log-probability of the
  true token summed) per token of King James verses, a bundled local task (:mod:`pretrain.evals.local_data`).
* ``kjv_cloze``: zero-shot multiple choice (``kjv_cont``: a verse's first half and four candidate second halves)
  scored by the pseudo-log-likelihood of context + candidate; accuracy.

Everything is computed from a *scorer*, ``(input_ids, attention_mask) -> logits [b, s, vocab]``: :func:`ours`
wraps our encoder, :func:`hf` a ``transformers`` ``*ForMaskedLM``, so the numbers of a checkpoint and of its
export are the same computation (``tests/test_encoder_eval.py`` checks they agree).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TASKS = ("mlm", "kjv_pll", "kjv_cloze")
DEFAULT_LIMIT = 200


def ours(model: torch.nn.Module) -> Scorer:
    device = next(model.parameters()).device
    return lambda ids, mask: model.logits(ids.to(device), mask.to(device)).float().cpu()


def hf(model) -> Scorer:
    device = next(model.parameters()).device
    return lambda ids, mask: model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()


@torch.no_grad()
def masked_token_accuracy(score: Scorer, samples: Iterable[dict], batch_size: int = 16) -> dict[str, float]:
    """Accuracy (argmax = original token) and mean cross-entropy over the chosen tokens of masked-LM samples."""
    correct = loss = count = 0.0
    samples = list(samples)
    for start in range(0, len(samples), batch_size):
        rows = samples[start:start + batch_size]
        ids, labels, chosen = (torch.stack([torch.as_tensor(s[k]) for s in rows])
                               for k in ("input_ids", "labels", "loss_mask"))
        logits = score(ids, torch.ones_like(ids))[chosen > 0].float()
        target = labels[chosen > 0]
        correct += (logits.argmax(-1) == target).sum().item()
        loss += F.cross_entropy(logits, target, reduction="sum").item()
        count += len(target)
    return {"accuracy": correct / max(count, 1), "loss": loss / max(count, 1), "tokens": count}


@torch.no_grad()
def pseudo_log_likelihood(score: Scorer, ids: Sequence[int], cls_id: int, sep_id: int, mask_id: int,
                          batch_size: int = 64) -> float:
    """Sum over the tokens of ``[CLS] ids [SEP]`` (specials excluded) of log p(token | the others, it masked)."""
    tokens = torch.tensor([cls_id, *ids, sep_id])
    total = 0.0
    for start in range(0, len(ids), batch_size):
        where = torch.arange(start, min(start + batch_size, len(ids))) + 1
        rows = tokens.repeat(len(where), 1)
        rows[torch.arange(len(where)), where] = mask_id
        logp = score(rows, torch.ones_like(rows)).float().log_softmax(-1)
        total += logp[torch.arange(len(where)), where, tokens[where]].sum().item()
    return total


def pll_per_token(score: Scorer, texts: Iterable[list[int]], specials: dict[str, int]) -> dict[str, float]:
    total = count = 0.0
    for ids in texts:
        total += pseudo_log_likelihood(score, ids, specials["cls"], specials["sep"], specials["mask"])
        count += len(ids)
    return {"pll_per_token": total / max(count, 1), "tokens": count}


def cloze_accuracy(score: Scorer, items: Iterable[tuple[list[int], list[list[int]], int]],
                   specials: dict[str, int]) -> dict[str, float]:
    """Share of ``(context ids, choice ids, gold index)`` items whose gold choice has the highest PLL."""
    right = n = 0
    for context, choices, gold in items:
        plls = [pseudo_log_likelihood(score, context + c, specials["cls"], specials["sep"], specials["mask"])
                for c in choices]
        right += int(max(range(len(plls)), key=plls.__getitem__) == gold)
        n += 1
    return {"accuracy": right / max(n, 1), "items": n}


def kjv_items(tokenizer, task: str, limit: int):
    """Token ids of the bundled King James tasks: verses (``kjv_pll``) or cloze items (``kjv_cloze``)."""
    from pretrain.evals.local_data import ensure_local_eval_data

    rows = [json.loads(line) for line in (ensure_local_eval_data() / "kjv_cont.jsonl").read_text().splitlines()]
    rows = rows[:limit]
    if task == "kjv_pll":
        return [tokenizer.encode(r["ctx"] + " " + r["endings"][r["label"]]) for r in rows]
    return [(tokenizer.encode(r["ctx"]), [tokenizer.encode(" " + e) for e in r["endings"]], r["label"]) for r in rows]


def validation_samples(meta: dict, tokenizer, limit: int) -> list[dict]:
    """``limit`` masked samples of the checkpoint's validation data (masked as in training)."""
    from pretrain.config import from_dict
    from pretrain.data.loader import build_train_valid_datasets

    cfg = from_dict(meta["config"])
    _, valid = build_train_valid_datasets(cfg.data, "mlm", 1, limit, tokenizer=tokenizer)
    if valid is None:
        raise ValueError("task mlm: the checkpoint's training config has no validation data (data.valid, or a "
                         "validation share in data.split)")
    return [valid[i] for i in range(min(limit, len(valid)))]


def evaluate(score: Scorer, tokenizer, tasks: Sequence[str], limit: int, meta: dict | None = None,
             mask_token: str | None = None) -> dict[str, dict[str, float]]:
    """Run ``tasks`` (see :data:`TASKS`) with ``score``; ``meta`` (the checkpoint's) is needed for ``mlm``."""
    from pretrain.data.mlm_dataset import special_ids

    specials = special_ids(tokenizer, mask_token)
    results = {}
    for task in tasks:
        if task == "mlm":
            results[task] = masked_token_accuracy(score, validation_samples(meta, tokenizer, limit))
        elif task == "kjv_pll":
            results[task] = pll_per_token(score, kjv_items(tokenizer, task, limit), specials)
        elif task == "kjv_cloze":
            results[task] = cloze_accuracy(score, kjv_items(tokenizer, task, limit), specials)
        else:
            raise ValueError(f"--tasks: {task!r} is no encoder task; encoders are scored on {', '.join(TASKS)}")
    return results


def is_encoder_checkpoint(path: str) -> bool:
    """Whether the checkpoint holds an encoder (reads ``meta.json`` only)."""
    from pretrain.reshard import read_meta

    return read_meta(path)[1]["config"].get("model", {}).get("family") == "encoder"


def run(args: argparse.Namespace) -> int:
    """``pretrain eval`` for an encoder checkpoint (single process)."""
    from pretrain.evals.pretrain_model import checkpoint_tokenizer
    from pretrain.hf.export import load_model_state, model_config
    from pretrain.models import build_model

    if args.tp * args.pp > 1:
        raise SystemExit("--tp/--pp: encoder checkpoints are evaluated in one process")
    state, meta, step_dir = load_model_state(args.checkpoint)
    model = build_model(*model_config(meta, step_dir))
    model.load_state_dict(state)
    model.to(args.device).eval()
    tokenizer = checkpoint_tokenizer(meta, step_dir, args.tokenizer)[0]
    mask_token = meta["config"].get("data", {}).get("mask_token")
    results = evaluate(ours(model), tokenizer, [t for t in args.tasks.split(",") if t], args.limit or DEFAULT_LIMIT,
                       meta, mask_token)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"model": args.checkpoint, "results": results}, indent=2) + "\n")
    for task, values in results.items():
        print(task, " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()))
    print(f"wrote {args.output}")
    return 0
