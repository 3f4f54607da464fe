"""Training straight from raw text: samples equal the shard path's, formats, bad input, and exact resume at
another data-parallel size and worker count (real processes), across epoch wraps, blended with a shard."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.data.corpus import CorpusError
from pretrain.data.gpt_dataset import GPTDataset
from pretrain.data.indexed import IndexedDataset
from pretrain.data.loader import build_train_valid_datasets
from pretrain.data.t5_dataset import T5Dataset
from pretrain.data.tokenizer import load_tokenizer
from tests.dist_utils import run_distributed

GBS, MBS = 8, 1
SEQ = 16


def small_corpus(src: Path, out: Path, docs: int = 16, chars: int = 150) -> Path:
    """The first ``docs`` documents of ``src``, cut to ``chars`` characters (a corpus that wraps epochs fast)."""
    lines = src.read_text(encoding="utf-8").splitlines()[:docs]
    out.write_text("".join(json.dumps({"text": json.loads(l)["text"][:chars]}) + "\n" for l in lines))
    return out


def data_cfg(train: list, tokenizer, tmp: Path, **kw) -> dict:
    return {"train": train, "tokenizer": str(tokenizer.path), "seq_length": SEQ, "cache_dir": str(tmp / "cache"),
            "stream_lanes": 4, "stream_chunk_mb": 0.0005, "seed": 7, "document_mask": True, **kw}


def take(data, steps: int, dp_rank: int = 0, dp_size: int = 1, consumed: int = 0, state=None, workers: int = 0):
    """Per step, this rank's input_ids (and document ids) of ``steps`` steps, and the position state after."""
    loader = data.micro_batches(dp_rank, dp_size, MBS, lambda c: GBS, consumed, state, workers)
    out = []
    for _ in range(steps):
        mbs = [next(loader) for _ in range(GBS // (MBS * dp_size))]
        out.append(torch.cat([torch.cat([mb["input_ids"], mb["document_ids"]], 1) for mb in mbs]))
    return out, data.state_dict(consumed + steps * GBS)


def test_stream_equals_prepared_shards(tiny_corpus, tiny_shard_prefix, tiny_tokenizer, tmp_path):
    """Documented mode (1 lane, no shuffle): the samples of GPTDataset / T5Dataset(shuffle=False) over the shard
    `pretrain prepare --append-eod` wrote, including across the epoch boundary; JSON Lines cut in 10 units."""
    indexed = IndexedDataset(tiny_shard_prefix)
    docs = np.arange(len(indexed))
    common = dict(stream_lanes=1, stream_shuffle=False, stream_chunk_mb=0.1)
    gpt = GPTDataset(indexed, docs, 30_000, 64, 1, tiny_tokenizer.eod_id, shuffle=False, document_masking=True)
    stream = build_train_valid_datasets(data_cfg([str(tiny_corpus)], tiny_tokenizer, tmp_path, seq_length=64,
                                                 **common), "gpt", 30_000, tokenizer=tiny_tokenizer)[0]
    per_epoch = (int(indexed.sequence_lengths.sum()) - 1) // 64
    lane = stream.micro_batches(0, 1, 1, lambda c: 1, 0)
    picks = set(range(0, 30)) | set(range(per_epoch - 5, per_epoch + 5))
    for i in range(per_epoch + 5):
        sample = next(lane)
        if i in picks:
            for key, value in gpt[i].items():
                np.testing.assert_array_equal(sample[key][0].numpy(), value, err_msg=f"{key} of sample {i}")
    assert len(stream.datasets[0].units) == 10
    t5 = T5Dataset(indexed, docs, 20, 64, 7, sentinel_ids=tiny_tokenizer.sentinel_ids, eos_id=tiny_tokenizer.eos_id,
                   pad_id=tiny_tokenizer.pad_id, decoder_len=24)
    t5.chunks = GPTDataset(indexed, docs, 20, t5.raw_len, 7, tiny_tokenizer.eos_id, extra_token=0, shuffle=False)
    stream = build_train_valid_datasets(data_cfg([str(tiny_corpus)], tiny_tokenizer, tmp_path, seq_length=64,
                                                 decoder_seq_length=24, **common), "t5", 20,
                                        tokenizer=tiny_tokenizer)[0]
    lane = stream.micro_batches(0, 1, 1, lambda c: 1, 0)
    for i in range(20):
        sample = next(lane)
        for key, value in t5[i].items():
            np.testing.assert_array_equal(sample[key][0].numpy(), value, err_msg=f"t5 {key} of sample {i}")


def test_formats_and_bad_input(tiny_corpus, tiny_tokenizer, tmp_path):
    """gz / parquet / save_to_disk / file:// give the jsonl's samples; bad records are counted, or fatal with
    strict; an unreadable file names itself."""
    import datasets

    texts = [json.loads(l)["text"][:400] for l in tiny_corpus.read_text(encoding="utf-8").splitlines()[:10]]
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    with gzip.open(tmp_path / "good.jsonl.gz", "wt") as f:
        f.write(good.read_text())
    table = datasets.Dataset.from_dict({"text": texts})
    table.to_parquet(str(tmp_path / "good.parquet"))
    table.save_to_disk(str(tmp_path / "disk"))

    def first(entry: str, n: int = 30, **kw):
        data = build_train_valid_datasets(data_cfg([entry], tiny_tokenizer, tmp_path, stream_lanes=1,
                                                   stream_shuffle=False, **kw), "gpt", 100, tokenizer=tiny_tokenizer)[0]
        loader = data.micro_batches(0, 1, 1, lambda c: 1, 0)
        return torch.cat([next(loader)["input_ids"] for _ in range(n)]), loader

    ref, _ = first(str(good))
    for entry in ("good.jsonl.gz", "good.parquet", "disk", "g*.jsonl"):
        assert torch.equal(first(str(tmp_path / entry))[0], ref), entry
    assert torch.equal(first(f"file://{good}")[0], ref)

    bad = tmp_path / "bad.jsonl"
    lines = [json.dumps({"text": t}).encode() for t in texts]
    bad.write_bytes(b"\n".join([lines[0], b"{not json", b'{"text": "caf\xe9 ok"}', b'{"body": "x"}',
                                b'{"text": "  "}', *lines[1:]]) + b"\n")
    got, loader = first(str(bad), n=5)
    bad_counts = loader.bad_inputs()
    assert (bad_counts.bad_json, bad_counts.non_utf8, bad_counts.missing_key, bad_counts.empty) == (1, 1, 1, 1)
    with pytest.raises(CorpusError, match=r"bad\.jsonl.*bad_json"):
        first(str(bad), n=5, strict=True)
    (tmp_path / "broken.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(CorpusError, match=r"broken\.jsonl\.gz: cannot read"):
        first(str(tmp_path / "broken.jsonl.gz"))


def test_resume_skips_a_window_and_refuses_a_changed_source(tiny_corpus, tiny_tokenizer, tmp_path):
    """A state saved at step 2 continues at step 2, or at step 4 (a spike rollback skips steps 2-3's data);
    after the file changed, resuming is refused."""
    corpus = small_corpus(tiny_corpus, tmp_path / "c.jsonl")
    cfg = data_cfg([str(corpus)], tiny_tokenizer, tmp_path)
    ref, _ = take(build_train_valid_datasets(cfg, "gpt", 200, tokenizer=tiny_tokenizer)[0], 5)
    _, state = take(build_train_valid_datasets(cfg, "gpt", 200, tokenizer=tiny_tokenizer)[0], 2)
    again = build_train_valid_datasets(cfg, "gpt", 200, tokenizer=tiny_tokenizer)[0]
    assert torch.equal(take(again, 1, consumed=2 * GBS, state=state)[0][0], ref[2])
    assert torch.equal(take(again, 1, consumed=4 * GBS, state=state)[0][0], ref[4])
    with open(corpus, "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    changed = build_train_valid_datasets(cfg, "gpt", 200, tokenizer=tiny_tokenizer)[0]
    with pytest.raises(CorpusError, match=r"c\.jsonl changed since the checkpoint"):
        take(changed, 1, consumed=2 * GBS, state=state)
    with pytest.raises(ValueError, match="without a saved raw-data position"):
        take(changed, 1, consumed=2 * GBS)


def test_preflight_checks_raw_sources(tiny_corpus, tiny_tokenizer, tmp_path):
    from pretrain.config import ConfigError, load_config
    from pretrain.preflight import check
    from tests.test_trainer import CONFIGS

    def cfg(train: str, *extra: str):
        return load_config(CONFIGS / "gpt_tiny.yaml", [f"data.train=[{train}]", f"data.tokenizer={tiny_tokenizer.path}",
                                                       "train.global_batch_size=8", "train.micro_batch_size=8", *extra])

    check(cfg(str(tiny_corpus)), 1)
    with pytest.raises(ConfigError, match=r"raw source 'nothing/\*\.jsonl' matches no file"):
        check(cfg("nothing/*.jsonl"), 1, root=tmp_path)
    with pytest.raises(ConfigError, match="data.stream_lanes=3 does not divide train.global_batch_size=8"):
        check(cfg(str(tiny_corpus), "data.stream_lanes=3"), 1)


def resume_worker(args: dict) -> dict:
    """One leg of the resume chain on this rank: ``steps`` steps from ``consumed``/``state``."""
    import torch.distributed as dist

    tokenizer = load_tokenizer(args["tokenizer"], num_threads=1)
    data = build_train_valid_datasets(args["cfg"], "gpt", args["samples"], tokenizer=tokenizer)[0]
    state = json.loads(args["state"]) if args["state"] else None
    ids, after = take(data, args["steps"], dist.get_rank(), dist.get_world_size(), args["consumed"], state,
                      args["workers"])
    data.loader.close()
    return {"ids": torch.stack(ids), "state": json.dumps(after)}


def test_resume_any_dp_size_and_worker_count(tiny_corpus, tiny_shard_prefix, tiny_tokenizer, tmp_path):
    """2 ranks (2 workers each) -> 4 ranks (1 worker) -> 1 rank (in process): the global batches of an
    uninterrupted 1-rank run, raw text blended 3:1 with a shard, every lane wrapping epochs during the legs."""
    corpus = small_corpus(tiny_corpus, tmp_path / "c.jsonl")
    cfg = data_cfg([3, f"{tmp_path}/c*.jsonl", 1, tiny_shard_prefix], tiny_tokenizer, tmp_path)
    steps, samples = 36, 36 * GBS
    data = build_train_valid_datasets(cfg, "gpt", samples, tokenizer=tiny_tokenizer)[0]
    ref, _ = take(data, steps)
    epochs = data.loader.workers[0].lanes[(0, 0)].cursor[0]
    assert epochs >= 2, epochs  # lane 0 wrapped twice: the legs resume in later epochs

    legs, consumed = [(2, 2, 10), (4, 1, 14), (1, 0, 12)], 0
    state, got = "", []
    for world, workers, n in legs:
        args = {"cfg": cfg, "tokenizer": str(tiny_tokenizer.path), "samples": samples, "steps": n,
                "consumed": consumed, "state": state, "workers": workers}
        if world == 1:
            ids, after = take(build_train_valid_datasets(cfg, "gpt", samples, tokenizer=tiny_tokenizer)[0], n,
                              consumed=consumed, state=json.loads(state), workers=workers)
            results = [{"ids": torch.stack(ids), "state": json.dumps(after)}]
        else:
            results = run_distributed("tests.test_stream:resume_worker", world, args, timeout=240)
        got.extend(torch.cat([r["ids"][s] for r in results]) for s in range(n))  # rank order = global order
        assert len({r["state"] for r in results}) == 1  # every rank saves the same (gathered) position
        consumed, state = consumed + n * GBS, results[0]["state"]
    assert len(got) == steps
    for s, (a, b) in enumerate(zip(got, ref)):
        assert torch.equal(a, b), f"step {s}"


@pytest.mark.slow  # loader worker processes
def test_trainer_resumes_raw_jsonl_exactly(tiny_corpus, tiny_tokenizer, tmp_path, one_torch_thread):
    """`pretrain train` over raw jsonl: 6 steps straight vs stopped at 2 (checkpoint) and resumed with 2 loader
    workers instead of 0: identical losses; the checkpoint records the lanes' position."""
    from pretrain import checkpoint as ckpt
    from pretrain.config import load_config
    from pretrain.train import build_datasets
    from pretrain.trainer import EXIT_OK, EXIT_PREEMPTED, Trainer
    from tests.test_trainer import CONFIGS, SMALL_GPT, StopAt, metrics, run

    corpus = small_corpus(tiny_corpus, tmp_path / "c.jsonl", docs=40)

    def cfg(name: str, workers: int):
        return load_config(CONFIGS / "gpt_tiny.yaml", [
            f"data.train=[{corpus}]", f"data.tokenizer={tiny_tokenizer.path}", f"data.cache_dir={tmp_path / 'cache'}",
            f"model.vocab_size={tiny_tokenizer.vocab_size}", f"checkpoint.dir={tmp_path / name}", "logging.interval=1",
            "logging.tensorboard=false", "data.seq_length=32", "data.stream_lanes=4", "data.stream_chunk_mb=0.001",
            f"data.num_workers={workers}", "train.steps=6", "train.global_batch_size=8", "train.micro_batch_size=4",
            "train.eval_interval=0", "checkpoint.interval=0", *SMALL_GPT])

    torch.manual_seed(0)
    full = cfg("full", 0)
    assert run(full)[1] == EXIT_OK
    torch.manual_seed(0)
    split = cfg("split", 0)
    stop = StopAt(2)
    first = Trainer(split, *build_datasets(split), stop=stop)
    stop.trainer = first
    assert first.fit() == EXIT_PREEMPTED
    meta = json.loads((ckpt.resolve(split.checkpoint.dir) / ckpt.META).read_text())
    assert meta["data"]["lanes"] == 4 and len(meta["data"]["cursors"]) == 4
    torch.manual_seed(1)
    assert run(cfg("split", 2), resume="auto")[1] == EXIT_OK

    def losses(c):
        return {r["step"]: r["loss"] for r in metrics(c) if "loss" in r}

    assert list(losses(split)) == list(range(1, 7)) and losses(split) == losses(full)
    assert all(r["data/bad_empty"] == 0 for r in metrics(split) if "loss" in r)
