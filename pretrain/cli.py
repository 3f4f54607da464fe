"""The `pretrain` command line.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int | None``.
Modules are imported only for the subcommand being run, so ``pretrain --help`` stays instant even though
training pulls in torch, DeepSpeed and megatron-core.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("pretrain.demo", "end-to-end demo: corpus -> tokenizer -> shards -> train -> eval -> export"),
    "tokenizer": ("pretrain.data.tokenizer_cli", "train a sentencepiece tokenizer"),
    "prepare": ("pretrain.data.prepare", "tokenize corpora into Megatron .bin/.idx shards"),
    "data": ("pretrain.data.cli", "inspect or merge tokenized shards"),
    "train": ("pretrain.train", "train a model from a YAML config"),
    "config": ("pretrain.config_cli", "list the config keys with type, default and doc"),
    "schedule": ("pretrain.schedule_cli", "plot the LR and batch-size schedule of a config"),
    "plot": ("pretrain.plot", "plot loss/LR/throughput curves of a run"),
    "ckpt": ("pretrain.ckpt_cli", "inspect or consolidate checkpoints"),
    "export": ("pretrain.hf.export", "export a checkpoint to a Hugging Face model directory"),
    "import": ("pretrain.hf.importer", "import a Hugging Face model as a checkpoint"),
    "eval": ("pretrain.evals.cli", "zero/few-shot evaluation of a checkpoint or HF model"),
    "launch": ("pretrain.launch.cli", "launch training locally (torchrun) or on Slurm"),
    "plan": ("pretrain.plan.cli", "predict per-GPU memory and step time of parallel layouts, ranked"),
}


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pretrain", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="commands:\n" + "\n".join(f"  {n:<10} {h}" for n, (_, h) in COMMANDS.items()))
    p.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND", help="one of the commands below")
    return p


def _user_errors() -> tuple[type[Exception], ...]:
    """Exceptions that mean bad input, not a bug: their message names the key or file and the fix."""
    from pretrain.checkpoint import CheckpointError
    from pretrain.configlib import ConfigError
    from pretrain.data.corpus import CorpusError
    from pretrain.data.indexed import ShardError
    from pretrain.evals.tasks import TaskError

    return ConfigError, CheckpointError, CorpusError, ShardError, TaskError


def parse_command(name: str, argv: list[str]) -> tuple[ModuleType, argparse.Namespace]:
    """The module of command ``name`` and its parsed arguments ``argv``; options and positionals may come in
    any order (``train CFG --resume auto train.steps=3``), except in commands with sub-commands or a
    ``-- COMMAND...`` remainder."""
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"pretrain {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    try:
        return module, parser.parse_intermixed_args(argv)
    except TypeError:  # argparse cannot intermix sub-commands or a remainder: they parse in order
        return module, parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run one command. Bad input is one line on stderr and exit code 2; ``--debug`` shows the traceback."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        parser = _top_parser()
        sys.stderr.write(parser.format_usage() + parser.epilog + "\n")
        return 2
    if argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        _top_parser().parse_args(argv[:1])
    from pretrain.console import quiet_third_party

    quiet_third_party()  # before the command imports torch, DeepSpeed or megatron-core
    module, args = parse_command(argv[0], argv[1:])
    try:
        return int(module.run(args) or 0)
    except Exception as e:
        if args.debug or not isinstance(e, _user_errors()):
            raise
        print(f"pretrain {argv[0]}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
