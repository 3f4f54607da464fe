"""``PREFIX.json``: what a shard holds and how it was made (counts, tokenizer identity, inputs, bad input).

The dataset side calls :func:`verify_tokenizer` before training so that shards tokenized with another
vocabulary fail loudly instead of training on garbage ids.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pretrain.data.indexed import ShardError
from pretrain.data.tokenizer import Tokenizer


def meta_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.json")


def write_metadata(prefix: str | Path, meta: dict) -> None:
    path = meta_path(prefix)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_metadata(prefix: str | Path) -> dict:
    path = meta_path(prefix)
    if not path.exists():
        raise ShardError(f"{path}: shard metadata not found (was the shard written by `pretrain prepare`?)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: not valid JSON ({e})") from e
    if "tokenizer" not in meta or "identity" not in meta["tokenizer"]:
        raise ShardError(f"{path}: no tokenizer identity recorded")
    return meta


def verify_tokenizer(prefix: str | Path, tokenizer: Tokenizer) -> None:
    """Raise :class:`ShardError` naming ``PREFIX.json`` and the mismatch if ``tokenizer`` did not make the shard."""
    recorded = read_metadata(prefix)["tokenizer"]
    mismatches = [f"{key}: shard has {recorded.get(key)!r}, tokenizer has {value!r}"
                  for key, value in (("identity", tokenizer.identity), ("vocab_size", tokenizer.vocab_size))
                  if recorded.get(key) != value]
    if mismatches:
        raise ShardError(f"{meta_path(prefix)}: tokenizer mismatch: {'; '.join(mismatches)} "
                         f"(shard tokenized with {recorded.get('path')!r}, given {tokenizer.path!r})")


def merge_metadata(prefixes: list[str], metas: list[dict]) -> dict:
    """Metadata of the concatenation of shards; all must share one tokenizer identity."""
    first = metas[0]["tokenizer"]["identity"]
    for prefix, meta in zip(prefixes, metas):
        if meta["tokenizer"]["identity"] != first:
            raise ShardError(f"{meta_path(prefix)}: tokenizer {meta['tokenizer']['identity'][:12]} differs from "
                             f"{meta_path(prefixes[0])}'s {first[:12]}; shards of different tokenizers cannot merge")
    bad: dict[str, int] = {}
    for meta in metas:
        for k, v in meta.get("bad_inputs", {}).items():
            bad[k] = bad.get(k, 0) + v
    return {
        **{k: v for k, v in metas[0].items() if k not in ("inputs", "bad_inputs", "seconds")},
        "documents": sum(m["documents"] for m in metas),
        "tokens": sum(m["tokens"] for m in metas),
        "inputs": [i for m in metas for i in m.get("inputs", [])],
        "bad_inputs": bad,
        "merged_from": [str(p) for p in prefixes],
    }
