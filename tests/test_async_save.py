"""Asynchronous checkpoints (``checkpoint.async_save``): interval saves written on a background thread are the
same files as synchronous saves, resume exactly, one write at a time, errors surface on the next step; the same
under DeepSpeed DP2 ZeRO-1 and TP2 on real gloo processes."""

from __future__ import annotations

import json
import shutil
import threading
import time
import zipfile
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pretrain import checkpoint as ckpt
from pretrain.async_save import THREAD_NAME, CheckpointWriter
from pretrain.train import build_datasets
from pretrain.trainer import EXIT_OK, Trainer
from tests.dist_utils import run_distributed
from tests.test_trainer import make_cfg, metrics

SHORT = ["train.global_batch_size=4", "train.micro_batch_size=2", "schedule.warmup_steps=1",
         "schedule.warmup_fraction=0", "checkpoint.interval=2", "checkpoint.keep_last=5"]


def _run(cfg, resume=None) -> tuple[Trainer, int]:
    train, valid = build_datasets(cfg)
    trainer = Trainer(cfg, train, valid)
    trainer.resume(resume)
    return trainer, trainer.fit()


def _digest(path: Path) -> dict:
    """A file's contents, up to what differs between two saves of the same state: the ``serialization_id``
    record of a ``torch.save`` zip (new on every save) and the order of safetensors' metadata keys (a hash map)."""
    if path.suffix == ".pt":
        with zipfile.ZipFile(path) as z:
            return {r: zlib.crc32(z.read(r)) for r in z.namelist() if "serialization_id" not in r}
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return {"header": json.loads(data[8:8 + n]), "data": zlib.crc32(data[8 + n:]), "size": len(data)}


def _files(root: Path) -> dict[str, dict]:
    """Every checkpoint's file contents and position, by step directory."""
    out = {}
    for path in sorted(Path(root).glob("step_*")):
        meta = json.loads((path / ckpt.META).read_text())
        out[path.name] = {"files": {name: _digest(path / name) for name in meta["files"]},
                          "save_order": meta["save_order"], "step": meta["step"], "consumed": meta["consumed_samples"]}
    return out


def _losses(cfg) -> dict[int, tuple[float, float]]:
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in metrics(cfg) if "loss" in r}


