"""The training config: one tree of dataclasses, loaded from YAML plus dotted ``key=value`` overrides.

Each section is a dataclass that checks its own values (``validate()``); :meth:`Config.validate` adds the
checks that span sections. Errors name the key and say how to fix it (unknown keys get a "did you mean").
The ``model`` section is family-specific: ``model.family`` picks the dataclass from the family registry
(:func:`pretrain.models.registry.model_config`), which validates the rest of the section. The generic
dict -> dataclass machinery lives in :mod:`pretrain.configlib`; the checks that need other packages (the
parallel layout against the model and the world size, data files, eval tasks, the resume path) are the
explicit pre-flight step, :mod:`pretrain.preflight`, which every entry point runs before starting work.

The doc comment next to each field is what ``pretrain config keys`` prints: keep one on every field.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pretrain.configlib import (ConfigError, dataclass_from_dict, load_yaml, merge, need, parse_overrides, plain,
                                suggest)

__all__ = ["ConfigError", "Config", "dataclass_from_dict", "from_dict", "load_config", "merge", "parse_overrides",
           "save_config"]

DECAY_STYLES = ("constant", "linear", "cosine", "inverse_sqrt", "wsd")
WSD_DECAY_STYLES = ("linear", "cosine", "sqrt")
SCALING_RULES = ("none", "linear", "sqrt")


@dataclass
class DataConfig:
    """Training data: shard prefixes (optionally weighted) and how samples are built from them."""

    train: list = field(default_factory=list)  # ["PREFIX", ...] or [weight, "PREFIX", weight, "PREFIX", ...]
    valid: list = field(default_factory=list)  # separate validation prefixes; empty = split off `split`
    split: str = "98,2,0"  # train,valid,test proportions of `train` when `valid` is empty
    tokenizer: str | None = None  # tokenizer file or directory; checked against the shards' PREFIX.json
    seq_length: int = 1024  # GPT sample length; T5 encoder length
    decoder_seq_length: int = 128  # T5 only: decoder length (targets padded to it)
    noise_density: float = 0.15  # T5 span corruption: share of tokens masked, in (0, 1)
    mean_span_length: float = 3.0  # T5 span corruption: mean masked span length in tokens, >= 1
    mask_rate: float = 0.15  # masked LM (encoder family): share of tokens predicted, in (0, 1); 80/10/10 rule
    mask_token: str | None = None  # masked LM: the mask token's spelling; None = [MASK] or <mask>
    whole_word_mask: bool = False  # masked LM: choose whole words (all their tokens) instead of single tokens
    sentence_pairs: str = "none"  # masked LM: none | nsp (BERT next-sentence pairs) | sop (ALBERT sentence order)
    eod_mask_loss: bool = False  # no loss on end-of-document tokens
    document_mask: bool = False  # pass document ids so attention stays within each document
    seed: int = 1234  # shuffling of documents and samples
    num_workers: int = 0  # DataLoader worker processes (0 = read in the training process)
    cache_dir: str | None = None  # where sample indexes are cached; None = next to the shards
    text_key: str = "text"  # raw data.train sources: the JSON key / column holding each document's text
    strict: bool = False  # raw sources: stop at the first bad record (bad JSON, missing key, ...), not count it
    stream_lanes: int = 8  # raw sources: packing lanes; a multiple of the data-parallel size dividing the batch size
    stream_shuffle: bool = True  # raw sources: shuffle units and their records every epoch (False: file order)
    stream_chunk_mb: float = 64.0  # raw sources: MB of uncompressed JSON Lines per shuffled unit

    def validate(self) -> None:
        need(self.seq_length >= 1, f"data.seq_length must be >= 1, got {self.seq_length}")
        need(self.decoder_seq_length >= 1, f"data.decoder_seq_length must be >= 1, got {self.decoder_seq_length}")
        need(0 < self.noise_density < 1, f"data.noise_density must be in (0, 1) (the share of tokens masked), got "
                                         f"{self.noise_density}; T5 uses 0.15")
        need(self.mean_span_length >= 1, f"data.mean_span_length must be >= 1 (tokens per masked span), got "
                                         f"{self.mean_span_length}; T5 uses 3")
        need(0 < self.mask_rate < 1, f"data.mask_rate must be in (0, 1) (the share of tokens the masked LM "
                                     f"predicts), got {self.mask_rate}; BERT uses 0.15")
        need(self.sentence_pairs in ("none", "nsp", "sop"), f"data.sentence_pairs must be none, nsp or sop, got "
                                                            f"{self.sentence_pairs!r}")
        need(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        need(self.stream_lanes >= 1, f"data.stream_lanes must be >= 1, got {self.stream_lanes}; use a multiple of "
                                     f"the data-parallel size that divides train.global_batch_size")
        need(self.stream_chunk_mb > 0, f"data.stream_chunk_mb must be > 0, got {self.stream_chunk_mb}")


@dataclass
class OptimizerConfig:
    """The optimizer and its hyper-parameters."""

    name: str = "adamw"  # adamw | lamb
    lr: float = 3e-4  # base LR, at schedule.base_batch_size when a scaling rule is set
    betas: tuple = (0.9, 0.95)  # Adam's (beta1, beta2)
    eps: float = 1e-8  # Adam's epsilon
    weight_decay: float = 0.1  # decoupled weight decay (not applied to `no_decay` parameters)
    no_decay: list = field(default_factory=lambda: ["norm", "bias", "embedding"])  # parameter kinds without decay
    clip_grad: float = 1.0  # global-norm clipping; 0 disables

    def validate(self) -> None:
        need(self.name in ("adamw", "lamb"), f"optimizer.name must be 'adamw' or 'lamb', got {self.name!r}")
        need(self.lr > 0, f"optimizer.lr must be > 0, got {self.lr}")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
             "optimizer.betas must be two numbers in [0, 1)")
        need(self.weight_decay >= 0 and self.clip_grad >= 0,
             "optimizer.weight_decay and optimizer.clip_grad must be >= 0")
        bad = set(self.no_decay) - {"norm", "bias", "embedding"}
        need(not bad, f"optimizer.no_decay: unknown entries {sorted(bad)} (allowed: norm, bias, embedding)")


@dataclass
class ScheduleConfig:
    """Learning-rate warmup and decay, LR scaling with the batch size, batch-size ramp-up."""

    scaling: str = "none"  # none | linear | sqrt (Goyal et al.)
    base_batch_size: int | None = None  # the batch size `optimizer.lr` was tuned at
    warmup_steps: int | None = None  # give at most one of warmup_steps / warmup_samples / warmup_fraction
    warmup_samples: int | None = None  # warmup in samples (the schedule then runs in samples)
    warmup_fraction: float = 0.0  # warmup as a share of train.steps, in [0, 1)
    decay: str = "cosine"  # constant | linear | cosine | inverse_sqrt | wsd
    min_lr: float = 0.0  # LR at the end of the decay
    decay_fraction: float = 0.2  # wsd: share of post-warmup training spent decaying
    wsd_decay: str = "linear"  # linear | cosine | sqrt
    rampup_start: int | None = None  # GPT-3 batch ramp-up: start size, increment, over this many samples
    rampup_increment: int = 1  # ramp-up: global batch growth per increment
    rampup_samples: int = 0  # ramp-up: samples over which the batch grows to train.global_batch_size

    def validate(self) -> None:
        need(self.scaling in SCALING_RULES, f"schedule.scaling must be one of {SCALING_RULES}, got {self.scaling!r}")
        need(self.scaling == "none" or self.base_batch_size, "schedule.scaling needs schedule.base_batch_size "
             "(the batch size optimizer.lr was tuned at)")
        need(self.decay in DECAY_STYLES, f"schedule.decay must be one of {DECAY_STYLES}, got {self.decay!r}")
        need(self.wsd_decay in WSD_DECAY_STYLES, f"schedule.wsd_decay must be one of {WSD_DECAY_STYLES}")
        given = [k for k in ("warmup_steps", "warmup_samples") if getattr(self, k) is not None] + (
            ["warmup_fraction"] if self.warmup_fraction else [])
        need(len(given) <= 1, f"schedule: give only one of {given}")
        need(0 <= self.warmup_fraction < 1, "schedule.warmup_fraction must be in [0, 1)")
        need(self.min_lr >= 0, "schedule.min_lr must be >= 0")
        need(0 < self.decay_fraction <= 1, "schedule.decay_fraction must be in (0, 1]")


@dataclass
class TrainConfig:
    """The training loop: length, batch, precision, validation, safety limits."""

    steps: int = 1000  # optimizer steps to train for
    global_batch_size: int = 8  # samples per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 8  # samples per forward/backward on one rank (gradients accumulate up to the global)
    seed: int = 1234  # model init, dropout
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    tf32: bool = True  # fp32 matmuls on CUDA use TF32 tensor cores; false = exact fp32 (parity checks)
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False  # torch.compile the model in place (parameter names unchanged); the first step compiles
    eval_interval: int = 0  # validate every N steps; 0 = no validation
    eval_steps: int = 10  # global batches per validation
    # zero-/few-shot tasks (names or YAML paths, as for `pretrain eval`) scored on the live model at every
    # eval_interval, requests split over the data-parallel ranks; logged as eval/<task>/<k>shot/<metric>
    eval_tasks: list = field(default_factory=list)
    eval_tasks_limit: int | None = 200  # first N items of each task (None = all)
    eval_tasks_fewshot: int = 0  # few-shot examples per eval_tasks request
    prefetch: bool = True  # read and collate the next step's micro-batches in a background thread
    max_nonfinite: int = 5  # stop (with a checkpoint) after this many non-finite steps in a row
    # end the process with a diagnostic (rank, phase, stacks; exit 124) when a step, validation or checkpoint save
    # makes no progress for this long, e.g. a hung collective; 0 = off. $PRETRAIN_WATCHDOG_TIMEOUT overrides.
    watchdog_timeout: float = 1800.0
    exit_at_step: int | None = None  # save a checkpoint and exit 75 (requeue, then --resume auto) after this step
    # save and exit 75 once this many minutes have passed since the process started (before a job's time limit)
    exit_after_minutes: float | None = None
    # on a non-finite step or a loss / grad-norm spike (pretrain/spikes.py): skip | rollback (to the last checkpoint,
    # skipping the data from there to the bad step) | stop (exit 3, nothing saved)
    spike_action: str = "skip"
    spike_zscore: float = 0.0  # a loss this many std above the mean of the last spike_window losses is a spike; 0 = off
    spike_grad_factor: float = 0.0  # a grad norm above this factor x the window's median is a spike; 0 = off
    spike_window: int = 50  # accepted steps the spike statistics look back over
    spike_max_rollbacks: int = 3  # rollbacks in one run before stopping instead
    # every N steps gather each rank's time in data wait / forward / backward / optimizer / the rest, and name a rank
    # slower than the median of the others by straggler_factor (log + metrics; pretrain/stragglers.py); 0 = off
    straggler_interval: int = 0
    straggler_factor: float = 2.0  # how much slower than the other ranks' median a section must be to be named

    def validate(self) -> None:
        need(self.steps > 0, f"train.steps must be > 0, got {self.steps}")
        need(self.micro_batch_size > 0, f"train.micro_batch_size must be > 0, got {self.micro_batch_size}")
        need(self.global_batch_size > 0 and self.global_batch_size % self.micro_batch_size == 0,
             f"train.global_batch_size ({self.global_batch_size}) must be a positive multiple of "
             f"train.micro_batch_size ({self.micro_batch_size})")
        need(self.precision in ("fp32", "bf16"), f"train.precision must be 'fp32' or 'bf16', got {self.precision!r}")
        need(self.device in ("auto", "cpu", "cuda"), f"train.device must be auto|cpu|cuda, got {self.device!r}")
        need(self.max_nonfinite >= 1, "train.max_nonfinite must be >= 1")
        need(self.watchdog_timeout >= 0,
             f"train.watchdog_timeout must be >= 0 (0 = off), got {self.watchdog_timeout}")
        need(self.exit_at_step is None or self.exit_at_step > 0,
             f"train.exit_at_step must be > 0 or null (off), got {self.exit_at_step}")
        need(self.exit_after_minutes is None or self.exit_after_minutes > 0,
             f"train.exit_after_minutes must be > 0 or null (off), got {self.exit_after_minutes}")
        need(self.straggler_interval >= 0 and self.straggler_factor > 1, "train.straggler_interval must be >= 0 "
             f"(0 = off) and train.straggler_factor > 1, got {self.straggler_interval} and {self.straggler_factor}")
        from pretrain.spikes import validate as spike_checks

        for ok, message in spike_checks(self):
            need(ok, message)
        need(self.eval_interval >= 0 and self.eval_steps >= 1, "train.eval_interval must be >= 0 and "
             "train.eval_steps >= 1")
        if self.eval_tasks:
            need(self.eval_interval > 0,
                 "train.eval_tasks runs at every train.eval_interval: set train.eval_interval > 0")
            need(self.eval_tasks_limit is None or self.eval_tasks_limit > 0,
                 "train.eval_tasks_limit must be > 0 or null")
            need(self.eval_tasks_fewshot >= 0, "train.eval_tasks_fewshot must be >= 0")


@dataclass
class CheckpointConfig:
    """Where and how often checkpoints are written."""

    dir: str | None = None  # None = no checkpoints
    init_from: str | None = None  # start from these model weights only (fresh optimizer, schedule, data position)
    interval: int = 0  # save every N steps (0 = only at the end)
    keep_last: int = 3  # checkpoints kept in `dir` (older ones are deleted)
    save_final: bool = True  # save at the last step
    # interval saves: copy the state to host memory at the step boundary, write it in a background thread while
    # training goes on (one write in flight; the final save and saves on a stop stay synchronous)
    async_save: bool = False
    # after each save a side process exports it to HF, checks our logits against transformers and scores
    # eval_on_save_tasks; results land in the metrics tagged with the checkpoint's step (pretrain/eval_on_save.py)
    eval_on_save: bool = False
    eval_on_save_tasks: list = field(default_factory=list)  # task names or YAML paths (as train.eval_tasks)
    # where the side job runs: auto (an sbatch job when training runs in a Slurm job, else a subprocess) | subprocess |
    # sbatch
    eval_on_save_launcher: str = "auto"
    eval_on_save_sbatch: list = field(default_factory=list)  # extra sbatch options of the side job, e.g. [--gpus=1]

    def validate(self) -> None:
        need(self.interval >= 0 and self.keep_last >= 1,
             "checkpoint.interval must be >= 0 and checkpoint.keep_last >= 1")
        need(not self.eval_on_save or self.keep_last >= 2, "checkpoint.eval_on_save reads a checkpoint while "
             f"training goes on: set checkpoint.keep_last >= 2 (got {self.keep_last}) so it is not pruned meanwhile")
        need(self.eval_on_save_launcher in ("auto", "subprocess", "sbatch"), "checkpoint.eval_on_save_launcher must "
             f"be auto, subprocess or sbatch, got {self.eval_on_save_launcher!r}")
        need(all(str(o).startswith("--") for o in self.eval_on_save_sbatch), "checkpoint.eval_on_save_sbatch takes "
             f"sbatch options written --name=value, got {self.eval_on_save_sbatch}")


@dataclass
class LoggingConfig:
    """Metrics output."""

    dir: str | None = None  # metrics.jsonl + TensorBoard events; defaults to checkpoint.dir
    interval: int = 10  # log every N steps
    tensorboard: bool = True  # also write TensorBoard events
    peak_tflops: float | None = None  # per device, for MFU; None = measure (CPU) or guess from the GPU name

    def validate(self) -> None:
        need(self.interval >= 1, "logging.interval must be >= 1")


@dataclass
class ParallelConfig:
    """The parallel layout; the pre-flight step checks it against the model and the number of processes."""

    tp: int = 1  # tensor-parallel size (splits heads, FFN and vocabulary)
    pp: int = 1  # pipeline-parallel stages
    vpp: int = 1  # virtual stages per pipeline rank (interleaved 1F1B)
    ep: int = 1  # expert-parallel size (Switch models), inside the data-parallel dimension
    sp: bool = False  # sequence parallelism over the tensor-parallel ranks (needs tp > 1)
    cp: int = 1  # context parallelism: each sequence split over cp ranks (load-balanced causal chunks; GPT)
    cp_comm: str = "all_gather"  # context-parallel attention: all_gather (K/V per layer) | ring (K/V rank to rank)
    zero: int = 0  # DeepSpeed ZeRO stage 0..3 over the data-parallel ranks
    offload_optimizer: bool = False  # ZeRO >= 1: optimizer state in CPU memory
    offload_params: bool = False  # ZeRO-3: parameters in CPU memory

    def validate(self) -> None:
        for k in ("tp", "pp", "vpp", "ep", "cp"):
            need(getattr(self, k) >= 1, f"parallel.{k} must be >= 1, got {getattr(self, k)}")
        need(self.cp_comm in ("all_gather", "ring"), f"parallel.cp_comm must be all_gather or ring, got "
                                                     f"{self.cp_comm!r}")
        need(self.zero in (0, 1, 2, 3), f"parallel.zero must be 0..3, got {self.zero}")


SECTIONS = {"data": DataConfig, "optimizer": OptimizerConfig, "schedule": ScheduleConfig,
            "train": TrainConfig, "checkpoint": CheckpointConfig, "logging": LoggingConfig,
            "parallel": ParallelConfig}


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
        out = {k: plain(dataclasses.asdict(getattr(self, k))) for k in SECTIONS}
        out["model"] = {"family": self.family, **plain(dataclasses.asdict(self.model))}
        return out

    @property
    def log_dir(self) -> str | None:
        return self.logging.dir or self.checkpoint.dir

    def validate(self) -> None:
        """Every section's own checks, then those that span sections (all within this config)."""
        for name in SECTIONS:
            getattr(self, name).validate()
        t, s = self.train, self.schedule
        if s.rampup_start is not None:
            need(0 < s.rampup_start < t.global_batch_size and s.rampup_increment > 0 and s.rampup_samples > 0,
                 "schedule.rampup_start must be in (0, train.global_batch_size) with rampup_increment > 0 and "
                 "rampup_samples > 0")
            need((t.global_batch_size - s.rampup_start) % s.rampup_increment == 0,
                 "train.global_batch_size - schedule.rampup_start must be a multiple of schedule.rampup_increment")
            need(s.rampup_start % t.micro_batch_size == 0 and s.rampup_increment % t.micro_batch_size == 0,
                 "schedule.rampup_start and rampup_increment must be multiples of train.micro_batch_size")
        max_len = getattr(self.model, "max_seq_len", None)  # GPT: positions/RoPE tables end there
        max_len = getattr(self.model, "max_tokens", max_len)  # encoder: RoBERTa's positions start past the pad id
        need(max_len is None or self.data.seq_length <= max_len,
             f"data.seq_length={self.data.seq_length} exceeds model.max_seq_len={max_len}; raise model.max_seq_len")
        sparse = getattr(self.model, "sparse", None)  # a sparse attention pattern (pretrain.models.patterns)
        problem = None if sparse is None else sparse.length_problem(self.data.seq_length)
        need(problem is None, str(problem))
        need(not self.train.eval_tasks or bool(self.data.tokenizer),
             "train.eval_tasks needs data.tokenizer (the tasks' text is encoded with it)")


