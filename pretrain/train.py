"""``pretrain train CONFIG.yaml [section.key=value ...] [--resume auto|PATH]``.

Runs as one process or under torchrun/Slurm (the process group is joined from the environment).
Exit codes: 0 done, 2 bad input (one line naming the key or file; ``--debug`` shows the traceback), 3 stopped
after repeated non-finite steps, 75 stopped on a signal with a checkpoint (requeue with ``--resume auto``),
128 + the signal (143 for the stop file) stopped on a signal without ``checkpoint.dir`` (nothing saved). Over a
``checkpoint.dir`` that holds checkpoints, a run needs ``--resume auto`` (continue) or ``--overwrite`` (start over).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch.distributed as dist

from pretrain.config import Config, ConfigError, save_config
from pretrain.console import setup_logging
from pretrain.preflight import load_and_check
from pretrain.trainer import EXIT_PREEMPTED, StopFlag, Trainer

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="dotted overrides, e.g. train.steps=1000 checkpoint.dir=runs/x parallel.tp=2")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="auto: continue from checkpoint.dir/latest when it exists; or a checkpoint directory")
    parser.add_argument("--overwrite", action="store_true",
                        help="start from step 0 even though checkpoint.dir holds checkpoints (they are pruned as "
                             "this run saves its own)")
    parser.add_argument("--dry-run", action="store_true",
                        help="run the pre-flight checks (config, layout for this world size, data files) and exit")


def build_datasets(cfg: Config):
    """(train, valid) datasets sized for the whole run (``valid`` is None without validation data)."""
    from pretrain.data.loader import build_train_valid_datasets
    from pretrain.data.tokenizer import load_tokenizer
    from pretrain.models.registry import family_spec
    from pretrain.schedule import Schedule

    tokenizer = load_tokenizer(cfg.data.tokenizer, num_threads=1) if cfg.data.tokenizer else None
    if tokenizer is not None and tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the {tokenizer.vocab_size} "
                          f"tokens of {cfg.data.tokenizer}; set model.vocab_size={tokenizer.vocab_size} or more")
    kind = family_spec(cfg.family).dataset
    valid_samples = cfg.train.eval_steps * cfg.train.global_batch_size if cfg.train.eval_interval else None
    train, valid = build_train_valid_datasets(cfg.data, kind, Schedule(cfg).total_samples(), valid_samples,
                                              tokenizer=tokenizer)
    return train, (valid if cfg.train.eval_interval else None)


def install_stop_handler(resumable: bool | None = None):
    """SIGUSR1/SIGTERM/SIGINT (or the launcher's stop file) -> the trainer's stop flag; returns (flag, handler).

    With ``resumable`` given (whether ``checkpoint.dir`` is set), a signal before the first step exits at once, and
    a second signal always does (:mod:`pretrain.launch.preemption`)."""
    from pretrain.launch.preemption import install

    stop = StopFlag()
    if resumable is None:
        return stop, install(stop.request)
    return stop, install(stop.request, can_wait=lambda: stop.stepping, resumable=resumable)


def train(cfg: Config, resume: str | None = None, stop=None, overwrite: bool = False) -> int:
    """Build data, engine and trainer; train; return the exit code."""
    train_data, valid_data = build_datasets(cfg)
    trainer = Trainer(cfg, train_data, valid_data, stop=stop)
    trainer.resume(resume, overwrite=overwrite)
    if trainer.rank == 0 and cfg.log_dir:
        Path(cfg.log_dir).mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(cfg.log_dir) / "config.yaml")
    if trainer.step >= cfg.train.steps:
        log.info("already at step %d >= train.steps=%d: nothing to do (raise train.steps to train further)",
                 trainer.step, cfg.train.steps)
    return trainer.fit()


def run(args: argparse.Namespace) -> int:
    """Bad input raises :class:`ConfigError` (and the like): ``pretrain.cli`` prints it as one line, exit 2."""
    from pretrain.launch.env import detect, init_distributed

    world_size = detect().world_size
    cfg = load_and_check(args.config, args.overrides, world_size, resume=args.resume)
    if args.dry_run:
        print(f"{args.config}: config, layout for {world_size} process(es) and data files OK; nothing started")
        return 0
    denv = init_distributed(cfg.train.device)  # the backend follows train.device
    setup_logging(denv.rank)
    stop, handler = install_stop_handler(resumable=bool(cfg.checkpoint.dir))
    try:
        code = train(cfg, args.resume, stop, overwrite=args.overwrite)
    finally:
        handler.uninstall()
    if dist.is_initialized():
        dist.destroy_process_group()
    if code == EXIT_PREEMPTED:
        handler.requeue_if_slurm()
    return code
