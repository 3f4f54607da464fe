"""Bad input to ``pretrain``: one line naming the key or file and the fix, exit code 2, no traceback.

In process (``pretrain.cli.main``), no subprocess: issue 13 items 5 (T5 span-corruption values), 12 (user
mistakes in ``pretrain train``), 15 (overrides after flags), 16 (``--resume auto`` past ``train.steps``), 20
(``pretrain`` without arguments), and issue 12's "``parallel.pp=2`` in one process".
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pretrain.cli import main
from pretrain.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``pretrain ARGV...``."""
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def small_run(tmp_path: Path, prefix: str, tokenizer) -> list[str]:
    """``pretrain train`` arguments of a tiny GPT on the test shard (a few seconds a step on one core)."""
    return [str(CONFIGS / "gpt_tiny.yaml"), f"data.train=[{prefix}]", f"data.tokenizer={tokenizer.path}",
            f"data.cache_dir={tmp_path / 'index'}", f"model.vocab_size={tokenizer.vocab_size}",
            "model.hidden_size=32", "model.num_layers=1", "data.seq_length=32", "train.global_batch_size=4",
            "train.micro_batch_size=2", f"checkpoint.dir={tmp_path / 'run'}", "train.eval_interval=0",
            "logging.tensorboard=false", "logging.interval=1"]


def test_no_arguments_prints_usage_and_exits_2(capsys):
    code, _, err = cli(capsys)
    assert code == 2
    assert err.startswith("usage: pretrain") and "train " in err


def _empty_shard(tmp_path: Path, tiny_shard_prefix: str) -> str:
    from pretrain.data.indexed import IndexedDatasetWriter

    prefix = str(tmp_path / "empty")
    IndexedDatasetWriter(prefix).finalize()
    shutil.copy(tiny_shard_prefix + ".json", prefix + ".json")
    return prefix


def _other_tokenizer_shard(tmp_path: Path, tiny_shard_prefix: str) -> str:
    """The test shard, recorded as made by another tokenizer (another identity in PREFIX.json)."""
    import json

    prefix = str(tmp_path / "other")
    for ext in (".bin", ".idx"):
        shutil.copy(tiny_shard_prefix + ext, prefix + ext)
    meta = json.loads(Path(tiny_shard_prefix + ".json").read_text())
    meta["tokenizer"]["identity"] = "0" * 64
    Path(prefix + ".json").write_text(json.dumps(meta))
    return prefix


# (name, extra arguments given (tmp_path, tiny_shard_prefix), text the one line must contain)
BAD_INPUT = [
    ("missing shard", lambda t, p: [f"data.train=[{t}/nope]"], "nope.bin"),
    ("missing tokenizer", lambda t, p: [f"data.tokenizer={t}/nope.model"], "data.tokenizer"),
    ("resume a directory that is no checkpoint", lambda t, p: ["--resume", str(t)], "not a checkpoint"),
    ("resume Auto", lambda t, p: ["--resume", "Auto"], "did you mean --resume auto"),
    ("shard of another tokenizer", lambda t, p: [f"data.train=[{_other_tokenizer_shard(t, p)}]"],
     "tokenizer mismatch"),
    ("empty shard", lambda t, p: [f"data.train=[{_empty_shard(t, p)}]"], "holds no tokens"),
    ("zero sequence length", lambda t, p: ["data.seq_length=0"], "data.seq_length must be >= 1"),
    ("pipeline in one process", lambda t, p: ["parallel.pp=2", "model.num_layers=2"],
     "1 processes are not divisible by parallel.tp x parallel.pp = 1 x 2"),
]


@pytest.mark.parametrize("name,extra,message", BAD_INPUT, ids=[case[0] for case in BAD_INPUT])
def test_train_bad_input_is_one_line(name, extra, message, tmp_path, capsys, tiny_shard_prefix, tiny_tokenizer):
    code, _, err = cli(capsys, "train", *small_run(tmp_path, tiny_shard_prefix, tiny_tokenizer),
                       *extra(tmp_path, tiny_shard_prefix))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("pretrain train: ") and message in lines[0], err
    assert not (tmp_path / "run").exists()  # nothing started


def test_debug_shows_the_traceback(tmp_path, capsys, tiny_shard_prefix, tiny_tokenizer):
    with pytest.raises(ConfigError, match="data.seq_length must be >= 1"):
        main(["train", *small_run(tmp_path, tiny_shard_prefix, tiny_tokenizer), "data.seq_length=0", "--debug"])


@pytest.mark.parametrize("override,message", [
    ("data.noise_density=1.5", "data.noise_density must be in \\(0, 1\\)"),
    ("data.noise_density=0", "data.noise_density must be in \\(0, 1\\)"),
    ("data.mean_span_length=0", "data.mean_span_length must be >= 1"),
    ("data.mean_span_length=-2", "data.mean_span_length must be >= 1"),
])
def test_t5_span_corruption_values_are_validated(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "t5_tiny.yaml", [override])


def test_t5_lengths_refuse_degenerate_span_values():
    """Used directly (not through a config), the length search refuses what used to loop forever or divide
    by zero."""
    from pretrain.data.t5_dataset import compute_input_and_target_lengths

    assert compute_input_and_target_lengths(512) == (568, 114)
    with pytest.raises(ValueError, match="data.noise_density"):
        compute_input_and_target_lengths(64, noise_density=1.5)
    with pytest.raises(ValueError, match="data.mean_span_length"):
        compute_input_and_target_lengths(64, mean_noise_span_length=0)


def test_overrides_after_flags(tmp_path, capsys, tiny_shard_prefix, tiny_tokenizer):
    config, *overrides = small_run(tmp_path, tiny_shard_prefix, tiny_tokenizer)
    code, out, err = cli(capsys, "train", config, "--resume", "auto", *overrides, "train.steps=3", "--dry-run")
    assert code == 0, err
    assert "data files OK" in out


def test_resume_past_the_last_step_says_nothing_to_do(tmp_path, capsys, tiny_shard_prefix, tiny_tokenizer,
                                                      one_torch_thread):
    args = [*small_run(tmp_path, tiny_shard_prefix, tiny_tokenizer), "train.steps=2", "--resume", "auto"]
    code, out, err = cli(capsys, "train", *args)
    assert code == 0, err
    assert "step 2/2" in out and (tmp_path / "run" / "latest").read_text().strip() == "step_00000002"
    code, out, err = cli(capsys, "train", *args)
    assert code == 0, err
    assert "already at step 2 >= train.steps=2: nothing to do" in out
