"""Checkpoint files under faults: re-saving the step ``latest`` names, damaged files, a full disk, pruning order."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
from pathlib import Path

import pytest
import torch

from pretrain import checkpoint as ckpt
from pretrain import reshard
from pretrain.checkpoint import CheckpointError


def _state(seed: int, n: int = 4) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(n, n, generator=g)}


def _save(root: Path, step: int, keep_last: int = 3, n: int = 4) -> Path:
    return ckpt.save_checkpoint(root, step, _state(step, n), {"opt": {"m": torch.full((2,), float(step))}},
                                {"consumed_samples": step}, keep_last=keep_last)


# --- item 9: re-saving the step `latest` names ---------------------------------------------------------------

def test_resave_of_latest_is_atomic_and_resume_falls_back(tmp_path, monkeypatch, caplog):
    root = tmp_path / "ckpt"
    _save(root, 1)
    _save(root, 2)
    real_replace = ckpt.os.replace

    def killed_while_publishing(src, dst):
        if Path(src).name == ".tmp_step_00000002" and Path(dst).name == "step_00000002":
            raise KeyboardInterrupt("killed between removing the old step_2 and publishing the new one")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", killed_while_publishing)
    with pytest.raises(KeyboardInterrupt):
        _save(root, 2)
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger="pretrain.checkpoint"):
        path = ckpt.resolve(root, "auto")  # `latest` names step_2, which is gone: the newest complete one
    assert path is not None and path.name in ("step_00000001", "step_00000002")
    assert "latest" in caplog.text and "newest complete" in caplog.text
    model, state, meta = ckpt.load_checkpoint(path)
    assert torch.equal(model["w"], _state(meta["step"])["w"])
    # the next save publishes normally and leaves no debris of the interrupted one
    _save(root, 2)
    assert ckpt.resolve(root).name == "step_00000002"
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]
    (root / ckpt.LATEST).unlink()  # a crash before the first `latest` was written
    assert ckpt.resolve(root).name == "step_00000002"


def test_resave_replaces_the_contents(tmp_path):
    root = tmp_path / "ckpt"
    _save(root, 1)
    ckpt.save_checkpoint(root, 1, _state(9), {}, {"consumed_samples": 99})
    model, _, meta = ckpt.load_checkpoint(ckpt.resolve(root))
    assert meta["consumed_samples"] == 99 and torch.equal(model["w"], _state(9)["w"])
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001"]


# --- item 10: every file's size and checksum, verified --------------------------------------------------------

def test_every_file_of_a_checkpoint_follows_the_umask(tmp_path):
    """safetensors writes owner-only files; a checkpoint's files all get the umask's mode, like its meta.json."""
    old = os.umask(0o022)
    try:
        path = _save(tmp_path / "ckpt", 1)
    finally:
        os.umask(old)
    modes = {f.name: f.stat().st_mode & 0o777 for f in path.iterdir()}
    assert set(modes.values()) == {0o644}, modes


def test_meta_records_size_and_checksum_of_every_file(tmp_path):
    path = _save(tmp_path / "ckpt", 1)
    files = json.loads((path / ckpt.META).read_text())["files"]
    assert sorted(files) == [ckpt.model_file(0), ckpt.state_file(0)]
    for name, rec in files.items():
        assert rec["size"] == (path / name).stat().st_size and len(rec[ckpt.CHECKSUM]) > 0


def _flip_byte(path: Path, offset_from_end: int = 20) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["bitflip", "truncated", "empty"])
def test_damaged_model_file_is_refused_naming_it(tmp_path, damage):
    path = _save(tmp_path / "ckpt", 1, n=64)
    f = path / ckpt.model_file(0)
    if damage == "bitflip":
        _flip_byte(f)  # inside the tensor data: safetensors itself reads it without complaint
    elif damage == "truncated":
        f.write_bytes(f.read_bytes()[:-100])
    else:
        f.write_bytes(b"")
    for load in (lambda: ckpt.load_checkpoint(path), lambda: reshard.consolidate(path)):
        with pytest.raises(CheckpointError, match=r"model_rank00000\.safetensors"):
            load()


def test_bitflipped_state_file_is_refused(tmp_path):
    path = _save(tmp_path / "ckpt", 1)
    _flip_byte(path / ckpt.state_file(0), 200)
    with pytest.raises(CheckpointError, match=r"state_rank00000\.pt.*checksum"):
        ckpt.load_checkpoint(path)


def test_inspect_reports_damaged_files(tmp_path, capsys):
    from pretrain.cli import main

    path = _save(tmp_path / "ckpt", 1, n=64)
    assert main(["ckpt", "inspect", str(path)]) == 0
    assert "2 files verified" in capsys.readouterr().out
    _flip_byte(path / ckpt.model_file(0))
    assert main(["ckpt", "inspect", str(path)]) != 0
    err = capsys.readouterr().err
    assert "model_rank00000.safetensors" in err and "checksum" in err
    (path / ckpt.state_file(0)).write_bytes(b"")
    assert main(["ckpt", "inspect", str(path)]) != 0
    assert "state_rank00000.pt" in capsys.readouterr().err


# --- item 11: a full disk --------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root only), or None where mounting is not permitted."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        yield None
        return
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def _assert_previous_intact(root: Path) -> None:
    assert not [p.name for p in root.iterdir() if p.name.startswith(".tmp")]
    path = ckpt.resolve(root)
    model, _, meta = ckpt.load_checkpoint(path)
    assert path.name == "step_00000001" and torch.equal(model["w"], _state(1)["w"])


def test_save_larger_than_free_space_is_refused_before_writing(tmp_path, small_disk, monkeypatch):
    root = (small_disk or tmp_path) / "ckpt"
    _save(root, 1)
    if small_disk is None:
        monkeypatch.setattr(ckpt, "free_bytes", lambda path: 100_000)
    with pytest.raises(CheckpointError, match=r"no space left on .*ckpt \(needed ~.*MiB, free .*\)"):
        _save(root, 2, n=512)  # 1 MiB of weights
    _assert_previous_intact(root)


def test_disk_full_while_writing_names_space_and_cleans_up(tmp_path, small_disk, monkeypatch):
    root = (small_disk or tmp_path) / "ckpt"
    _save(root, 1)
    monkeypatch.setattr(ckpt, "free_bytes", lambda path: 10**12)  # the estimate passes; the writes then fail
    if small_disk is None:
        real_save = ckpt.torch.save

        def enospc(*args, **kwargs):
            real_save(*args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(ckpt.torch, "save", enospc)
    with pytest.raises(CheckpointError, match=r"no space left on .*ckpt \(needed ~.*, free .*\)"):
        _save(root, 2, n=512)
    monkeypatch.undo()
    _assert_previous_intact(root)


# --- item 3: pruning follows the order of saves, not names ------------------------------------------------------

def test_prune_follows_the_order_of_saves(tmp_path):
    root = tmp_path / "ckpt"
    for step in (10, 20, 30):  # an earlier run
        _save(root, step, keep_last=2)
    for step in (1, 2):  # a run started over in the same directory
        _save(root, step, keep_last=2)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000001", "step_00000002"]
    assert ckpt.resolve(root).name == "step_00000002"


def test_holds_checkpoints(tmp_path):
    root = tmp_path / "ckpt"
    assert not ckpt.holds_checkpoints(root)
    root.mkdir()
    (root / "notes.txt").write_text("x")
    assert not ckpt.holds_checkpoints(root)
    _save(root, 1)
    assert ckpt.holds_checkpoints(root)
