"""Documented commands run as written, and the launchers check a run once, before starting any process.

* Every ``pretrain train`` / ``pretrain launch local|slurm`` example in README.md and in ``pretrain launch
  --help`` passes its dry run: the whole pre-flight check (config, the layout for its number of processes,
  data files) in a directory holding the files the example names (what ``make demo`` or the user's own
  ``pretrain prepare`` would have written).
* ``pretrain launch local`` with a config that cannot work prints one line and exits 2 without starting a rank
  (issue 12 item 7, issue 13 item 6).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = re.compile(r"^\s*(pretrain (?:train|launch local|launch slurm) .*)$")

pytestmark = pytest.mark.slow  # each case is a `pretrain` process (a few seconds)


def documented_examples() -> list[str]:
    """The example command lines, continuation lines joined and trailing comments dropped."""
    from pretrain.launch import cli as launch_cli

    text = (ROOT / "README.md").read_text() + "\n" + launch_cli.__doc__
    lines = text.replace("\\\n", " ").splitlines()
    return [re.sub(r"\s+#.*$", "", m.group(1)).strip() for m in map(EXAMPLE.match, lines) if m]


def pretrain(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pretrain.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def train_args(argv: list[str]) -> list[str]:
    """The ``train ...`` part of an example's arguments."""
    return argv[argv.index("train") + 1:]


def _link(target: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.symlink_to(target)


def workspace(tmp_path: Path, examples: list[list[str]], tiny_shard_prefix: str, tokenizer_path: str) -> Path:
    """A working directory with ``configs/`` and the data files each example's config names."""
    from pretrain.config import load_config

    (tmp_path / "configs").symlink_to(ROOT / "configs")
    for argv in examples:
        config, *rest = train_args(argv)
        cfg = load_config(tmp_path / config, [a for a in rest if "=" in a and not a.startswith("-")])
        for prefix in [p for p in cfg.data.train + cfg.data.valid if isinstance(p, str)]:
            if prefix.endswith(".jsonl"):  # raw text (tokenized while training): only its existence is checked
                _link(tiny_shard_prefix + ".json", tmp_path / prefix)
                continue
            for ext in (".bin", ".idx", ".json"):
                _link(tiny_shard_prefix + ext, tmp_path / (prefix + ext))
        _link(tokenizer_path, tmp_path / cfg.data.tokenizer)
    return tmp_path


def test_readme_and_help_examples_pass_their_dry_run(tmp_path, tiny_shard_prefix, tiny_tokenizer):
    examples = [shlex.split(line)[1:] for line in documented_examples()]
    kinds = sorted({" ".join(argv[:2]) if argv[0] == "launch" else argv[0] for argv in examples})
    assert kinds == ["launch local", "launch slurm", "train"], examples  # README and --help still have them
    cwd = workspace(tmp_path, examples, tiny_shard_prefix, tiny_tokenizer.path)
    for argv in examples:
        dry = [*argv[:2], "--dry-run", *argv[2:]] if argv[0] == "launch" else [*argv, "--dry-run"]
        out = pretrain(cwd, *dry)
        assert out.returncode == 0, f"pretrain {' '.join(argv)}\n{out.stderr[-3000:]}"
        assert "Traceback" not in out.stderr


@pytest.mark.parametrize("nproc,override,message", [
    (4, "parallel.tp=3", "parallel.tp=3 does not divide model.num_heads=4"),
    (3, "parallel.tp=2", "3 processes are not divisible by parallel.tp x parallel.pp = 2 x 1"),
    (2, "train.steps=5", "train.global_batch_size=16 must be a multiple of train.micro_batch_size x "
                         "data-parallel size = 16 x 2"),  # plain data parallelism
])
def test_launch_local_checks_once_before_starting_ranks(nproc, override, message, tmp_path, tiny_shard_prefix,
                                                         tiny_tokenizer):
    argv = ["launch", "local", "--nproc", str(nproc), "--", "train", "configs/gpt_tiny.yaml", override]
    cwd = workspace(tmp_path, [argv[:-1]], tiny_shard_prefix, tiny_tokenizer.path)
    out = pretrain(cwd, *argv)
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert out.returncode == 2, out.stdout + out.stderr
    assert len(lines) == 1 and message in lines[0], lines
    assert not (cwd / "runs" / "gpt_tiny").exists()  # no rank started
