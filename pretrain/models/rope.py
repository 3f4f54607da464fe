"""RoPE frequency scaling for longer contexts: ``model.rope_scaling.*`` (GPT Llama flavour).

Each type computes the inverse frequencies (and a cos/sin multiplier) with the formulas of ``transformers``'
``modeling_rope_utils`` (its ``rope_type`` of the same name), so a model exported with them gives the same logits
in ``transformers``:

* ``none``: ``inv_freq_i = theta ** (-2i / head_dim)``.
* ``linear`` (position interpolation): ``inv_freq / factor``.
* ``dynamic`` (dynamic NTK): for a forward whose largest position is ``p``, with
  ``L = max(p + 1, original_max_seq_len)``, the base becomes
  ``theta * (factor * L / original_max_seq_len - (factor - 1)) ** (head_dim / (head_dim - 2))``; sequences within
  ``original_max_seq_len`` are unchanged. (``transformers`` keeps the largest ``L`` it has seen in the module;
  ours is computed per forward, the same for a fresh model and for a growing KV cache.)
* ``yarn`` (YaRN, Peng et al. 2023): interpolated frequencies for long wavelengths, extrapolated for short ones,
  a linear ramp between the dims ``floor/ceil`` of ``d(beta) = head_dim * ln(original_max_seq_len / (2 pi beta))
  / (2 ln theta)`` for ``beta_fast``/``beta_slow``; cos and sin are multiplied by ``attention_factor`` (default
  ``0.1 ln(factor) + 1``).
* ``llama3`` (Llama 3.1): wavelengths above ``original_max_seq_len / low_freq_factor`` divided by ``factor``,
  below ``original_max_seq_len / high_freq_factor`` kept, smoothly interpolated between.

HF config (``rope_parameters``): :func:`to_hf` writes every field explicitly; :func:`from_hf` reads it back
and refuses what it cannot reproduce. For ``dynamic`` ``transformers`` takes the original context from
``max_position_embeddings``, so the export writes ``original_max_seq_len`` there and the import sets
``max_seq_len = factor * max_position_embeddings``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch

ROPE_TYPES = ("none", "linear", "dynamic", "yarn", "llama3")
NEEDS_ORIGINAL = ("dynamic", "yarn", "llama3")


@dataclass
class RopeScaling:
    type: str = "none"  # none | linear | dynamic | yarn | llama3 (transformers' rope_type formulas)
    factor: float = 1.0  # context extension factor (>= 1; must be 1 for none)
    original_max_seq_len: int | None = None  # context the model was pretrained at (dynamic, yarn, llama3)
    beta_fast: float = 32.0  # yarn: rotations at which the ramp to extrapolation ends
    beta_slow: float = 1.0  # yarn: rotations at which the ramp from interpolation starts
    attention_factor: float | None = None  # yarn: cos/sin multiplier; null = 0.1 * ln(factor) + 1
    low_freq_factor: float = 1.0  # llama3: wavelengths above original / this are fully interpolated
    high_freq_factor: float = 4.0  # llama3: wavelengths below original / this are kept

    def validate(self, max_seq_len: int, prefix: str = "model.rope_scaling") -> None:
        if self.type not in ROPE_TYPES:
            raise ValueError(f"{prefix}.type={self.type!r}: expected one of {ROPE_TYPES}")
        if self.type == "none":
            if self.factor != 1.0:
                raise ValueError(f"{prefix}.factor={self.factor} with {prefix}.type=none: set a type "
                                 f"({', '.join(ROPE_TYPES[1:])}) or factor=1")
            return
        if not self.factor >= 1.0:
            raise ValueError(f"{prefix}.factor={self.factor}: must be >= 1 (the context extension factor)")
        orig = self.original_max_seq_len
        if self.type in NEEDS_ORIGINAL and orig is None:
            raise ValueError(f"{prefix}.type={self.type} needs {prefix}.original_max_seq_len (the context the "
                             "model was pretrained at)")
        if orig is not None and not 1 <= orig <= max_seq_len:
            raise ValueError(f"{prefix}.original_max_seq_len={orig}: must be in [1, model.max_seq_len="
                             f"{max_seq_len}]")
        if self.type == "yarn" and not self.beta_fast > self.beta_slow > 0:
            raise ValueError(f"{prefix}.beta_fast={self.beta_fast} must be above {prefix}.beta_slow="
                             f"{self.beta_slow} > 0")
        if self.attention_factor is not None and self.attention_factor <= 0:
            raise ValueError(f"{prefix}.attention_factor={self.attention_factor}: must be positive or null")
        if self.type == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
            raise ValueError(f"{prefix}.high_freq_factor={self.high_freq_factor} must be above "
                             f"{prefix}.low_freq_factor={self.low_freq_factor} > 0")

    @property
    def dynamic(self) -> bool:
        """The frequencies depend on the forward's sequence length (recomputed per forward)."""
        return self.type == "dynamic"

    def yarn_attention_factor(self) -> float:
        if self.attention_factor is not None:
            return self.attention_factor
        return 1.0 if self.factor <= 1 else 0.1 * math.log(self.factor) + 1.0


