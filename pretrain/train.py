"""``pretrain train CONFIG.yaml [section.key=value ...] [--resume auto|PATH]``.

Runs as one process or under torchrun/Slurm (the process group is joined from the environment).
Exit codes: 0 done, 2 bad config, 3 stopped after repeated non-finite steps, 75 stopped on a signal with a
checkpoint (requeue with ``--resume auto``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch.distributed as dist

from pretrain.config import Config, ConfigError, load_config, save_config
from pretrain.trainer import EXIT_PREEMPTED, StopFlag, Trainer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="dotted overrides, e.g. train.steps=1000 checkpoint.dir=runs/x parallel.tp=2")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="auto: continue from checkpoint.dir/latest when it exists; or a checkpoint directory")


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stdout,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)


def build_datasets(cfg: Config):
    """(train, valid) datasets sized for the whole run (``valid`` is None without validation data)."""
    from pretrain.data.loader import build_train_valid_datasets
    from pretrain.data.tokenizer import load_tokenizer
    from pretrain.schedule import Schedule

    tokenizer = load_tokenizer(cfg.data.tokenizer, num_threads=1) if cfg.data.tokenizer else None
    if tokenizer is not None and tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the {tokenizer.vocab_size} "
                          f"tokens of {cfg.data.tokenizer}; set model.vocab_size={tokenizer.vocab_size} or more")
    kind = "t5" if cfg.family == "t5" else "gpt"
    valid_samples = cfg.train.eval_steps * cfg.train.global_batch_size if cfg.train.eval_interval else None
    train, valid = build_train_valid_datasets(cfg.data, kind, Schedule(cfg).total_samples(), valid_samples,
                                              tokenizer=tokenizer)
    return train, (valid if cfg.train.eval_interval else None)


def install_stop_handler():
    """SIGUSR1/SIGTERM (or the launcher's stop file) -> the trainer's stop flag; returns (flag, handler)."""
    from pretrain.launch.preemption import install

    stop = StopFlag()
    return stop, install(stop.request)


def train(cfg: Config, resume: str | None = None, stop=None) -> int:
    """Build data, engine and trainer; train; return the exit code."""
    train_data, valid_data = build_datasets(cfg)
    trainer = Trainer(cfg, train_data, valid_data, stop=stop)
    if trainer.rank == 0 and cfg.log_dir:
        Path(cfg.log_dir).mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(cfg.log_dir) / "config.yaml")
    trainer.resume(resume)
    return trainer.fit()


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"pretrain train: config error: {e}", file=sys.stderr)
        return 2
    from pretrain.launch.env import init_distributed

    denv = init_distributed()
    setup_logging(denv.rank)
    stop, handler = install_stop_handler()
    try:
        code = train(cfg, args.resume, stop)
    except ConfigError as e:
        print(f"pretrain train: config error: {e}", file=sys.stderr)
        return 2
    handler.uninstall()
    if dist.is_initialized():
        dist.destroy_process_group()
    if code == EXIT_PREEMPTED:
        handler.requeue_if_slurm()
    return code
