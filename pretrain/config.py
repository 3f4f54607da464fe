"""The training config: one tree of dataclasses, loaded from YAML plus dotted ``key=value`` overrides.

Everything is validated before any work starts; errors name the key and say how to fix it (unknown keys
get a "did you mean"). The ``model`` section is family-specific: ``model.family`` picks the dataclass
from :func:`pretrain.models.config_class`, which validates the rest of the section.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pretrain.schedule import DECAY_STYLES, SCALING_RULES, WSD_DECAY_STYLES


class _Loader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, except that ``1e-5`` and ``3E+4`` are floats (PyYAML wants ``1.0e-5``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type or an invalid value; the message names the key."""


@dataclass
class DataConfig:
    """Training data: shard prefixes (optionally weighted) and how samples are built from them."""

    train: list = field(default_factory=list)  # ["PREFIX", ...] or [weight, "PREFIX", weight, "PREFIX", ...]
    valid: list = field(default_factory=list)  # separate validation prefixes; empty = split off `split`
    split: str = "98,2,0"  # train,valid,test proportions of `train` when `valid` is empty
    tokenizer: str | None = None  # checked against the shards' PREFIX.json
    seq_length: int = 1024  # GPT sample length; T5 encoder length
    decoder_seq_length: int = 128  # T5 only
    noise_density: float = 0.15  # T5 span corruption
    mean_span_length: float = 3.0
    eod_mask_loss: bool = False
    document_mask: bool = False
    seed: int = 1234
    num_workers: int = 0
    cache_dir: str | None = None


@dataclass
class OptimizerConfig:
    name: str = "adamw"  # adamw | lamb
    lr: float = 3e-4  # base LR, at schedule.base_batch_size when a scaling rule is set
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    no_decay: list = field(default_factory=lambda: ["norm", "bias", "embedding"])
    clip_grad: float = 1.0  # global-norm clipping; 0 disables


@dataclass
class ScheduleConfig:
    scaling: str = "none"  # none | linear | sqrt (Goyal et al.)
    base_batch_size: int | None = None  # the batch size `optimizer.lr` was tuned at
    warmup_steps: int | None = None  # give at most one of warmup_steps / warmup_samples / warmup_fraction
    warmup_samples: int | None = None
    warmup_fraction: float = 0.0
    decay: str = "cosine"  # constant | linear | cosine | inverse_sqrt | wsd
    min_lr: float = 0.0
    decay_fraction: float = 0.2  # wsd: share of post-warmup training spent decaying
    wsd_decay: str = "linear"  # linear | cosine | sqrt
    rampup_start: int | None = None  # GPT-3 batch ramp-up: start size, increment, over this many samples
    rampup_increment: int = 1
    rampup_samples: int = 0


@dataclass
class TrainConfig:
    steps: int = 1000
    global_batch_size: int = 8
    micro_batch_size: int = 8
    seed: int = 1234
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False  # torch.compile the model in place (parameter names unchanged); the first step compiles
    eval_interval: int = 0  # 0 = no validation
    eval_steps: int = 10
    # zero-/few-shot tasks (names or YAML paths, as for `pretrain eval`) scored on the live model at every
    # eval_interval, requests split over the data-parallel ranks; logged as eval/<task>/<k>shot/<metric>
    eval_tasks: list = field(default_factory=list)
    eval_tasks_limit: int | None = 200  # first N items of each task (None = all)
    eval_tasks_fewshot: int = 0
    prefetch: bool = True  # read and collate the next step's micro-batches in a background thread
    max_nonfinite: int = 5  # stop (with a checkpoint) after this many non-finite steps in a row
    # end the process with a diagnostic (rank, phase, stacks; exit 124) when a step, validation or checkpoint save
    # makes no progress for this long, e.g. a hung collective; 0 = off. $PRETRAIN_WATCHDOG_TIMEOUT overrides.
    watchdog_timeout: float = 1800.0


@dataclass
class CheckpointConfig:
    dir: str | None = None  # None = no checkpoints
    init_from: str | None = None  # start from these model weights only (fresh optimizer, schedule, data position)
    interval: int = 0  # save every N steps (0 = only at the end)
    keep_last: int = 3
    save_final: bool = True


@dataclass
class LoggingConfig:
    dir: str | None = None  # metrics.jsonl + TensorBoard events; defaults to checkpoint.dir
    interval: int = 10
    tensorboard: bool = True
    peak_tflops: float | None = None  # per device, for MFU; None = measure (CPU) or guess from the GPU name


@dataclass
class ParallelConfig:
    """Layout schema; ``pretrain.parallel.validate`` checks combinations in depth when present."""

    tp: int = 1
    pp: int = 1
    vpp: int = 1
    ep: int = 1
    sp: bool = False
    zero: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False


@dataclass
class Config:
    model: Any = None  # the family's config dataclass (model.family selects it)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    family: str = "gpt"

    def to_dict(self) -> dict:
        """Plain nested dict (the YAML form): round-trips through :func:`from_dict`."""
        out = {k: _plain(dataclasses.asdict(getattr(self, k))) for k in _SECTIONS}
        out["model"] = {"family": self.family, **_plain(dataclasses.asdict(self.model))}
        return out

    @property
    def log_dir(self) -> str | None:
        return self.logging.dir or self.checkpoint.dir


