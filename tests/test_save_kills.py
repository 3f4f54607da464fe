"""SIGKILL during background checkpoint writes (``checkpoint.async_save``), with real processes.

One training process per kill: each resumes the last published checkpoint (``--resume auto``), and is killed by
SIGKILL from inside its background writer at a seeded file operation (before or after a file write, fsync,
checksum, rename, the ``latest`` update, a prune). After each kill ``latest`` must name a complete checkpoint that
loads; the stitched run (metrics rows after a resume point are replaced by the resumed run's) must have exactly the
losses of a run that was never stopped.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pretrain import checkpoint as ckpt
from pretrain.async_save import THREAD_NAME
from pretrain.train import build_datasets
from pretrain.trainer import EXIT_OK, Trainer
from tests.test_trainer import make_cfg, metrics

REPO = Path(__file__).resolve().parents[1]
STEPS, KILLS = 24, 10
SEED = 18
OVERRIDES = ["train.global_batch_size=2", "train.micro_batch_size=2", "schedule.warmup_steps=1",
             "schedule.warmup_fraction=0", "checkpoint.interval=1", "checkpoint.keep_last=2",
             f"train.steps={STEPS}", "model.hidden_size=16", "data.seq_length=16"]
# the operations of a background write a kill can land before or after (names in pretrain.checkpoint's view)
KILL_POINTS = {ckpt: ("save_file", "_fsync", "checksum", "write_atomic", "prune", "_merge_records"),
               ckpt.os: ("replace",), ckpt.shutil: ("rmtree",), ckpt.torch: ("save",)}


def _cfg(args: dict):
    tokenizer = SimpleNamespace(path=args["tokenizer"], vocab_size=args["vocab"])
    return make_cfg("gpt_tiny.yaml", Path(args["root"]), args["prefix"], tokenizer, *OVERRIDES, *args["extra"])


def _arm(kill_at: int, after: bool) -> None:
    """SIGKILL this process at the ``kill_at``-th file operation of its background writes from the second save on
    (so every process publishes at least one checkpoint), before or ``after`` the operation."""
    count = {"saves": 0, "ops": 0}
    real_save = ckpt.save_checkpoint

    def counting_save(*a, **kw):
        count["saves"] += 1
        return real_save(*a, **kw)

    def wrap(module, name):
        real = getattr(module, name)

        def op(*a, **kw):
            index = 0  # this operation's number (operations nest: write_atomic renames and fsyncs)
            if threading.current_thread().name == THREAD_NAME and count["saves"] >= 2:
                count["ops"] += 1
                index = count["ops"]
            if index == kill_at and not after:
                os.kill(os.getpid(), signal.SIGKILL)
            out = real(*a, **kw)
            if index == kill_at and after:
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        setattr(module, name, op)

    ckpt.save_checkpoint = counting_save
    for module, names in KILL_POINTS.items():
        for name in names:
            wrap(module, name)


def child(args: dict) -> int:
    torch.manual_seed(0)
    cfg = _cfg(args)
    if args.get("kill_at"):
        _arm(args["kill_at"], args["after"])
    train, valid = build_datasets(cfg)
    trainer = Trainer(cfg, train, valid)
    trainer.resume("auto")
    return trainer.fit()


def _published(root: Path) -> int:
    """The step ``latest`` names, checking that it is complete and loads (no fallback to an older one)."""
    name = (root / ckpt.LATEST).read_text().strip()
    path = ckpt.resolve(root)
    assert path.name == name, f"latest names {name}, which is incomplete (resolve fell back to {path.name})"
    state, meta = ckpt.load_checkpoint(path)[1:]
    assert "optimizer" in state and meta["step"] == int(name.removeprefix("step_"))
    return meta["step"]


@pytest.mark.usefixtures("one_torch_thread")
def test_sigkill_during_background_writes_never_breaks_latest_and_resume_is_exact(tmp_path, tiny_shard_prefix,
                                                                                   tiny_tokenizer):
    args = {"prefix": tiny_shard_prefix, "tokenizer": str(tiny_tokenizer.path), "vocab": tiny_tokenizer.vocab_size,
            "extra": ["checkpoint.async_save=true"]}
    reference = _cfg({**args, "root": str(tmp_path / "reference")})
    torch.manual_seed(0)
    train, valid = build_datasets(reference)
    assert Trainer(reference, train, valid).fit() == EXIT_OK
    expected = {r["step"]: r["loss"] for r in metrics(reference) if "loss" in r}

    killed = _cfg({**args, "root": str(tmp_path / "killed")})
    root = Path(killed.checkpoint.dir)
    rng = random.Random(SEED)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    published, lost = [], []
    codes = []
    for _ in range(KILLS + 1):
        kill = {"kill_at": rng.randint(1, 17), "after": rng.random() < 0.5} if len(codes) < KILLS else {}
        spec = json.dumps({**args, "root": str(tmp_path / "killed"), **kill})
        proc = subprocess.run([sys.executable, "-m", "tests.test_save_kills", spec], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        codes.append(proc.returncode)
        if kill:
            assert proc.returncode == -signal.SIGKILL, (kill, published, proc.stderr[-3000:])
            reached = max(r["step"] for r in metrics(killed) if "loss" in r)
            published.append(_published(root))
            lost.append(reached - published[-1])
    assert codes[-1] == EXIT_OK, codes
    assert published == sorted(published) and published[-1] < STEPS  # every kill landed in a background write
    got = {r["step"]: r["loss"] for r in metrics(killed) if "loss" in r}
    assert got == expected  # exact float equality, every step of the stitched run
    assert not list(root.glob(".tmp_step_*")), "the last save left its temporary directory"
    print(f"kills: {KILLS}, published after each: {published}, steps lost: {lost}")
    shutil.rmtree(tmp_path / "killed", ignore_errors=True)


if __name__ == "__main__":
    sys.exit(child(json.loads(sys.argv[1])))
