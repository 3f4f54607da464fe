"""Run tasks on a model: build requests from task items, score them with the engine, compute metrics.

``evaluate_tasks`` is the single entry point for the CLI, the trainer's periodic evaluation (pass the live
model wrapped in an :class:`~pretrain.evals.model.EvalModel`) and the lm-eval comparison tests.
"""

from __future__ import annotations

import logging
import re
import string
import time
from pathlib import Path

from pretrain.evals.engine import Scorer
from pretrain.evals.seq2seq import make_scorer
from pretrain.evals.metrics import aggregate
from pretrain.evals.model import EvalModel
from pretrain.evals.tasks import Task, TaskError, load_task

log = logging.getLogger(__name__)


def evaluate_tasks(model: EvalModel, tasks: list[str | Task], num_fewshot: int | list[int] = 0,
                   limit: int | None = None, batch_size: int = 16, include: list[str | Path] = (),
                   cache_dir: str | Path | None = None, progress: bool = True,
                   log_samples: bool = False, group=None) -> dict:
    """Evaluate every task at every few-shot count (requests split over the ranks of ``group``, see
    :class:`~pretrain.evals.engine.Scorer`). Returns ``{"results": [row, ...], "truncated": n, ...}``
    where a row is ``{"task", "num_fewshot", "n", "metrics", "stderr", "truncated"[, "samples"]}``."""
    shots = [num_fewshot] if isinstance(num_fewshot, int) else list(num_fewshot)
    loaded = [t if isinstance(t, Task) else load_task(t, include, limit, cache_dir) for t in tasks]
    engine = make_scorer(model, batch_size=batch_size, progress=progress, group=group)
    rows, start = [], time.perf_counter()
    for task in loaded:
        docs = task.docs[:limit] if limit else task.docs
        for k in shots:
            if k and task.output_type == "loglikelihood_rolling":
                log.warning("%s: rolling log-likelihood has no few-shot form; skipping num_fewshot=%d", task.name, k)
                continue
            before = engine.truncated
            per_doc = _run(task, docs, k, engine)
            row = {"task": task.name, "num_fewshot": k, "n": len(docs), "metrics": {}, "stderr": {}}
            for m in task.metrics:
                name = m["metric"]
                row["metrics"][name], row["stderr"][name] = aggregate(name, [d[name] for d in per_doc])
            row["truncated"] = engine.truncated - before
            if row["truncated"]:
                log.warning("%s (%d-shot): %d requests longer than the context (%d tokens) were truncated from "
                            "the left", task.name, k, row["truncated"], model.max_length)
            if log_samples:
                row["samples"] = per_doc
            rows.append(row)
    return {"results": rows, "truncated": engine.truncated, "batch_size": batch_size, "limit": limit,
            "max_length": model.max_length, "seconds": round(time.perf_counter() - start, 3)}


def _run(task: Task, docs: list[dict], k: int, engine: Scorer) -> list[dict]:
    """Per-item metric inputs (and the raw scores, under ``"raw"``)."""
    kind, desc = task.output_type, f"{task.name} {k}-shot"
    contexts = [task.context(i, k) for i in range(len(docs))] if kind != "loglikelihood_rolling" else []
    delim = task.cfg.get("target_delimiter", " ")
    if kind == "multiple_choice":
        choices = [task.choices(d) for d in docs]
        pairs = [(c, delim + ch) for c, chs in zip(contexts, choices) for ch in chs]
        scores, out, pos = engine.loglikelihood(pairs, desc), [], 0
        for d, chs in zip(docs, choices):
            lls = [s[0] for s in scores[pos:pos + len(chs)]]
            pos += len(chs)
            gold = task.target(d)
            best = lambda norm: max(range(len(chs)), key=lambda j: lls[j] / norm[j])  # noqa: E731
            out.append({"acc": float(best([1.0] * len(chs)) == gold),
                        "acc_norm": float(best([float(len(c)) for c in chs]) == gold),
                        "acc_bytes": float(best([float(len(c.encode())) for c in chs]) == gold),
                        "raw": lls})
        return out
    if kind == "loglikelihood":
        # as lm-eval: no target_delimiter here (tasks put the space in doc_to_target, e.g. LAMBADA)
        scores = engine.loglikelihood([(c, task.target(d)) for c, d in zip(contexts, docs)], desc)
        return [{"acc": float(g), "perplexity": ll, "raw": ll} for ll, g in scores]
    if kind == "loglikelihood_rolling":
        texts = [task.target(d) for d in docs]
        scores = engine.loglikelihood_rolling(texts, desc)
        return [{"word_perplexity": (ll, len(re.split(r"\s+", t))), "byte_perplexity": (ll, len(t.encode())),
                 "bits_per_byte": (ll, len(t.encode())), "token_perplexity": (ll, n), "raw": ll}
                for (ll, n), t in zip(scores, texts)]
    if kind == "generate_until":
        gen = task.cfg.get("generation_kwargs") or {}
        until = gen.get("until", ["\n\n"])
        outputs = engine.generate_until(contexts, [until] if isinstance(until, str) else list(until),
                                        int(gen.get("max_gen_toks", 256)), desc)
        opts = next((m for m in task.metrics if m["metric"] == "exact_match"), {})
        return [{"exact_match": float(_normalise(o, opts) == _normalise(task.target(d), opts)), "raw": o}
                for o, d in zip(outputs, docs)]
    raise TaskError(f"{task.source}: unsupported output_type {kind}")


def _normalise(text: str, opts: dict) -> str:
    text = text.strip()
    if opts.get("regex"):
        m = re.search(opts["regex"], text)
        text = (m.group(1) if m.groups() else m.group(0)) if m else ""
    if opts.get("ignore_case"):
        text = text.lower()
    if opts.get("ignore_punctuation"):
        text = text.translate(str.maketrans("", "", string.punctuation))
    return text


def scalar_metrics(results: dict, prefix: str = "eval") -> dict[str, float]:
    """Flat ``{"eval/<task>/<k>shot/<metric>": value}`` for the trainer's metric logger (every N steps it
    wraps the live model in :class:`~pretrain.evals.pretrain_model.PretrainModel` and calls :func:`evaluate_tasks`)."""
    return {f"{prefix}/{row['task']}/{row['num_fewshot']}shot/{name}": value
            for row in results["results"] for name, value in row["metrics"].items()}
