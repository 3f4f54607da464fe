"""The `pretrain` command line.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int | None``.
Modules are imported only for the subcommand being run, so ``pretrain --help`` stays instant even though
training pulls in torch, DeepSpeed and megatron-core.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("pretrain.demo", "end-to-end demo: corpus -> tokenizer -> shards -> train -> eval -> export"),
    "tokenizer": ("pretrain.data.tokenizer_cli", "train a sentencepiece tokenizer"),
    "prepare": ("pretrain.data.prepare", "tokenize corpora into Megatron .bin/.idx shards"),
    "data": ("pretrain.data.cli", "inspect or merge tokenized shards"),
    "train": ("pretrain.train", "train a model from a YAML config"),
    "schedule": ("pretrain.schedule_cli", "plot the LR and batch-size schedule of a config"),
    "plot": ("pretrain.plot", "plot loss/LR/throughput curves of a run"),
    "ckpt": ("pretrain.ckpt_cli", "inspect or consolidate checkpoints"),
    "export": ("pretrain.hf.export", "export a checkpoint to a Hugging Face model directory"),
    "import": ("pretrain.hf.importer", "import a Hugging Face model as a checkpoint"),
    "eval": ("pretrain.evals.cli", "zero/few-shot evaluation of a checkpoint or HF model"),
    "launch": ("pretrain.launch.cli", "launch training locally (torchrun) or on Slurm"),
}


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pretrain", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="commands:\n" + "\n".join(f"  {n:<10} {h}" for n, (_, h) in COMMANDS.items()))
    p.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND", help="one of the commands below")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        _top_parser().parse_args(argv[:1] or ["--help"])
        return 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"pretrain {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
