"""``pretrain export CKPT OUT_DIR``: a checkpoint -> a directory ``transformers`` loads with ``from_pretrained``.

GPT Llama flavour -> ``LlamaForCausalLM``, GPT-2 flavour -> ``GPT2LMHeadModel``, Switch-GPT ->
``Qwen2MoeForCausalLM`` (see :mod:`pretrain.hf.configs` for why), T5 -> ``T5ForConditionalGeneration``,
Switch-T5 -> ``SwitchTransformersForConditionalGeneration``, top-k MoE GPT -> Mixtral / Qwen2-MoE / Qwen3-MoE /
Glm4-MoE (:mod:`pretrain.hf.moe`; ``--architecture`` picks one, default the one it was imported from, else the
family's choice): the architecture, its config and its weight table come from the family's spec (``hf``,
defined in ``pretrain/models/<family>/hf.py``). The output holds ``config.json``,
``model.safetensors``, ``generation_config.json`` and tokenizer files (our sentencepiece model converted by
:mod:`pretrain.hf.tokenizer`, or the HF tokenizer an imported model came with). Written to a temporary
directory next to ``OUT_DIR`` and renamed into place, so a failed export leaves nothing half-written.
``--force`` replaces only an empty directory or an earlier export (marked by ``.pretrain-export``); an OUT_DIR that
is, contains or is inside the checkpoint, or is ``/``, the home or the working directory (or above them), is
refused.
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
import warnings
from pathlib import Path
from typing import Any

import torch

from pretrain.checkpoint import follow_umask
from pretrain.console import setup_logging
from pretrain.hf import configs, mapping
from pretrain.models import registry
from pretrain.models.spec import HFSpec

log = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"  # inside a checkpoint written by `pretrain import`
EXPORT_MARKER = ".pretrain-export"  # in every export: --force replaces only directories that hold it
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                      "chat_template.jinja")


def hf_spec(family: str) -> HFSpec:
    """The Hugging Face mapping of ``family`` (its spec's ``hf``)."""
    hf = registry.family_spec(family).hf
    if hf is None:
        raise configs.UnsupportedConfig(f"model.family={family!r}: no Hugging Face export")
    return hf


def rules_for(family: str, cfg, arch: str) -> tuple[list[mapping.Rule], dict[str, str]]:
    """The weight mapping table of ``arch`` for this config, and its tied-tensor aliases."""
    return hf_spec(family).rules(cfg, arch)


def hf_classes(family: str, arch: str):
    """``(model class, config class)`` from transformers for an architecture of ``family``."""
    import transformers

    return getattr(transformers, arch), getattr(transformers, hf_spec(family).classes[arch])


def load_model_state(ckpt: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path]:
    """``(full model tensors, meta, checkpoint step dir)`` of a checkpoint saved under any layout."""
    from pretrain.reshard import consolidate, read_meta

    path, _ = read_meta(ckpt)
    full = consolidate(path, optimizer=False)
    return full.model, full.meta, path


def model_config(meta: dict, where: Path) -> tuple[str, Any]:
    """``(family, validated config dataclass)`` from a checkpoint's ``meta.json``."""
    model = (meta.get("config") or {}).get("model") or {}
    family = model.get("family")
    if not family:
        raise ValueError(f"{where}: meta.json has no config.model.family")
    return family, registry.model_config(family, model)


def check_config_kept(hf_config, kwargs: dict[str, Any]) -> None:
    """Refuse when transformers overrides a field we set (e.g. transformers 5.x forces T5's LM head to be tied
    to the embedding, so an untied T5 would silently lose its head)."""
    for key, want in kwargs.items():
        got = getattr(hf_config, key, want)
        if got != want:
            raise configs.UnsupportedConfig(
                f"{type(hf_config).__name__}.{key}: we set {want!r} but this transformers version makes it {got!r}"
                + ("; export needs model.tie_embeddings=true for T5" if key == "tie_word_embeddings" else ""))


def find_tokenizer(step_dir: Path, meta: dict, override: str | None) -> Path:
    """Where the tokenizer is: ``--tokenizer``, a ``tokenizer/`` dir by the checkpoint, or ``data.tokenizer``."""
    configured = ((meta.get("config") or {}).get("data") or {}).get("tokenizer")
    candidates = [override] if override else [step_dir / TOKENIZER_DIR, step_dir.parent / TOKENIZER_DIR, configured]
    for c in candidates:
        if c and Path(c).exists():
            return Path(c)
    raise FileNotFoundError(f"{step_dir}: no tokenizer found (looked at {[str(c) for c in candidates]}); "
                            "pass --tokenizer PATH (a sentencepiece .model or an HF tokenizer directory)")


def write_tokenizer(src: Path, out: Path, max_len: int | None) -> None:
    from pretrain.hf.tokenizer import save_hf_tokenizer

    if src.is_dir() and (src / "tokenizer.model").exists() and not (src / "tokenizer.json").exists():
        src = src / "tokenizer.model"
    if src.is_file() and src.suffix == ".model":
        save_hf_tokenizer(src, out, model_max_length=max_len)
    elif src.is_dir():
        copied = [n for n in HF_TOKENIZER_FILES if (src / n).exists()]
        if "tokenizer.json" not in copied:
            raise FileNotFoundError(f"{src}: no tokenizer.json or tokenizer.model")
        for name in copied:
            shutil.copyfile(src / name, out / name)
    elif src.suffix == ".json":
        shutil.copyfile(src, out / "tokenizer.json")
        (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    else:
        raise ValueError(f"{src}: unknown tokenizer format (expected .model, tokenizer.json or a directory)")


def token_ids(tok_dir: Path, meta: dict, vocab_size: int) -> dict[str, int | None]:
    """bos/eos/pad ids: those recorded by `pretrain import` (the original HF config) or the tokenizer's.

    Also checks that every token id of the written tokenizer has a row in the model's embedding.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    if len(tok) > vocab_size:
        raise configs.UnsupportedConfig(f"the tokenizer has {len(tok)} tokens but model.vocab_size={vocab_size}")
    if meta.get("hf_token_ids"):
        return meta["hf_token_ids"]
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def check_out_dir(out: Path, source: Path, force: bool) -> None:
    """Refuse an ``out`` whose replacement would delete something that is not an earlier export of ours."""
    where, src = out.resolve(), Path(source).resolve()
    for kept, what in ((Path("/"), "the root directory"), (Path.home().resolve(), "the home directory"),
                       (Path.cwd(), "the working directory")):
        if where == kept or where in kept.parents:
            raise FileExistsError(f"OUT_DIR {out} is or contains {what}: choose a new directory for the export")
    if where == src or where in src.parents:
        raise FileExistsError(f"OUT_DIR {out} is or contains the checkpoint {source}: choose a new directory")
    if src in where.parents:
        raise FileExistsError(f"OUT_DIR {out} is inside the checkpoint {source}: choose a directory outside it")
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    if out.is_symlink() or not out.is_dir() or (any(out.iterdir()) and not (out / EXPORT_MARKER).is_file()):
        raise FileExistsError(f"{out} is not an earlier export (no {EXPORT_MARKER}), so --force does not replace "
                              f"it: remove it yourself or choose a new directory")


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an earlier export there is renamed aside first and deleted last."""
    aside = None
    if out.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, aside / out.name)
    os.replace(tmp, out)
    if aside is not None:
        shutil.rmtree(aside)


def export(ckpt: str | Path, out_dir: str | Path, tokenizer: str | None = None, force: bool = False,
           architecture: str | None = None) -> Path:
    """Write the HF model directory ``out_dir`` from checkpoint ``ckpt``; returns ``out_dir``. ``architecture``
    (default: the one the checkpoint was imported from, else the family's choice) picks the HF class."""
    from transformers import GenerationConfig

    start = time.time()
    out = Path(out_dir)
    check_out_dir(out, Path(ckpt), force)
    state, meta, step_dir = load_model_state(ckpt)
    family, cfg = model_config(meta, step_dir)
    tok_src = find_tokenizer(step_dir, meta, tokenizer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_tokenizer(tok_src, tmp, getattr(cfg, "max_seq_len", None))
        ids = token_ids(tmp, meta, cfg.vocab_size)
        hf = hf_spec(family)
        arch = architecture or (meta.get("imported_from") or {}).get("architecture") or hf.architecture(cfg)
        configs.need(arch in hf.classes, f"--architecture {arch}: model.family={family} exports as one of "
                                         f"{', '.join(hf.classes)}")
        kwargs = hf.to_config(cfg, arch, {k: ids.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
        tok_config = tmp / "tokenizer_config.json"  # the family's special tokens (an encoder's mask token)
        tok_values = json.loads(tok_config.read_text()) if tok_config.exists() else {}
        family_tokens = hf.tokenizer_tokens(meta["config"], tok_values)
        if family_tokens:
            tok_config.write_text(json.dumps({**tok_values, **family_tokens}))
        model_cls, config_cls = hf_classes(family, arch)
        hf_config = config_cls(**kwargs, architectures=[arch], dtype="float32")
        check_config_kept(hf_config, kwargs)
        table, alias = hf.rules(cfg, arch)
        hf_state = mapping.to_hf({k: v.float() for k, v in state.items()}, table, alias)
        with warnings.catch_warnings():  # Qwen2-MoE's width-0 shared expert
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            model = model_cls(hf_config)
        model.load_state_dict(hf_state, strict=True)
        gen = dict(bos_token_id=ids.get("bos_token_id"), eos_token_id=ids.get("eos_token_id"),
                   pad_token_id=ids.get("pad_token_id"), **hf.generation(cfg))
        model.generation_config = GenerationConfig(**gen)
        model.save_pretrained(tmp)
        follow_umask(*(f for f in tmp.iterdir() if f.is_file()))
        (tmp / EXPORT_MARKER).write_text(json.dumps({"source": str(step_dir)}) + "\n")
        tmp.chmod(0o755)
        check_out_dir(out, Path(ckpt), force)  # again: OUT_DIR may have changed while we exported
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s (%s, %d tensors) to %s in %.1f s", step_dir, arch, len(state), out, time.time() - start)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", metavar="CKPT", help="checkpoint directory (a run's checkpoint root or one step_* dir)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="Hugging Face model directory to write")
    p.add_argument("--tokenizer", help="sentencepiece .model or HF tokenizer dir (default: the checkpoint's)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--architecture", help="Hugging Face class to write, e.g. MixtralForCausalLM (default: the one "
                                          "the checkpoint was imported from, else chosen from the config)")


def run(args: argparse.Namespace) -> int:
    setup_logging(fmt="%(message)s", stream=sys.stderr)
    try:
        out = export(args.ckpt, args.out_dir, args.tokenizer, args.force, args.architecture)
    except (ValueError, KeyError, RuntimeError, FileNotFoundError, FileExistsError) as e:
        print(f"pretrain export: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0
