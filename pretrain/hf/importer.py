"""``pretrain import HF_DIR OUT_CKPT``: a Hugging Face Llama, GPT-2, T5 or MoE (Mixtral, Qwen2/3-MoE, Glm4-MoE)
model -> one of our checkpoints.

For continued pretraining from a public model. The architecture is checked from ``config.json`` before any
weight is read (others are refused by name); the family whose spec lists the architecture translates the
config (``hf.from_config``, refusing what our models cannot represent exactly) and gives the weight table
export uses too (:mod:`pretrain.hf.mapping`). The result is a step-0 checkpoint (``OUT_CKPT/step_00000000`` +
``latest``) whose ``meta.json`` holds a full training config, with the model's tokenizer files copied to
``OUT_CKPT/tokenizer/`` (``data.tokenizer`` points there) so ``pretrain export`` can write them back.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from pretrain.console import setup_logging
from pretrain.hf import configs, mapping
from pretrain.hf.export import HF_TOKENIZER_FILES, TOKENIZER_DIR, hf_classes, rules_for
from pretrain.models.registry import build_model, family_names, family_spec, model_config

log = logging.getLogger(__name__)


def importable() -> dict[str, str]:
    """HF architecture -> the registered family that imports it (its spec's ``hf.from_config``)."""
    return {arch: name for name in family_names() if family_spec(name).hf is not None
            for arch in family_spec(name).hf.from_config}


def read_hf_config(hf_dir: str | Path):
    """The HF config, refusing unsupported architectures before anything else is loaded."""
    from transformers import AutoConfig

    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (HF_DIR must be a saved transformers model directory)")
    archs = json.loads(path.read_text()).get("architectures") or []
    if len(archs) != 1 or archs[0] not in importable():
        raise configs.UnsupportedConfig(f"{path}: architecture {archs} cannot be imported; supported: "
                                        f"{', '.join(importable())}")
    return AutoConfig.from_pretrained(hf_dir)


def convert(hf_dir: str | Path):
    """``(family, our config dataclass, our state dict, HF config)`` of the model in ``hf_dir``."""
    hf_config = read_hf_config(hf_dir)
    arch = hf_config.architectures[0]
    family = importable()[arch]
    cfg = model_config(family, family_spec(family).hf.from_config[arch](hf_config))
    model_cls, _ = hf_classes(family, arch)
    hf_model = model_cls.from_pretrained(hf_dir, dtype=torch.float32)
    table, alias = rules_for(family, cfg, arch)
    state = mapping.to_ours(hf_model.state_dict(), table, alias)
    build_model(family, cfg).load_state_dict(state, strict=True)  # shapes and names are exactly our model's
    return family, cfg, state, hf_config


def import_hf(hf_dir: str | Path, out_ckpt: str | Path) -> Path:
    """Write ``out_ckpt`` (a checkpoint root) from the HF model in ``hf_dir``; returns the step directory."""
    from pretrain import checkpoint as ckpt_io
    from pretrain.config import Config

    start = time.time()
    root = Path(out_ckpt)
    if (root / ckpt_io.LATEST).exists():
        raise FileExistsError(f"{root} already holds a checkpoint; choose a new OUT_CKPT")
    family, cfg, state, hf_config = convert(hf_dir)
    root.mkdir(parents=True, exist_ok=True)
    tok_dir = root / TOKENIZER_DIR
    _copy_tokenizer(Path(hf_dir), tok_dir)
    full = Config(model=cfg, family=family)
    full.data.tokenizer = str((tok_dir / "tokenizer.json").resolve())
    ids = {k: getattr(hf_config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    meta = {"consumed_samples": 0, "config": full.to_dict(), "hf_token_ids": ids,
            "imported_from": {"path": str(Path(hf_dir).resolve()), "architecture": hf_config.architectures[0]}}
    path = ckpt_io.save_checkpoint(root, 0, state, {}, meta)
    log.info("imported %s (%s, %d tensors) into %s in %.1f s", hf_dir, hf_config.architectures[0], len(state),
             path, time.time() - start)
    return path


def _copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy the HF tokenizer files atomically (temporary dir + rename)."""
    names = [n for n in HF_TOKENIZER_FILES if (src / n).exists()]
    if "tokenizer.json" not in names:
        raise FileNotFoundError(f"{src}: no tokenizer.json to import with the model")
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer.", dir=dst.parent))
    try:
        for name in names:
            shutil.copyfile(src / name, tmp / name)
        tmp.chmod(0o755)
        if dst.exists():
            shutil.rmtree(dst)
        os.rename(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("hf_dir", metavar="HF_DIR", help="Hugging Face model directory (config.json + weights)")
    p.add_argument("out_ckpt", metavar="OUT_CKPT", help="checkpoint root to create")


def run(args: argparse.Namespace) -> int:
    setup_logging(fmt="%(message)s", stream=sys.stderr)
    try:
        path = import_hf(args.hf_dir, args.out_ckpt)
    except (ValueError, KeyError, RuntimeError, FileNotFoundError, FileExistsError) as e:
        print(f"pretrain import: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0
