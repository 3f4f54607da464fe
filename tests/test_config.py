"""Config loading: YAML + dotted overrides, and errors that name the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.config import ConfigError, from_dict, load_config, parse_overrides, save_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["gpt_tiny", "gpt2_tiny", "switch_gpt_tiny", "t5_tiny", "gpt_125m", "gpt_1.3b",
                                  "t5_small", "t5_base"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.train.steps > 0 and cfg.family in ("gpt", "t5")


def test_overrides_apply_with_yaml_types(tmp_path):
    cfg = load_config(CONFIGS / "gpt_tiny.yaml", ["train.steps=7", "optimizer.betas=[0.8, 0.9]",
                                                  "checkpoint.dir=runs/x", "model.moe.num_experts=4",
                                                  "optimizer.lr=1e-3", "logging.peak_tflops=null"])
    assert cfg.train.steps == 7 and cfg.optimizer.betas == (0.8, 0.9) and cfg.checkpoint.dir == "runs/x"
    assert cfg.model.moe.num_experts == 4 and cfg.optimizer.lr == 1e-3 and cfg.logging.peak_tflops is None
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}
    save_config(cfg, tmp_path / "c.yaml")  # round trip
    again = load_config(tmp_path / "c.yaml")
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("override, message", [
    ("train.step=5", "unknown key 'train.step'; did you mean 'steps'"),
    ("trian.steps=5", "unknown section 'trian'; did you mean 'train'"),
    ("model.hiden_size=5", "unknown key 'model.hiden_size'; did you mean 'hidden_size'"),
    ("train.steps=abc", "train.steps must be int, got 'abc'"),
    ("train.steps=0", "train.steps must be > 0"),
    ("train.micro_batch_size=3", "multiple of train.micro_batch_size"),
    ("optimizer.name=sgd", "optimizer.name must be 'adamw' or 'lamb'"),
    ("schedule.decay=exp", "schedule.decay must be one of"),
    ("schedule.scaling=linear", "schedule.base_batch_size"),
    ("model.num_heads=5", "model.num_heads"),
    ("model.family=bert", "set model.family to one of"),
    ("train.precision=fp8", "train.precision"),
    ("parallel.zero=4", "parallel.zero must be 0..3"),
    ("data.seq_length=4096", "data.seq_length=4096 exceeds model.max_seq_len=128"),
    ("trainsteps", "must look like section.key=value"),
])
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(CONFIGS / "gpt_tiny.yaml", [override])
    assert message in str(err.value)
    assert "gpt_tiny.yaml" in str(err.value) or override == "trainsteps"


def test_conflicting_warmups_and_missing_family(tmp_path):
    with pytest.raises(ConfigError, match="give only one of"):
        load_config(CONFIGS / "gpt_tiny.yaml", ["schedule.warmup_steps=10"])  # warmup_fraction is set too
    with pytest.raises(ConfigError, match="model.family is required"):
        from_dict({"train": {"steps": 1}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_exponent_floats_read_as_numbers(tmp_path):
    """PyYAML reads ``1e-5`` as a string; the loader takes it as a float (and ``2e3`` as an int where one is due)."""
    path = tmp_path / "c.yaml"
    text = (CONFIGS / "gpt_tiny.yaml").read_text()
    path.write_text(text.replace("lr: 3.0e-3", "lr: 1e-5").replace("min_lr: 3.0e-4", "min_lr: 3E-6")
                    .replace("max_seq_len: 128", "max_seq_len: 128\n  init_std: 2e-2"))
    cfg = load_config(path, ["train.steps=2e3", "optimizer.eps=1e-9"])
    assert (cfg.optimizer.lr, cfg.schedule.min_lr, cfg.train.steps, cfg.optimizer.eps) == (1e-5, 3e-6, 2000, 1e-9)
    assert cfg.model.init_std == 0.02  # the family's own section too
    from pretrain.config import OptimizerConfig, dataclass_from_dict

    assert dataclass_from_dict(OptimizerConfig, {"lr": "1e-5"}, "optimizer").lr == 1e-5  # a string from another reader
    with pytest.raises(ConfigError, match="optimizer.lr must be a number"):
        dataclass_from_dict(OptimizerConfig, {"lr": "fast"}, "optimizer")


# --- structure (issue 12 item 4) -----------------------------------------------------------------------------
def test_every_key_is_listed_with_type_default_and_doc(capsys):
    """`pretrain config keys` is generated from the dataclasses: every field of every section, with the doc
    comment written next to it."""
    import dataclasses

    from pretrain.cli import main
    from pretrain.config import SECTIONS
    from pretrain.configlib import describe_keys

    for name, cls in SECTIONS.items():
        keys = describe_keys(cls, name)
        assert [k.key for k in keys] == [f"{name}.{f.name}" for f in dataclasses.fields(cls)]
        assert all(k.doc and k.type for k in keys), [k.key for k in keys if not k.doc]
    assert main(["config", "keys", "train"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("train.steps "))
    assert line.split()[:3] == ["train.steps", "int", "1000"] and "optimizer steps" in line
    assert main(["config", "keys", "trian"]) == 2
    assert "did you mean 'train'" in capsys.readouterr().err


def test_config_machinery_is_a_leaf_and_config_is_in_no_import_cycle():
    """The generic dict -> dataclass machinery imports nothing of ours; config, schedule, the layout checks,
    the model registry and the pre-flight step import each other in one direction only."""
    from tests.test_structure import import_graph

    graph = import_graph()
    assert not [m for m in graph["pretrain.configlib"] if m.startswith("pretrain")]

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    for module in ("pretrain.config", "pretrain.schedule", "pretrain.parallel.validate", "pretrain.preflight"):
        assert module not in reachable(module), module
