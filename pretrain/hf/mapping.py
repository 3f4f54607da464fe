"""Weight-name mapping between our models and their Hugging Face counterparts: the rule kinds each family's
table (``pretrain/models/<family>/hf.py``, one table per architecture) is made of, and the conversion.

Each table is a list of :class:`Rule`: one of our tensors <-> one or more HF tensors, with the reshape that goes
each way. Export (:func:`to_hf`) and import (:func:`to_ours`) walk the *same* table, so they cannot disagree,
and both fail if a tensor is left over or missing (naming it) instead of silently dropping weights.

HF names are those of the instantiated ``transformers`` model's ``state_dict()``; ``save_pretrained`` /
``from_pretrained`` translate to the on-disk layout themselves (e.g. per-expert tensors of Qwen2-MoE).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class Rule:
    ours: str
    hf: tuple[str, ...]
    split: Callable[[Tensor], tuple[Tensor, ...]] = lambda t: (t,)  # ours -> hf
    join: Callable[[tuple[Tensor, ...]], Tensor] = lambda ts: ts[0]  # hf -> ours


def same(ours: str, hf: str) -> Rule:
    return Rule(ours, (hf,))


def transposed(ours: str, hf: str) -> Rule:
    """GPT-2's ``Conv1D`` stores ``[in, out]``; we store ``nn.Linear``'s ``[out, in]``."""
    return Rule(ours, (hf,), lambda t: (t.t().contiguous(),), lambda ts: ts[0].t().contiguous())


def gated(ours: str, gate: str, up: str) -> Rule:
    """Our fused ``[gate; up]`` input projection <-> separate gate and up projections."""
    return Rule(ours, (gate, up), lambda t: tuple(x.contiguous() for x in t.chunk(2, 0)), lambda ts: torch.cat(ts))


def grouped_qkv(ours: str, q: str, k: str, v: str, heads: int, kv_heads: int, head_dim: int) -> Rule:
    """Our fused QKV grouped by kv head, ``[kv][q_0..q_{g-1}, k, v][head_dim]``, <-> HF's separate q/k/v.

    Query head ``kv * g + j`` reads kv head ``kv`` in both, which is HF's GQA order (query head i -> kv i // g).
    """
    g = heads // kv_heads

    def split(t: Tensor) -> tuple[Tensor, ...]:
        t = t.view(kv_heads, g + 2, head_dim, *t.shape[1:])
        return tuple(x.reshape(-1, *t.shape[3:]).contiguous() for x in (t[:, :g], t[:, g], t[:, g + 1]))

    def join(ts: tuple[Tensor, ...]) -> Tensor:
        qt, kt, vt = ts
        rest = qt.shape[1:]
        parts = [qt.view(kv_heads, g, head_dim, *rest), kt.view(kv_heads, 1, head_dim, *rest),
                 vt.view(kv_heads, 1, head_dim, *rest)]
        return torch.cat(parts, 1).reshape(-1, *rest).contiguous()

    return Rule(ours, (q, k, v), split, join)


def per_head(ours: str, names: tuple[str, ...], heads: int, head_dim: int) -> Rule:
    """Our fused projection laid out ``[head][part][head_dim]`` (T5 ``qkv`` / ``kv``) <-> one tensor per part."""
    n = len(names)

    def split(t: Tensor) -> tuple[Tensor, ...]:
        t = t.view(heads, n, head_dim, *t.shape[1:])
        return tuple(t[:, i].reshape(heads * head_dim, *t.shape[3:]).contiguous() for i in range(n))

    def join(ts: tuple[Tensor, ...]) -> Tensor:
        rest = ts[0].shape[1:]
        return torch.stack([x.view(heads, head_dim, *rest) for x in ts], 1).reshape(-1, *rest).contiguous()

    return Rule(ours, names, split, join)


def gpt2_qkv(ours: str, hf: str, heads: int, head_dim: int, weight: bool) -> Rule:
    """Our per-head ``[q, k, v]`` (GQA layout with g=1) <-> GPT-2's ``c_attn`` = ``[q_all | k_all | v_all]``
    (a Conv1D weight ``[in, 3*d]`` or a bias ``[3*d]``)."""
    inner = per_head(ours, ("q", "k", "v"), heads, head_dim)

    def split(t: Tensor) -> tuple[Tensor, ...]:
        fused = torch.cat(inner.split(t))  # [3d, in] or [3d]
        return (fused.t().contiguous() if weight else fused,)

    def join(ts: tuple[Tensor, ...]) -> Tensor:
        fused = ts[0].t() if weight else ts[0]
        return inner.join(tuple(fused.chunk(3, 0)))

    return Rule(ours, (hf,), split, join)


def experts(ours: str, hf: str) -> Rule:
    """Our batched expert weight ``[E, in, out]`` <-> HF's fused ``[E, out, in]`` (Qwen2-MoE experts)."""
    return Rule(ours, (hf,), lambda t: (t.transpose(1, 2).contiguous(),), lambda ts: ts[0].transpose(1, 2).contiguous())


