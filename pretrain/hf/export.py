"""``pretrain export CKPT OUT_DIR``: a checkpoint -> a directory ``transformers`` loads with ``from_pretrained``.

GPT Llama flavour -> ``LlamaForCausalLM``, GPT-2 flavour -> ``GPT2LMHeadModel``, Switch-GPT ->
``Qwen2MoeForCausalLM`` (see :mod:`pretrain.hf.configs` for why), T5 -> ``T5ForConditionalGeneration``,
Switch-T5 -> ``SwitchTransformersForConditionalGeneration``. The output holds ``config.json``,
``model.safetensors``, ``generation_config.json`` and tokenizer files (our sentencepiece model converted by
:mod:`pretrain.hf.tokenizer`, or the HF tokenizer an imported model came with). Written to a temporary
directory next to ``OUT_DIR`` and renamed into place, so a failed export leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from pretrain.hf import configs, mapping

log = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"  # inside a checkpoint written by `pretrain import`
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                      "chat_template.jinja")


def rules_for(family: str, cfg, arch: str) -> tuple[list[mapping.Rule], dict[str, str]]:
    """The weight mapping table of ``arch`` for this config, and its tied-tensor aliases."""
    if family == "t5":
        table = mapping.t5_rules(cfg)
    elif arch == configs.GPT2:
        table = mapping.gpt2_rules(cfg)
    else:
        table = mapping.llama_rules(cfg)
    return table, mapping.aliases(arch, cfg.tie_embeddings)


def hf_classes(arch: str):
    """``(model class, config class)`` from transformers for an architecture name."""
    import transformers

    config_name = {configs.LLAMA: "LlamaConfig", configs.GPT2: "GPT2Config", configs.QWEN2_MOE: "Qwen2MoeConfig",
                   configs.T5: "T5Config", configs.SWITCH: "SwitchTransformersConfig"}[arch]
    return getattr(transformers, arch), getattr(transformers, config_name)


def load_model_state(ckpt: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path]:
    """``(full model tensors, meta, checkpoint step dir)`` of a checkpoint saved under any layout."""
    from pretrain.reshard import consolidate, read_meta

    path, _ = read_meta(ckpt)
    full = consolidate(path, optimizer=False)
    return full.model, full.meta, path


def model_config(meta: dict, where: Path) -> tuple[str, Any]:
    """``(family, validated config dataclass)`` from a checkpoint's ``meta.json``."""
    from pretrain.config import dataclass_from_dict
    from pretrain.models import config_class

    model = dict((meta.get("config") or {}).get("model") or {})
    family = model.pop("family", None)
    if not family:
        raise ValueError(f"{where}: meta.json has no config.model.family")
    cfg = dataclass_from_dict(config_class(family), model, "model")
    cfg.validate()
    return family, cfg


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
    """Where the tokenizer is: ``--tokenizer``, a ``tokenizer/`` dir by the checkpoint, or ``pretrain.data.tokenizer``."""
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


def export(ckpt: str | Path, out_dir: str | Path, tokenizer: str | None = None, force: bool = False) -> Path:
    """Write the HF model directory ``out_dir`` from checkpoint ``ckpt``; returns ``out_dir``."""
    from transformers import GenerationConfig

    start = time.time()
    out = Path(out_dir)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    state, meta, step_dir = load_model_state(ckpt)
    family, cfg = model_config(meta, step_dir)
    tok_src = find_tokenizer(step_dir, meta, tokenizer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_tokenizer(tok_src, tmp, getattr(cfg, "max_seq_len", None))
        ids = token_ids(tmp, meta, cfg.vocab_size)
        arch, kwargs = configs.to_hf_config(family, cfg, ids)
        model_cls, config_cls = hf_classes(arch)
        hf_config = config_cls(**kwargs, architectures=[arch], dtype="float32")
        check_config_kept(hf_config, kwargs)
        table, alias = rules_for(family, cfg, arch)
        hf_state = mapping.to_hf({k: v.float() for k, v in state.items()}, table, alias)
        with warnings.catch_warnings():  # Qwen2-MoE's width-0 shared expert
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            model = model_cls(hf_config)
        model.load_state_dict(hf_state, strict=True)
        gen = dict(bos_token_id=ids.get("bos_token_id"), eos_token_id=ids.get("eos_token_id"),
                   pad_token_id=ids.get("pad_token_id"))
        if family == "t5":
            gen["decoder_start_token_id"] = cfg.decoder_start_token_id
        model.generation_config = GenerationConfig(**gen)
        model.save_pretrained(tmp)
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s (%s, %d tensors) to %s in %.1f s", step_dir, arch, len(state), out, time.time() - start)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", metavar="CKPT", help="checkpoint directory (a run's checkpoint root or one step_* dir)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="Hugging Face model directory to write")
    p.add_argument("--tokenizer", help="sentencepiece .model or HF tokenizer dir (default: the checkpoint's)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = export(args.ckpt, args.out_dir, args.tokenizer, args.force)
    except (ValueError, KeyError, RuntimeError, FileNotFoundError, FileExistsError) as e:
        print(f"pretrain export: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0