@pytest.mark.usefixtures("one_torch_thread")
def test_async_checkpoints_equal_sync_ones_and_resume_exactly(tmp_path, tiny_shard_prefix, tiny_tokenizer,
                                                              monkeypatch):
    threads: list[tuple[int, str]] = []
    real = ckpt.save_checkpoint

    def recording(root, step, *args, **kwargs):
        threads.append((step, threading.current_thread().name))
        return real(root, step, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", recording)
    runs = {}
    for mode in ("sync", "async"):
        torch.manual_seed(0)
        cfg = make_cfg("gpt_tiny.yaml", tmp_path / mode, tiny_shard_prefix, tiny_tokenizer, *SHORT, "train.steps=7",
                       f"checkpoint.async_save={mode == 'async'}")
        trainer, code = _run(cfg)
        assert code == EXIT_OK and trainer.step == 7
        runs[mode] = cfg
    # interval saves (2, 4, 6) on the background thread, the final save (7) on the main thread
    assert threads[4:] == [(2, THREAD_NAME), (4, THREAD_NAME), (6, THREAD_NAME), (7, "MainThread")]
    assert [s for s, name in threads[:4]] == [2, 4, 6, 7] and {name for _, name in threads[:4]} == {"MainThread"}
    sync, asyn = _files(runs["sync"].checkpoint.dir), _files(runs["async"].checkpoint.dir)
    assert sorted(sync) == ["step_00000002", "step_00000004", "step_00000006", "step_00000007"]
    assert asyn == sync  # the same file contents, same steps, data positions and save order
    assert _losses(runs["async"]) == _losses(runs["sync"])

    # resume from the background-written step 6 (drop the final one): steps 7 equal the never-stopped run
    cfg = runs["async"]
    shutil.rmtree(Path(cfg.checkpoint.dir) / "step_00000007")
    (Path(cfg.checkpoint.dir) / ckpt.LATEST).write_text("step_00000006\n")
    torch.manual_seed(99)
    trainer, code = _run(cfg, resume="auto")
    assert code == EXIT_OK and trainer.step == 7
    assert _losses(cfg) == _losses(runs["sync"])


def test_one_write_in_flight_and_background_errors_surface(tmp_path, monkeypatch):
    events: list[str] = []

    def slow_save(root, step, *args, **kwargs):
        events.append(f"start {step}")
        time.sleep(0.2)
        if step == 3:
            raise OSError("disk on fire")
        events.append(f"end {step}")
        return Path(root) / ckpt.step_dir_name(step)

    monkeypatch.setattr(ckpt, "save_checkpoint", slow_save)
    writer = CheckpointWriter(enabled=True)
    state = {"w": torch.ones(3)}
    for step in (1, 2):
        assert writer.write(tmp_path, step, state, {"opt": [state["w"]]}, {}) == tmp_path / ckpt.step_dir_name(step)
        state["w"].add_(1)  # training goes on: the write holds its own copy
    writer.wait()
    assert events == ["start 1", "end 1", "start 2", "end 2"]  # the second write waited for the first
    writer.write(tmp_path, 3, state, {}, {})
    while writer.busy():
        time.sleep(0.05)
    with pytest.raises(ckpt.CheckpointError, match="background checkpoint write failed: disk on fire"):
        writer.poll()
    writer.poll()  # reported once


def test_host_copy_is_a_snapshot(tmp_path, monkeypatch):
    written = {}

    def keep(root, step, model_state, state, meta, **kwargs):
        written[step] = (model_state, state)
        return Path(root)

    writer = CheckpointWriter(enabled=True)
    live = {"w": torch.zeros(4)}
    opt = {"state": {0: {"exp_avg": torch.zeros(4)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    monkeypatch.setattr(ckpt, "save_checkpoint", keep)
    writer.write(tmp_path, 1, live, opt, {})
    live["w"].add_(5)
    opt["state"][0]["exp_avg"].add_(7)
    writer.wait()
    model_state, state = written[1]
    assert torch.equal(model_state["w"], torch.zeros(4)) and torch.equal(state["state"][0]["exp_avg"], torch.zeros(4))
    assert state["param_groups"] == [{"lr": 0.1, "params": [0]}]


def layouts_worker(args: dict) -> dict:
    """DP2 ZeRO-1 and TP2, each trained with sync and with async saves by the real trainer."""
    import torch.distributed as dist

    tokenizer = SimpleNamespace(path=args["tokenizer"], vocab_size=args["vocab"])
    out = {}
    for layout, overrides in {"zero1": ["parallel.zero=1"], "tp2": ["parallel.tp=2"]}.items():
        for mode in ("sync", "async"):
            torch.manual_seed(0)
            cfg = make_cfg("gpt_tiny.yaml", Path(args["root"]) / layout / mode, args["prefix"], tokenizer, *SHORT,
                           "train.steps=5", "train.device=cpu", f"checkpoint.async_save={mode == 'async'}", *overrides)
            train, valid = build_datasets(cfg)
            trainer = Trainer(cfg, train, valid)
            trainer.resume(None)
            assert trainer.fit() == EXIT_OK
            out[f"{layout}/{mode}"] = _files(Path(cfg.checkpoint.dir))
            del trainer
            dist.barrier()
    return out


@pytest.mark.dist
def test_async_saves_equal_sync_ones_under_zero1_and_tp2(tmp_path, tiny_shard_prefix, tiny_tokenizer):
    result = run_distributed("tests.test_async_save:layouts_worker", 2,
                             {"root": str(tmp_path), "prefix": tiny_shard_prefix, "tokenizer": str(tiny_tokenizer.path),
                              "vocab": tiny_tokenizer.vocab_size}, timeout=600)[0]
    for layout in ("zero1", "tp2"):
        sync, asyn = result[f"{layout}/sync"], result[f"{layout}/async"]
        assert sorted(sync) == ["step_00000002", "step_00000004", "step_00000005"], layout
        assert len(sync["step_00000004"]["files"]) == 4  # two ranks' model and state files
        assert asyn == sync, layout