def inv_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None,
                    seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """``(inv_freq [head_dim / 2] float64, cos/sin multiplier)``; ``seq_len`` (dynamic only): the forward's
    largest position + 1."""
    kind = "none" if scaling is None else scaling.type
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    inv_freq = 1.0 / theta ** exponents
    if kind == "linear":
        return inv_freq / scaling.factor, 1.0
    if kind == "dynamic":
        orig = scaling.original_max_seq_len
        length = max(seq_len or orig, orig)
        base = theta * (scaling.factor * length / orig - (scaling.factor - 1)) ** (head_dim / (head_dim - 2))
        return 1.0 / base ** exponents, 1.0
    if kind == "yarn":
        return _yarn(inv_freq, head_dim, theta, scaling), scaling.yarn_attention_factor()
    if kind == "llama3":
        return _llama3(inv_freq, scaling), 1.0
    return inv_freq, 1.0


def _yarn(inv_freq: torch.Tensor, dim: int, theta: float, s: RopeScaling) -> torch.Tensor:
    def correction_dim(rotations: float) -> float:
        return dim * math.log(s.original_max_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(s.beta_fast)), 0)
    high = min(math.ceil(correction_dim(s.beta_slow)), dim - 1)
    high = high + 0.001 if low == high else high  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    return inv_freq / s.factor * (1 - extrapolation) + inv_freq * extrapolation


def _llama3(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    orig = s.original_max_seq_len
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > orig / s.low_freq_factor, inv_freq / s.factor, inv_freq)
    smooth = (orig / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= orig / s.high_freq_factor) & (wavelen <= orig / s.low_freq_factor)
    return torch.where(medium, smoothed, scaled)


def to_hf(theta: float, scaling: RopeScaling, max_seq_len: int) -> dict[str, Any]:
    """HF config fields: ``rope_parameters`` and ``max_position_embeddings``."""
    params: dict[str, Any] = {"rope_type": "default" if scaling.type == "none" else scaling.type,
                              "rope_theta": float(theta)}
    if scaling.type == "none":
        return dict(rope_parameters=params, max_position_embeddings=max_seq_len)
    params["factor"] = float(scaling.factor)
    if scaling.type == "dynamic":
        return dict(rope_parameters=params, max_position_embeddings=scaling.original_max_seq_len)
    if scaling.type in NEEDS_ORIGINAL:
        params["original_max_position_embeddings"] = scaling.original_max_seq_len
    if scaling.type == "yarn":
        params.update(beta_fast=float(scaling.beta_fast), beta_slow=float(scaling.beta_slow),
                      attention_factor=float(scaling.yarn_attention_factor()))
    if scaling.type == "llama3":
        params.update(low_freq_factor=float(scaling.low_freq_factor), high_freq_factor=float(scaling.high_freq_factor))
    return dict(rope_parameters=params, max_position_embeddings=max_seq_len)


HF_KEYS = {"rope_type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
           "attention_factor", "low_freq_factor", "high_freq_factor"}


def from_hf(params: dict[str, Any], max_position_embeddings: int) -> dict[str, Any]:
    """Our config values (``rope_theta``, ``max_seq_len``, ``rope_scaling``) from HF ``rope_parameters``; raises
    ``ValueError`` naming the HF field it cannot reproduce."""
    kind = params.get("rope_type", "default")
    kind = "none" if kind == "default" else kind
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_parameters.rope_type={kind!r}: supported are default, {', '.join(ROPE_TYPES[1:])}")
    extra = sorted(k for k, v in params.items() if k not in HF_KEYS and v is not None)
    if extra and not (extra == ["truncate"] and params["truncate"]):
        raise ValueError(f"rope_parameters.{extra[0]}={params[extra[0]]!r}: not supported (drop it or set "
                         "attention_factor explicitly)")
    out: dict[str, Any] = dict(rope_theta=float(params.get("rope_theta", 1e4)), max_seq_len=max_position_embeddings)
    if kind == "none":
        return out
    names = {f.name for f in fields(RopeScaling)}
    scaling = {k: params[k] for k in HF_KEYS & names if params.get(k) is not None}
    scaling.update(type=kind, factor=float(params["factor"]))
    if "original_max_position_embeddings" in params:
        scaling["original_max_seq_len"] = int(params["original_max_position_embeddings"])
    if kind == "dynamic":
        scaling["original_max_seq_len"] = max_position_embeddings
        out["max_seq_len"] = int(max_position_embeddings * scaling["factor"])
    out["rope_scaling"] = scaling
    return out
