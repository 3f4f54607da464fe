"""~50 MB of distinct real English text for benchmarks: the demo corpus once, then Debian documentation.

A repeated corpus flatters tokenizers that memoize words (``data/segment_cache.py``): its later copies bring
no new words. This one repeats nothing. Documents, in this order, until the file reaches the size asked for:

* the demo corpus (``data/demo_corpus.py``: KJV chapters, Shakespeare/Milton sections), ~10 MB;
* ``linux-doc-6.1``: the kernel's reStructuredText (``Documentation/**/*.rst.gz``), ~24 MB;
* ``python3.11-doc``: the sources of Python's documentation (``html/_sources/**/*.rst.txt``), ~11 MB;
* ``perl-doc``: Perl's POD manuals (``usr/share/perl/*/pod/*.pod``), ~9 MB (50 MB end ~2.5 MB into it).

Each file becomes documents of ~8 KB (consecutive paragraphs, as in the demo corpus); each JSON line holds
``text`` and ``source`` (the package, or ``demo``). The ``.deb`` files come from ``apt-get download`` and are
unpacked with ``dpkg -x`` (nothing is installed); the corpus is written once (tmp file + rename) to the cache
directory and reused.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from itertools import chain
from pathlib import Path

from pretrain.data.demo_corpus import _sections, ensure_demo_corpus

# package -> glob of its text files, relative to the unpacked package root
PACKAGES = {
    "linux-doc-6.1": "usr/share/doc/linux-doc-6.1/Documentation/**/*.rst.gz",
    "python3.11-doc": "usr/share/doc/python3.11/html/_sources/**/*.rst.txt",
    "perl-doc": "usr/share/perl/*/pod/*.pod",
}


def ensure_distinct_corpus(mb: int, cache: Path) -> Path:
    """Path of ``bench_distinct_{mb}mb.jsonl`` under ``cache``, building it first if needed."""
    out = cache / f"bench_distinct_{mb}mb.jsonl"
    if out.exists():
        return out
    demo = ensure_demo_corpus(cache)
    debs = _download(cache / "downloads" / "debs")
    limit, written = mb * 1_000_000, 0
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    with tempfile.TemporaryDirectory(dir=cache) as root, open(tmp, "w", encoding="utf-8") as f:
        for deb in debs:
            subprocess.run(["dpkg", "-x", str(deb), root], check=True)
        with open(demo, encoding="utf-8") as lines:
            demo_docs = ((json.loads(line)["text"], "demo") for line in lines)
            for text, source in chain(demo_docs, _package_texts(Path(root))):
                line = json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line.encode("utf-8"))
                if written >= limit:
                    break
    if written < limit:
        tmp.unlink()
        raise RuntimeError(f"{out}: only {written / 1e6:.1f} MB of text available, {mb} MB asked for")
    os.replace(tmp, out)
    return out


def _download(dest: Path) -> list[Path]:
    """The packages' ``.deb`` files in ``dest``, fetched with ``apt-get download`` when missing."""
    dest.mkdir(parents=True, exist_ok=True)
    missing = [name for name in PACKAGES if not any(dest.glob(f"{name}_*.deb"))]
    if missing:
        cmd = ["apt-get", "download", *missing]
        print(f"downloading {', '.join(missing)} with apt-get (benchmark corpus text)", file=sys.stderr)
        try:
            result = subprocess.run(cmd, cwd=dest, capture_output=True, text=True)
        except FileNotFoundError:
            result = None
        if result is None or result.returncode != 0:
            detail = "apt-get not found" if result is None else result.stderr.strip()
            raise RuntimeError(f"could not get the distinct benchmark corpus: `{' '.join(cmd)}` in {dest} failed "
                               f"(needs a Debian bookworm system with apt sources; try `apt-get update`, or use "
                               f"--corpus demo-repeated):\n{detail}")
    return [sorted(dest.glob(f"{name}_*.deb"))[-1] for name in PACKAGES]


def _package_texts(root: Path) -> Iterator[tuple[str, str]]:
    """(document, package) pairs: each text file of each package cut into ~8 KB sections."""
    for package, pattern in PACKAGES.items():
        for path in sorted(root.glob(pattern)):
            raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            for section in _sections(raw.decode("utf-8", errors="replace").replace("\r\n", "\n")):
                yield section, package
