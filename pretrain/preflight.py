"""The pre-flight check: everything knowable before any process starts, checked once, in one place.

Loading a config (:func:`pretrain.config.load_config`) validates each section and the config as a whole.
:func:`check` adds what needs other packages or the filesystem:

1. the parallel layout against the model and the number of processes (:mod:`pretrain.parallel.validate`:
   tp/pp/ep divisibility, and the global batch against micro-batch x data-parallel size, plain DP included);
2. data: every shard prefix in ``data.train``/``data.valid`` has a non-empty ``PREFIX.bin`` and ``PREFIX.idx``,
   ``data.tokenizer`` and ``checkpoint.init_from`` exist; a masked-LM family's tokenizer has the mask token
   (``data.mask_token``) and [CLS]/[SEP] (or BOS/EOS); next-sentence pairs are not asked of raw sources;
3. ``train.eval_tasks`` name tasks that exist;
4. ``--resume`` is ``auto`` or a checkpoint directory.

``pretrain train`` runs it with its own world size; ``pretrain launch local|slurm`` run it with the world size
they are about to start, before spawning or submitting, so a bad config is one line, not one per rank. It
raises :class:`~pretrain.configlib.ConfigError` naming the key or file and the fix. Nothing skips it silently:
``launch slurm --no-check`` is the one explicit opt-out.
"""

from __future__ import annotations

import glob
from pathlib import Path

from pretrain.config import Config, load_config
from pretrain.configlib import ConfigError, need


def check(cfg: Config, world_size: int, *, root: str | Path | None = None, resume: str | None = None,
          data: bool = True) -> None:
    """Raise :class:`ConfigError` for anything that would fail after the processes start.

    ``root``: the directory relative paths are read from (default: the working directory); ``data=False``
    skips the filesystem checks (data files, tokenizer, init_from, resume), e.g. for a job that runs elsewhere.
    """
    from pretrain.parallel.validate import validate_layout

    need(world_size >= 1, f"the number of processes must be >= 1, got {world_size}")
    validate_layout(cfg, world_size)
    _check_eval_tasks(cfg)
    if data:
        base = Path(root) if root is not None else Path.cwd()
        _check_data(cfg, base)
        _check_resume(cfg, resume, base)


def load_and_check(config: str | Path, overrides: list[str], world_size: int, *, root: str | Path | None = None,
                   resume: str | None = None, data: bool = True) -> Config:
    """:func:`~pretrain.config.load_config` (``config`` relative to ``root``) followed by :func:`check`."""
    path = Path(config)
    if root is not None and not path.is_absolute():
        path = Path(root) / path
    cfg = load_config(path, overrides)
    check(cfg, world_size, root=root, resume=resume, data=data)
    return cfg


def check_command(command: list[str], world_size: int, *, root: str | Path | None = None,
                  data: bool = True) -> Config | None:
    """The pre-flight check of the command line ``pretrain COMMAND...`` for ``world_size`` ranks (what the
    launchers run before starting any); returns the config of a ``train`` command, None for other commands."""
    if command[:1] != ["train"]:
        return None
    from pretrain.cli import parse_command

    _, args = parse_command("train", command[1:])
    return load_and_check(args.config, args.overrides, world_size, root=root, resume=args.resume, data=data)


def _path(base: Path, name: str) -> Path:
    p = Path(name).expanduser()
    return p if p.is_absolute() else base / p


def _check_data(cfg: Config, base: Path) -> None:
    from pretrain.data.loader import parse_blend
    from pretrain.data.mlm_dataset import NSP_FROM_STREAM, special_ids
    from pretrain.data.raw_source import is_raw_source
    from pretrain.data.tokenizer import load_tokenizer
    from pretrain.models.registry import family_spec

    d = cfg.data
    need(bool(d.train), "data.train is empty: give the shard prefixes written by `pretrain prepare`, e.g. "
                        "data.train=[shards/corpus_text_document]")
    for key in ("train", "valid"):
        try:
            prefixes = parse_blend(getattr(d, key), key)[0] if getattr(d, key) else []
        except ValueError as e:
            raise ConfigError(str(e)) from None
        for prefix in prefixes:
            if is_raw_source(prefix):  # raw text, tokenized while training: it must exist (URLs are not checked)
                need("://" in prefix or bool(glob.glob(str(_path(base, prefix)))),
                     f"data.{key}: raw source {prefix!r} matches no file; fix the path or glob in data.{key}")
                need(d.sentence_pairs != "nsp", NSP_FROM_STREAM)
                need(cfg.train.global_batch_size % d.stream_lanes == 0,
                     f"data.stream_lanes={d.stream_lanes} does not divide train.global_batch_size="
                     f"{cfg.train.global_batch_size} (raw sources give each lane an equal slot of every batch); "
                     f"set data.stream_lanes to a divisor that is a multiple of the data-parallel size")
                continue
            files = [_path(base, prefix + ext) for ext in (".bin", ".idx")]
            missing = [str(f) for f in files if not f.is_file()]
            need(not missing, f"data.{key}: shard {prefix!r}: {', '.join(missing)} not found; write it with "
                              f"`pretrain prepare --output {prefix}` or fix data.{key}")
            need(files[0].stat().st_size > 0, f"data.{key}: shard {files[0]} holds no tokens (was the corpus "
                                              f"empty?); prepare it from a non-empty corpus or drop it from data.{key}")
    if d.tokenizer:
        need(_path(base, d.tokenizer).exists(), f"data.tokenizer: {d.tokenizer} not found; give the tokenizer.model "
                                                f"(or directory) written by `pretrain tokenizer`")
        if family_spec(cfg.family).dataset == "mlm":  # the vocabulary must have the special tokens masking uses
            special_ids(load_tokenizer(_path(base, d.tokenizer), num_threads=1), d.mask_token)
    init = cfg.checkpoint.init_from
    need(not init or _path(base, init).is_dir(), f"checkpoint.init_from: {init} is not a directory; give a "
                                                 f"checkpoint written by `pretrain train` or `pretrain import`")


def _check_resume(cfg: Config, resume: str | None, base: Path) -> None:
    if resume is None or resume == "auto":
        return
    from pretrain.checkpoint import LATEST, META

    need(resume.lower() != "auto", f"--resume {resume}: did you mean --resume auto (continue from the newest "
                                   f"checkpoint in checkpoint.dir)?")
    path = _path(base, resume)
    need((path / META).is_file() or (path / LATEST).is_file(),
         f"--resume {resume}: not a checkpoint (no {META} or {LATEST} in it); give `auto` (continue from "
         f"checkpoint.dir) or a checkpoint directory such as {cfg.checkpoint.dir or 'runs/NAME'}/step_00000100")


def _check_eval_tasks(cfg: Config) -> None:
    if not cfg.train.eval_tasks:
        return
    from pretrain.evals.tasks import TaskError, task_path

    for name in cfg.train.eval_tasks:
        try:
            task_path(name)
        except TaskError as e:
            raise ConfigError(f"train.eval_tasks: {e}") from None