def from_dict(raw: dict, source: str = "<config>") -> Config:
    """Build and validate a :class:`Config` from a nested dict (as read from YAML)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    valid = {*SECTIONS, "model"}
    for key in raw:
        if key not in valid:
            raise ConfigError(f"{source}: unknown section '{key}'{suggest(key, valid)}")
    sections = {name: dataclass_from_dict(cls, raw.get(name) or {}, name) for name, cls in SECTIONS.items()}
    model_raw = dict(raw.get("model") or {})
    family = model_raw.pop("family", None)
    from pretrain.models.registry import family_names, model_config

    if not family:
        raise ConfigError(f"{source}: model.family is required: set it to one of {', '.join(family_names())} "
                          f"(Switch MoE is model.moe.num_experts > 0 in a family that has it)")
    cfg = Config(model=model_config(family, model_raw), family=family, **sections)
    cfg.validate()
    return cfg


def is_parallel(cfg: Config) -> bool:
    """True when the layout needs ``parallel``'s engine (anything beyond plain data parallelism)."""
    p = cfg.parallel
    return max(p.tp, p.pp, p.ep, p.cp) > 1 or p.sp or p.zero > 0 or p.offload_optimizer or p.offload_params


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read ``path`` (YAML), apply dotted overrides, validate. Errors name the file and the key."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = load_yaml(path.read_text()) or {}
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