def per_expert(ours: str, hf: str, num_experts: int) -> Rule:
    """Our batched ``[E, in, out]`` <-> one ``nn.Linear`` ``[out, in]`` per expert (Switch Transformers)."""
    names = tuple(hf.format(e=e) for e in range(num_experts))
    return Rule(ours, names, lambda t: tuple(x.t().contiguous() for x in t.unbind(0)),
                lambda ts: torch.stack([x.t() for x in ts]).contiguous())


def constant(hf: str, value: Callable[[], Tensor]) -> Rule:
    """An HF tensor with no counterpart in our model that must hold a fixed value (e.g. an empty shared expert).

    Export writes ``value()``; import refuses a checkpoint whose tensor differs (it would change the function).
    """
    def join(ts: tuple[Tensor, ...]) -> Tensor:
        if ts[0].shape != value().shape or not torch.equal(ts[0], value()):
            raise ValueError(f"{hf}: must be {tuple(value().shape)} zeros to be representable in our model")
        return ts[0]

    return Rule("", (hf,), lambda t: (value(),), join)


# --- conversion --------------------------------------------------------------------------------------------


def to_hf(ours: dict[str, Tensor], rules: list[Rule], alias: dict[str, str]) -> dict[str, Tensor]:
    """Our state dict -> HF state dict; every tensor of ours must be consumed by exactly one rule."""
    out: dict[str, Tensor] = {}
    used = set()
    for rule in rules:
        if rule.ours and rule.ours not in ours:
            raise KeyError(f"our checkpoint has no tensor {rule.ours!r} (needed for {rule.hf[0]})")
        tensors = rule.split(ours[rule.ours] if rule.ours else None)
        out.update(zip(rule.hf, tensors))
        used.add(rule.ours)
    left = sorted(set(ours) - used)
    if left:
        raise KeyError(f"tensors of our checkpoint with no Hugging Face counterpart: {left[:5]}"
                       f"{' ...' if len(left) > 5 else ''}")
    for name, target in alias.items():
        out[name] = out[target]
    return out


def to_ours(hf: dict[str, Tensor], rules: list[Rule], alias: dict[str, str]) -> dict[str, Tensor]:
    """HF state dict -> ours; every HF tensor must be consumed (tied aliases must equal their target)."""
    out: dict[str, Tensor] = {}
    used = set()
    for rule in rules:
        missing = [n for n in rule.hf if n not in hf]
        if missing:
            raise KeyError(f"the Hugging Face model has no tensor {missing[0]!r} "
                           f"(needed for {rule.ours or 'a check'})")
        value = rule.join(tuple(hf[n] for n in rule.hf))
        if rule.ours:
            out[rule.ours] = value
        used.update(rule.hf)
    for name, target in alias.items():
        if name in hf and not torch.equal(hf[name], hf[target]):
            raise ValueError(f"{name} differs from {target} but the config says they are tied")
        used.add(name)
    left = sorted(set(hf) - used)
    if left:
        raise KeyError(f"Hugging Face tensors with no counterpart in our model: {left[:5]}"
                       f"{' ...' if len(left) > 5 else ''}")
    return out
