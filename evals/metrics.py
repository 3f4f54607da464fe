"""Per-item scores to task metrics with standard errors, and the results table (markdown + JSON).

Means get the sample standard error (as lm-eval's ``mean_stderr``). Perplexities and bits per byte are ratio
estimates ``sum(loglikelihood) / sum(units)``; their standard error comes from the delta method instead of
lm-eval's bootstrap (which it skips by default, printing N/A).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np


def mean_with_stderr(values: list[float]) -> tuple[float, float | None]:
    x = np.asarray(values, dtype=np.float64)
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None
    return float(x.mean()), se


def ratio_with_stderr(num: list[float], den: list[float]) -> tuple[float, float | None]:
    """``sum(num) / sum(den)`` and its delta-method standard error."""
    a, b = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    r = float(a.sum() / b.sum())
    if len(a) < 2:
        return r, None
    resid = a - r * b
    return r, float(math.sqrt(resid.var(ddof=1) / len(a)) / b.mean())


def aggregate(metric: str, items: list) -> tuple[float, float | None]:
    """``items`` per metric: 0/1 or floats for acc*/exact_match, log-likelihoods for ``perplexity``,
    (loglikelihood, units) pairs for the rolling metrics."""
    if metric == "perplexity":
        m, se = mean_with_stderr(items)
        return math.exp(-m), (math.exp(-m) * se if se is not None else None)
    if metric in ("word_perplexity", "byte_perplexity", "token_perplexity", "bits_per_byte"):
        lls, units = zip(*items)
        r, se = ratio_with_stderr(list(lls), list(units))
        if metric == "bits_per_byte":
            return -r / math.log(2), (se / math.log(2) if se is not None else None)
        return math.exp(-r), (math.exp(-r) * se if se is not None else None)
    return mean_with_stderr(items)


def markdown_table(results: dict) -> str:
    lines = ["| task | shots | metric | value | stderr | n |", "|---|---:|---|---:|---:|---:|"]
    for row in results["results"]:
        for metric, value in row["metrics"].items():
            se = row["stderr"].get(metric)
            lines.append(f"| {row['task']} | {row['num_fewshot']} | {metric} | {value:.4f} | "
                         f"{'' if se is None else f'{se:.4f}'} | {row['n']} |")
    return "\n".join(lines)


def write_results(results: dict, path: str | Path) -> Path:
    """``path`` (JSON) and the same table as markdown next to it (``.md``), both written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    md = path.with_suffix(".md")
    for target, text in ((path, json.dumps(results, indent=2, default=str)), (md, markdown_table(results) + "\n")):
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, target)
    return md