_SECTIONS = {"data": DataConfig, "optimizer": OptimizerConfig, "schedule": ScheduleConfig,
             "train": TrainConfig, "checkpoint": CheckpointConfig, "logging": LoggingConfig,
             "parallel": ParallelConfig}


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _suggest(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(options))}"


def dataclass_from_dict(cls: type, values: dict, where: str) -> Any:
    """Instantiate dataclass ``cls`` from plain ``values`` (a YAML section), checking names and types and
    recursing into nested dataclass fields; nothing is silently ignored."""
    if isinstance(values, cls):
        return values
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown key '{where}.{key}'{_suggest(key, fields)}")
        hint, name = hints[key], f"{where}.{key}"
        kwargs[key] = (dataclass_from_dict(hint, value, name) if dataclasses.is_dataclass(hint)
                       else _coerce(value, hint, name))
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a type hint (int/float/bool/str/list/tuple, optionally ``| None``)."""
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args or hint is Any:
            return None
        raise ConfigError(f"{key} must not be null")
    if type(None) in args:
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint) or hint
    if hint is Any:
        return value
    if origin is bool:
        if isinstance(value, bool):
            return value
    elif origin is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # 1e6 in YAML
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"[-+]?[0-9_]+(\.0*)?([eE]\+?[0-9]+)?", value.strip()):
            return int(float(value))  # "1e6" read as a string by another YAML reader
    elif origin is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # plain PyYAML (YAML 1.1) reads 3e-4 as a string
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{key} must be a number (float), got {value!r}") from None
    elif origin is str:
        if isinstance(value, str):
            return value
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            return origin(value)
        if isinstance(value, str):  # `train.eval_tasks=a,b` on the command line
            return origin(v.strip() for v in value.split(",") if v.strip())
    else:
        return value
    raise ConfigError(f"{key} must be {getattr(origin, '__name__', origin)}, got {value!r} "
                      f"({type(value).__name__})")


def from_dict(raw: dict, source: str = "<config>") -> Config:
    """Build and validate a :class:`Config` from a nested dict (as read from YAML)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    valid = {*_SECTIONS, "model"}
    for key in raw:
        if key not in valid:
            raise ConfigError(f"{source}: unknown section '{key}'{_suggest(key, valid)}")
    sections = {name: dataclass_from_dict(cls, raw.get(name) or {}, name) for name, cls in _SECTIONS.items()}
    model_raw = dict(raw.get("model") or {})
    family = model_raw.pop("family", None)
    if not family:
        raise ConfigError(f"{source}: model.family is required (e.g. model.family=gpt | t5 | switch_gpt)")
    cfg = Config(model=build_model_config(family, model_raw), family=family, **sections)
    validate(cfg)
    return cfg


def build_model_config(family: str, values: dict) -> Any:
    """The family's config dataclass from ``values``, validated by the family; errors name ``model.<key>``."""
    from pretrain.models import config_class

    try:
        model_cfg = dataclass_from_dict(config_class(family), values, "model")
        model_cfg.validate()
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e) if "model" in str(e) else f"model: {e}") from None
    return model_cfg


