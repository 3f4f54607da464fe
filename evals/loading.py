"""``load_model``: an :class:`~pretrain.evals.model.EvalModel` from our checkpoint or a Hugging Face directory.

Kept apart from :mod:`pretrain.evals.model` (the interface and its HF implementation) so that the interface does
not depend on our checkpoint model, which implements it.
"""

from __future__ import annotations

from pathlib import Path

from pretrain.evals.model import EvalModel, HFModel, HFSeq2SeqModel
from pretrain.evals.pretrain_model import load_checkpoint_model


def load_model(checkpoint: str | None = None, hf: str | None = None, tokenizer: str | None = None,
               device: str = "cpu", max_length: int | None = None) -> EvalModel:
    """Exactly one of ``checkpoint`` (ours) or ``hf`` (a Hugging Face causal or encoder-decoder LM directory)."""
    if bool(checkpoint) == bool(hf):
        raise ValueError("give exactly one of checkpoint=... or hf=...")
    if hf:
        from transformers import AutoConfig

        seq2seq = Path(hf, "config.json").is_file() and AutoConfig.from_pretrained(hf).is_encoder_decoder
        return (HFSeq2SeqModel if seq2seq else HFModel).from_pretrained(hf, device=device, max_length=max_length)
    return load_checkpoint_model(checkpoint, tokenizer, device=device, max_length=max_length)
