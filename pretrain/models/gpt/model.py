"""Decoder-only transformer: ``embed -> blocks -> final norm -> head``.

The pieces are small methods (``embed``, ``context``, ``blocks``, ``final``, ``head``); ``forward`` and
``stage_forward`` (one pipeline stage of a model cut by :mod:`pretrain.models.gpt.parallelize`) are built from
them. Large layers come from the :class:`LayerFactory`, head counts from ``factory.local_heads``, so the same
code runs tensor-parallel.

Fused QKV layout (Megatron's): the projection output is grouped by kv head,
``[kv_head][q_0 .. q_{g-1}, k, v][head_dim]`` with ``g = num_heads / num_kv_heads``, so a tensor-parallel column
split hands each rank whole groups. RoPE uses the rotate-half convention of Hugging Face Llama.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from pretrain.models.attention import DocumentMask, attention
from pretrain.models.gpt.config import GPTConfig
from pretrain.models.layers import LayerFactory, LocalLayers, scaled_init_std
from pretrain.models.mlp import MLP
from pretrain.models.moe import SwitchMLP
from pretrain.models.output import ModelOutput, lm_output
from pretrain.models.patterns import attention_mask_for
from pretrain.models.rope import RopeScaling, inv_frequencies


class KVCache:
    """Preallocated keys/values of every layer for incremental decoding."""

    def __init__(self, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.k = torch.zeros(num_layers, batch, max_len, kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0  # tokens already stored (all layers)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[1]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions; {end} needed")
        self.k[layer, :, self.length:end] = k
        self.v[layer, :, self.length:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]


@dataclass
class Context:
    """Per-batch inputs of every block besides the hidden states; also collects the Switch aux losses."""

    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin: [batch or 1, seq, 1, 1, head_dim]
    document_ids: DocumentMask | None = None  # shared by the layers (flash-attn's varlen metadata once)
    mask: torch.Tensor | None = None  # explicit attention mask (see pretrain.models.attention), e.g. for evals
    cache: KVCache | None = None
    cp: Any = None  # a context-parallel forward's attention (pretrain.parallel.context.ContextAttention)
    moe_aux: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # block index -> aux losses


def rope_tables(head_dim: int, max_len: int, theta: float, scaling: RopeScaling | None = None,
                seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and *signed* ``sin`` tables ``[max_len, head_dim]``: the sine's first half is negated so that
    :func:`apply_rope` needs no negation of the activations. ``scaling``/``seq_len``: :mod:`pretrain.models.rope`."""
    inv_freq, factor = inv_frequencies(head_dim, theta, scaling, seq_len)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    cos, sin = angles.cos() * factor, angles.sin() * factor
    return torch.cat([cos, cos], dim=-1).float(), torch.cat([-sin, sin], dim=-1).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = [-x2, x1]`` (Hugging Face Llama)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.addcmul(x * cos, torch.cat([x2, x1], dim=-1), signed_sin)


class SelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, factory: LayerFactory, index: int):
        super().__init__()
        self.index, self.backend, self.head_dim = index, cfg.attention_backend, cfg.head_dim
        self.q_heads, self.kv_heads = factory.local_heads(cfg.num_heads), factory.local_heads(cfg.kv_heads)
        bias = not cfg.llama
        self.qkv = factory.column(cfg.hidden_size, (cfg.num_heads + 2 * cfg.kv_heads) * cfg.head_dim, bias,
                                  cfg.init_std)
        self.proj = factory.row(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias,
                                scaled_init_std(cfg.init_std, cfg.num_layers))
        self.q_norm = factory.head_norm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = factory.head_norm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        qkv = self.qkv(x)
        b, s = qkv.shape[:2]
        group = self.q_heads // self.kv_heads
        # split (not slicing) keeps the backward a single concatenation
        qk, v = qkv.view(b, s, self.kv_heads, group + 2, self.head_dim).split([group + 1, 1], dim=3)
        if self.q_norm is not None:  # QK-norm, before RoPE as in Qwen3
            q, k = qk.split([group, 1], dim=3)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=3)
        if ctx.rope is not None:
            qk = apply_rope(qk, *(t.to(qk.dtype) for t in ctx.rope))
        q, k = qk.split([group, 1], dim=3)
        q, k, v = q.reshape(b, s, self.q_heads, self.head_dim), k.squeeze(3), v.squeeze(3)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.index, k, v)
        attend = attention if ctx.cp is None else ctx.cp.attention
        y = attend(q, k, v, causal=True, backend=self.backend, document_ids=ctx.document_ids, mask=ctx.mask)
        return self.proj(y.reshape(b, s, -1))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, factory: LayerFactory, index: int):
        super().__init__()
        self.index = index
        norm = "rmsnorm" if cfg.llama else "layernorm"
        self.norm1 = factory.norm(cfg.hidden_size, norm, cfg.norm_eps)
        self.attn = SelfAttention(cfg, factory, index)
        self.norm2 = factory.norm(cfg.hidden_size, norm, cfg.norm_eps)
        ffn = dict(dim=cfg.hidden_size, hidden=cfg.ffn_size, activation="swiglu" if cfg.llama else "gelu",
                   bias=not cfg.llama, in_std=cfg.init_std, out_std=scaled_init_std(cfg.init_std, cfg.num_layers))
        moe = cfg.moe.is_moe_layer(index)
        self.mlp = SwitchMLP(cfg.moe, **ffn, factory=factory) if moe else MLP(factory, **ffn)

    def forward(self, h: torch.Tensor, ctx: Context) -> torch.Tensor:
        h = h + self.attn(self.norm1(h), ctx)
        y = self.mlp(self.norm2(h))
        if isinstance(y, tuple):  # Switch layer: (output, aux losses)
            y, ctx.moe_aux[self.index] = y
        return h + y


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig, factory: LayerFactory | None = None):
        super().__init__()
        self.cfg, self.factory = cfg, factory or LocalLayers()
        factory = self.factory
        self.tok_emb = factory.embedding(cfg.vocab_size, cfg.hidden_size, cfg.init_std)
        self.pos_emb = None if cfg.llama else factory.embedding(cfg.max_seq_len, cfg.hidden_size, cfg.init_std)
        self.blocks = nn.ModuleList(Block(cfg, factory, i) for i in range(cfg.num_layers))
        self.norm = factory.norm(cfg.hidden_size, "rmsnorm" if cfg.llama else "layernorm", cfg.norm_eps)
        self.head = factory.lm_head(cfg.hidden_size, cfg.vocab_size, cfg.init_std,
                                    tied_to=self.tok_emb if cfg.tie_embeddings else None)
        if cfg.llama:
            cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def _positions(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None, offset: int) -> torch.Tensor:
        s = input_ids.shape[1]
        if offset + s > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {offset + s} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        cp = self.factory.cp
        if position_ids is None and cp is not None and cp.enabled:  # this rank's chunks of the sequence
            return cp.positions(s, input_ids.device)
        if position_ids is None:
            return torch.arange(offset, offset + s, device=input_ids.device)[None]
        return position_ids

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, offset: int = 0):
        """Token (+ learned position) embeddings, entering the sequence-parallel region: ``[b, s, d]``."""
        h = self.tok_emb(input_ids)
        if self.pos_emb is not None:
            h = h + self.pos_emb(self._positions(input_ids, position_ids, offset))
        return self.factory.scatter_sequence(h)

    def context(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                mask: torch.Tensor | None = None) -> Context:
        offset = 0 if cache is None else cache.length
        rope = None
        if self.cfg.llama:
            pos = self._positions(input_ids, position_ids, offset)
            rope = self.rope_at(pos)
        docs = DocumentMask(document_ids) if self.cfg.document_masking and document_ids is not None else None
        cp = None if self.factory.cp is None else self.factory.cp.forward_state(
            input_ids.shape[1], None if docs is None else docs.ids, input_ids.device, self.cfg.sparse)
        if cp is not None:  # under context parallelism the pattern is part of cp's mask, in global positions
            return Context(rope=rope, document_ids=docs, mask=None, cache=cache, cp=cp)
        mask = attention_mask_for(self.cfg.sparse, input_ids.shape[1], offset + input_ids.shape[1], causal=True,
                                  document_ids=None if docs is None else docs.ids, device=input_ids.device, mask=mask)
        return Context(rope=rope, document_ids=docs, mask=mask, cache=cache, cp=cp)

    def rope_at(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin ``[batch or 1, seq, 1, 1, head_dim]`` at positions ``pos``; dynamic NTK scaling
        recomputes the tables when the longest position passes the original context (one host sync)."""
        cos, sin, scaling = self.rope_cos, self.rope_sin, self.cfg.rope_scaling
        cp = self.factory.cp  # under context parallelism: the longest position of the whole sequence
        top = (cp.longest(pos) if cp is not None and cp.enabled else int(pos.max())) if scaling.dynamic else 0
        if scaling.dynamic and top + 1 > scaling.original_max_seq_len:
            cos, sin = (t.to(pos.device) for t in rope_tables(self.cfg.head_dim, self.cfg.max_seq_len,
                                                               self.cfg.rope_theta, scaling, top + 1))
        return cos[pos][:, :, None, None], sin[pos][:, :, None, None]

    def final(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm, leaving the sequence-parallel region: the head's input ``[b, s, d]``."""
        return self.factory.gather_sequence(self.norm(h))

    def hidden(self, input_ids, position_ids=None, document_ids=None, cache=None,
               mask=None) -> tuple[torch.Tensor, Context]:
        """Final-normed hidden states (full sequence) and the context they were computed in."""
        ctx = self.context(input_ids, position_ids, document_ids, cache, mask)
        h = self.embed(input_ids, position_ids, 0 if cache is None else cache.length)
        for block in self.blocks:
            h = block(h, ctx)
        if cache is not None:
            cache.length += input_ids.shape[1]
        return self.final(h), ctx

    def head_loss(self, h: torch.Tensor, ctx: Context, labels: torch.Tensor,
                  loss_mask: torch.Tensor | None = None) -> ModelOutput:
        """LM loss of final-normed hidden states ``h`` plus the Switch auxiliary losses collected in ``ctx``."""
        token_loss = self.factory.head_cross_entropy(h, self.head, labels)
        moe = self.cfg.moe
        return lm_output(token_loss, loss_mask, ctx.moe_aux, moe.aux_loss_weight, moe.z_loss_weight)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, document_ids: torch.Tensor | None = None) -> ModelOutput:
        h, ctx = self.hidden(input_ids, position_ids, document_ids)
        return self.head_loss(h, ctx, labels, loss_mask)

    def logits(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
               document_ids: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Full-vocabulary logits ``[b, s, vocab]``; with ``cache``, ``input_ids`` continue the cached tokens."""
        h, _ = self.hidden(input_ids, position_ids, document_ids, cache)
        return self.factory.gather_logits(self.head(h))

    def stage_forward(self, x: torch.Tensor, *packed: torch.Tensor, first: bool,
                      last: bool) -> tuple[torch.Tensor | tuple[torch.Tensor, ...], dict]:
        """One pipeline stage of a model cut by :func:`pretrain.models.gpt.parallelize.pipeline_stage`: token ids
        (first stage) or hidden states in; hidden states out, or this rank's vocabulary shard of the logits on
        the last stage; plus the Switch auxiliary losses of its blocks. ``packed``: the batch's ``(position ids,
        document ids)`` when it has them (:func:`~pretrain.models.gpt.parallelize.stage_inputs`); they travel
        with the hidden states, so every stage places positions and masks attention within each document."""
        pos, docs = packed if packed else (None, None)
        if pos is not None and not first:  # no-op on real ids; torch's first (shape-inference) forward of a later
            pos = pos.clamp(0, self.cfg.max_seq_len - 1)  # stage sends uninitialised placeholder tensors
        if first:
            ids, h = x, self.embed(x, pos)
        else:  # without packed inputs, positions and RoPE depend only on the (full) sequence length
            ids, h = x.new_zeros(x.shape[0], x.shape[1] * self.factory.sequence_shards, dtype=torch.long), x
        ctx = self.context(ids, pos, docs)
        for block in self.blocks:
            h = block(h, ctx)
        if last:
            return self.head(self.final(h)), ctx.moe_aux
        return ((h, *packed) if packed else h), ctx.moe_aux

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p = self.tok_emb.weight
        return KVCache(self.cfg.num_layers, batch, max_len, self.blocks[0].attn.kv_heads, self.cfg.head_dim,
                       p.dtype, p.device)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None,
                 use_cache: bool = True) -> torch.Tensor:
        """Greedy continuation of equal-length prompts ``[b, s]``; returns ``[b, s + new]`` (stops early when
        every row has produced ``eos_token_id``)."""
        was_training = self.training
        self.eval()
        cache = self.new_cache(input_ids.shape[0], input_ids.shape[1] + max_new_tokens) if use_cache else None
        tokens, step_input = input_ids, input_ids
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            nxt = self.logits(step_input, cache=cache)[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
            step_input = nxt if use_cache else tokens
            if eos_token_id is not None:
                done |= nxt.squeeze(1) == eos_token_id
                if done.all():
                    break
        self.train(was_training)
        return tokens