def validate(cfg: Config) -> None:
    """Ranges and cross-section checks; deep parallel-layout checks live in ``pretrain.parallel.validate``."""
    t, s, o, p = cfg.train, cfg.schedule, cfg.optimizer, cfg.parallel

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(t.steps > 0, f"train.steps must be > 0, got {t.steps}")
    need(t.micro_batch_size > 0, f"train.micro_batch_size must be > 0, got {t.micro_batch_size}")
    need(t.global_batch_size > 0 and t.global_batch_size % t.micro_batch_size == 0,
         f"train.global_batch_size ({t.global_batch_size}) must be a positive multiple of "
         f"train.micro_batch_size ({t.micro_batch_size})")
    need(t.precision in ("fp32", "bf16"), f"train.precision must be 'fp32' or 'bf16', got {t.precision!r}")
    need(t.device in ("auto", "cpu", "cuda"), f"train.device must be auto|cpu|cuda, got {t.device!r}")
    need(t.max_nonfinite >= 1, "train.max_nonfinite must be >= 1")
    need(t.watchdog_timeout >= 0, f"train.watchdog_timeout must be >= 0 (0 = off), got {t.watchdog_timeout}")
    need(o.name in ("adamw", "lamb"), f"optimizer.name must be 'adamw' or 'lamb', got {o.name!r}")
    need(o.lr > 0, f"optimizer.lr must be > 0, got {o.lr}")
    need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optimizer.betas must be two numbers in [0, 1)")
    need(o.weight_decay >= 0 and o.clip_grad >= 0, "optimizer.weight_decay and optimizer.clip_grad must be >= 0")
    bad = set(o.no_decay) - {"norm", "bias", "embedding"}
    need(not bad, f"optimizer.no_decay: unknown entries {sorted(bad)} (allowed: norm, bias, embedding)")
    need(s.scaling in SCALING_RULES, f"schedule.scaling must be one of {SCALING_RULES}, got {s.scaling!r}")
    need(s.scaling == "none" or s.base_batch_size, "schedule.scaling needs schedule.base_batch_size "
         "(the batch size optimizer.lr was tuned at)")
    need(s.decay in DECAY_STYLES, f"schedule.decay must be one of {DECAY_STYLES}, got {s.decay!r}")
    need(s.wsd_decay in WSD_DECAY_STYLES, f"schedule.wsd_decay must be one of {WSD_DECAY_STYLES}")
    given = [k for k in ("warmup_steps", "warmup_samples") if getattr(s, k) is not None] + (
        ["warmup_fraction"] if s.warmup_fraction else [])
    need(len(given) <= 1, f"schedule: give only one of {given}")
    need(0 <= s.warmup_fraction < 1, "schedule.warmup_fraction must be in [0, 1)")
    need(s.min_lr >= 0, "schedule.min_lr must be >= 0")
    need(0 < s.decay_fraction <= 1, "schedule.decay_fraction must be in (0, 1]")
    if s.rampup_start is not None:
        need(0 < s.rampup_start < t.global_batch_size and s.rampup_increment > 0 and s.rampup_samples > 0,
             "schedule.rampup_start must be in (0, train.global_batch_size) with rampup_increment > 0 and "
             "rampup_samples > 0")
        need((t.global_batch_size - s.rampup_start) % s.rampup_increment == 0,
             "train.global_batch_size - schedule.rampup_start must be a multiple of schedule.rampup_increment")
        need(s.rampup_start % t.micro_batch_size == 0 and s.rampup_increment % t.micro_batch_size == 0,
             "schedule.rampup_start and rampup_increment must be multiples of train.micro_batch_size")
    need(cfg.checkpoint.interval >= 0 and cfg.checkpoint.keep_last >= 1,
         "checkpoint.interval must be >= 0 and checkpoint.keep_last >= 1")
    need(cfg.logging.interval >= 1, "logging.interval must be >= 1")
    max_len = getattr(cfg.model, "max_seq_len", None)  # GPT: positions/RoPE tables end there
    need(max_len is None or cfg.data.seq_length <= max_len,
         f"data.seq_length={cfg.data.seq_length} exceeds model.max_seq_len={max_len}; raise model.max_seq_len")
    for k in ("tp", "pp", "vpp", "ep"):
        need(getattr(p, k) >= 1, f"parallel.{k} must be >= 1")
    need(p.zero in (0, 1, 2, 3), f"parallel.zero must be 0..3, got {p.zero}")
    if t.eval_tasks:
        _validate_eval_tasks(cfg, need)
    try:
        deep = importlib.import_module("pretrain.parallel.validate")
    except ModuleNotFoundError:
        return
    deep.validate(cfg)


def _validate_eval_tasks(cfg: Config, need) -> None:
    t, p = cfg.train, cfg.parallel
    need(t.eval_interval > 0, "train.eval_tasks runs at every train.eval_interval: set train.eval_interval > 0")
    need(t.eval_tasks_limit is None or t.eval_tasks_limit > 0, "train.eval_tasks_limit must be > 0 or null")
    need(t.eval_tasks_fewshot >= 0, "train.eval_tasks_fewshot must be >= 0")
    need(bool(cfg.data.tokenizer), "train.eval_tasks needs data.tokenizer (the tasks' text is encoded with it)")
    # data-parallel replicas score different requests, so no collective may span replicas
    pipeline_ok = p.pp == 1 or (cfg.family == "gpt" and p.vpp == 1)
    need(pipeline_ok and p.ep == 1 and p.zero < 3,
         f"train.eval_tasks scores the live model, which needs parallel.ep=1, zero<3 and, with pp>1, a GPT "
         f"without interleaving (got family={cfg.family}, pp={p.pp}, vpp={p.vpp}, ep={p.ep}, zero={p.zero}); "
         "drop train.eval_tasks and run `pretrain eval --checkpoint` on the saved checkpoints instead")
    from pretrain.evals.tasks import TaskError, task_path

    for name in t.eval_tasks:
        try:
            task_path(name)
        except TaskError as e:
            raise ConfigError(f"train.eval_tasks: {e}") from None


def is_parallel(cfg: Config) -> bool:
    """True when the layout needs ``parallel``'s engine (anything beyond plain data parallelism)."""
    p = cfg.parallel
    return max(p.tp, p.pp, p.ep) > 1 or p.sp or p.zero > 0 or p.offload_optimizer or p.offload_params


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.steps=10", "optimizer.betas=[0.9,0.99]"]`` -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.steps=1000)")
        node = out
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}")
        node[leaf] = _yaml(value) if value != "" else None
    return out


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read ``path`` (YAML), apply dotted overrides, validate. Errors name the file and the key."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = _yaml(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
    try:
        return from_dict(merge(raw, parse_overrides(list(overrides))), str(path or "<overrides>"))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path and not str(e).startswith(str(path)) else str(e)) from None


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically: readers never see half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    os.replace(tmp, path)
