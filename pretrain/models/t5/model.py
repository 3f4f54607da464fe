"""T5 v1.1 encoder-decoder (Raffel et al.), optionally with Switch feed-forward layers (Fedus et al.).

T5 conventions kept here: no 1/sqrt(d) in attention (it is folded into the query init), one relative position
bias table per stack shared by all its layers (bidirectional buckets in the encoder, causal in the decoder,
none in cross-attention), pre-RMSNorm without bias or mean subtraction, Mesh-TF initializer scales, and a shared
input embedding. Each stack is ``embed -> blocks -> final norm``; the decoder adds the LM head. ``forward``,
``encode``/``decode`` and ``stage_forward`` (one pipeline stage of a model cut by
:mod:`pretrain.models.t5.parallelize`) are built from the same small methods.

Self-attention uses a fused QKV projection laid out ``[head][q, k, v][d_kv]`` (whole heads per
tensor-parallel rank, so no ``stride`` is needed); cross-attention fuses K and V the same way. The relative
position tables are drawn for all heads on every rank (one seed, one model under any tensor-parallel size) and
each rank uses its heads' columns (``factory.head_shard``). Under sequence parallelism the encoder output
stays sequence-sharded: the decoder's cross-attention ``column`` projections gather it themselves.

Under context parallelism (``factory.cp`` inside its ``sharding()``, see :mod:`pretrain.parallel.context`) each
rank holds the load-balanced chunks of the encoder's and of the decoder's sequence (each split by its own
length). Every self- and cross-attention attends this rank's queries to all of the context group's keys and
values: gathered in global order (``cp.whole``: all-gather, reduce-scatter backward) under
``parallel.cp_comm=all_gather``, passed around the ring under ``ring``
(:func:`pretrain.parallel.context_t5.ring_attention`). The relative position bias is computed for the queries'
global positions against every key's, so the bias tables get the one-process gradients, and the decoder's
causal mask, the encoder's padding mask and a sparse pattern are likewise taken in global positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from pretrain.models.attention import attention
from pretrain.models.layers import LayerFactory, LocalLayers
from pretrain.models.mlp import MLP
from pretrain.models.moe import SwitchMLP
from pretrain.models.output import ModelOutput, lm_output
from pretrain.models.patterns import attention_mask_for, mask_mod
from pretrain.models.t5.config import T5Config
from pretrain.parallel.context import context_mask
from pretrain.parallel.context_t5 import key_positions, keys_whole, ring_attention


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """T5's bucketing of ``key_pos - query_pos``: exact for small distances, log-spaced up to ``max_distance``."""
    bucket = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket += (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    log_ratio = torch.log(distance.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return bucket + torch.where(distance < max_exact, distance, large)


@dataclass
class T5Context:
    bias: torch.Tensor  # relative position bias of self-attention, [1, local_heads, q_len, k_len]
    key_mask: torch.Tensor | None  # encoder padding (1 = token): encoder self-attn and decoder cross-attn keys
    encoder_out: torch.Tensor | None = None  # set for the decoder
    mask: torch.Tensor | None = None  # self-attention's boolean mask: encoder sparse pattern, decoder causal (CP)
    cp: Any = None  # the context group (pretrain.parallel.context.ContextParallel) of a context-parallel forward
    moe_aux: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)


class Attention(nn.Module):
    def __init__(self, cfg: T5Config, factory: LayerFactory, cross: bool):
        super().__init__()
        self.cross, self.backend, self.d_kv = cross, cfg.attention_backend, cfg.d_kv
        self.heads = factory.local_heads(cfg.num_heads)
        inner, k_std = cfg.num_heads * cfg.d_kv, cfg.init_factor * cfg.d_model ** -0.5
        if cross:
            self.q = factory.column(cfg.d_model, inner, False, k_std * cfg.d_kv ** -0.5)
            self.kv = factory.column(cfg.d_model, 2 * inner, False, k_std)
        else:
            self.qkv = factory.column(cfg.d_model, 3 * inner, False, k_std)
            with torch.no_grad():  # queries get the extra d_kv**-0.5 that replaces the softmax scaling
                self.qkv.weight.view(self.heads, 3, self.d_kv, -1)[:, 0] *= cfg.d_kv ** -0.5
        self.o = factory.row(inner, cfg.d_model, False, cfg.init_factor * inner ** -0.5)

    def forward(self, x: torch.Tensor, ctx: T5Context) -> torch.Tensor:
        if self.cross:
            q = self.q(x)
            b, s = q.shape[:2]
            q = q.view(b, s, self.heads, self.d_kv)
            kv = self.kv(ctx.encoder_out)
            k, v = kv.view(b, kv.shape[1], self.heads, 2, self.d_kv).unbind(3)
            bias, mask, decoder = None, None, False
        else:
            qkv = self.qkv(x)
            b, s = qkv.shape[:2]
            q, k, v = qkv.view(b, s, self.heads, 3, self.d_kv).unbind(3)
            bias, mask, decoder = ctx.bias, ctx.mask, ctx.encoder_out is not None
        key_mask = None if decoder else ctx.key_mask
        if ctx.cp is not None and ctx.cp.comm == "ring":  # local K/V; bias and masks over all keys in ring order
            return self.o(ring_attention(q, k, v, ctx.cp, bias, mask, key_mask).reshape(b, s, -1))
        if ctx.cp is not None:  # the context group's keys and values, in global order
            k, v = ctx.cp.whole(torch.stack([k, v], 3)).unbind(3)
        y = attention(q, k, v, causal=decoder and ctx.cp is None, backend=self.backend, key_mask=key_mask, bias=bias,
                      scale=1.0, mask=mask)
        return self.o(y.reshape(b, s, -1))


class Block(nn.Module):
    def __init__(self, cfg: T5Config, factory: LayerFactory, index: int, decoder: bool, switch: bool):
        super().__init__()
        self.index = index
        self.norm1 = factory.norm(cfg.d_model, "rmsnorm", cfg.norm_eps)
        self.attn = Attention(cfg, factory, cross=False)
        self.cross_norm = factory.norm(cfg.d_model, "rmsnorm", cfg.norm_eps) if decoder else None
        self.cross_attn = Attention(cfg, factory, cross=True) if decoder else None
        self.norm2 = factory.norm(cfg.d_model, "rmsnorm", cfg.norm_eps)
        ffn = dict(dim=cfg.d_model, hidden=cfg.d_ff, activation=cfg.activation, bias=False,
                   in_std=cfg.init_factor * cfg.d_model ** -0.5, out_std=cfg.init_factor * cfg.d_ff ** -0.5)
        self.mlp = SwitchMLP(cfg.moe, **ffn, factory=factory) if switch else MLP(factory, **ffn)

    def forward(self, h: torch.Tensor, ctx: T5Context) -> torch.Tensor:
        h = h + self.attn(self.norm1(h), ctx)
        if self.cross_attn is not None:
            h = h + self.cross_attn(self.cross_norm(h), ctx)
        y = self.mlp(self.norm2(h))
        if isinstance(y, tuple):  # Switch layer: (output, aux losses)
            y, ctx.moe_aux[self.index] = y
        return h + y


class Stack(nn.Module):
    """Encoder or decoder: relative bias table, blocks, final norm (the embedding is shared, in :class:`T5`)."""

    def __init__(self, cfg: T5Config, factory: LayerFactory, decoder: bool):
        super().__init__()
        self.cfg, self.decoder, self.factory = cfg, decoder, factory
        self.relative_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)  # all heads
        nn.init.normal_(self.relative_bias.weight, std=cfg.init_factor * cfg.d_model ** -0.5)
        n, first = (cfg.decoder_layers, cfg.num_layers) if decoder else (cfg.num_layers, 0)
        # Switch placement counts within the stack; indices are global so both stacks' aux losses stay apart.
        self.blocks = nn.ModuleList(Block(cfg, factory, first + i, decoder, cfg.moe.is_moe_layer(i))
                                    for i in range(n))
        self.norm = factory.norm(cfg.d_model, "rmsnorm", cfg.norm_eps)

    def position_bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Bias ``[1, local_heads, q, k]`` of queries at positions ``q_pos`` ``[q]`` to keys at ``k_pos`` ``[k]``."""
        rel = k_pos[None] - q_pos[:, None]
        buckets = relative_position_bucket(rel, not self.decoder, self.cfg.relative_attention_num_buckets,
                                           self.cfg.relative_attention_max_distance)
        return self.factory.head_shard(self.relative_bias(buckets).permute(2, 0, 1)[None])

    def forward(self, h: torch.Tensor, ctx: T5Context) -> torch.Tensor:
        for block in self.blocks:
            h = block(h, ctx)
        return self.norm(h)


class T5(nn.Module):
    def __init__(self, cfg: T5Config, factory: LayerFactory | None = None):
        super().__init__()
        self.cfg, self.factory = cfg, factory or LocalLayers()
        factory = self.factory
        self.embedding = factory.embedding(cfg.vocab_size, cfg.d_model, cfg.init_factor * 1.0)
        self.encoder = Stack(cfg, factory, decoder=False)
        self.decoder = Stack(cfg, factory, decoder=True)
        self.head = factory.lm_head(cfg.d_model, cfg.vocab_size, cfg.init_factor * 1.0,
                                    tied_to=self.embedding if cfg.tie_embeddings else None)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.factory.scatter_sequence(self.embedding(input_ids))

    def positions(self, seq_len: int, attention_mask: torch.Tensor | None, device: torch.device):
        """``(query positions [seq_len], key positions, encoder padding mask, context group or None)`` of a stack's
        self-attention; under context parallelism this rank's chunks' global positions against the whole
        sequence's, and the whole encoder's padding mask, keys in the order the attention takes them
        (:func:`pretrain.parallel.context_t5.key_positions`)."""
        cp = self.factory.cp
        if cp is None or not cp.enabled:
            pos = torch.arange(seq_len, device=device)
            return pos, pos, attention_mask, None
        key_mask = None if attention_mask is None else keys_whole(cp, attention_mask)
        return cp.positions(seq_len, device)[0], key_positions(cp, seq_len, device), key_mask, cp

    def encoder_context(self, seq_len: int, attention_mask: torch.Tensor | None, device: torch.device,
                        moe_aux: dict | None = None) -> T5Context:
        q_pos, k_pos, key_mask, cp = self.positions(seq_len, attention_mask, device)
        bias = self.encoder.position_bias(q_pos, k_pos)
        if cp is None:
            mask = attention_mask_for(self.cfg.sparse, seq_len, seq_len, causal=False, device=device)
        elif self.cfg.sparse.enabled:  # the pattern in global positions, evaluated on the host like pattern_mask
            keep = mask_mod(self.cfg.sparse, len(k_pos), False)(0, 0, q_pos.cpu()[:, None], k_pos.cpu()[None])
            mask = keep.to(device)[None, None]
        else:
            mask = None
        return T5Context(bias=bias, key_mask=key_mask, mask=mask, cp=cp, moe_aux={} if moe_aux is None else moe_aux)

    def decoder_context(self, seq_len: int, attention_mask: torch.Tensor | None, encoder_out: torch.Tensor,
                        moe_aux: dict | None = None) -> T5Context:
        q_pos, k_pos, key_mask, cp = self.positions(seq_len, attention_mask, encoder_out.device)
        mask = None if cp is None else context_mask(q_pos, k_pos, causal=True)  # causal in global positions
        return T5Context(bias=self.decoder.position_bias(q_pos, k_pos), key_mask=key_mask, encoder_out=encoder_out,
                         mask=mask, cp=cp, moe_aux={} if moe_aux is None else moe_aux)

    def final(self, h: torch.Tensor) -> torch.Tensor:
        """The decoder's output leaving the sequence-parallel region, scaled for a tied head as in T5."""
        h = self.factory.gather_sequence(h)
        return h * self.cfg.d_model ** -0.5 if self.cfg.tie_embeddings else h

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               moe_aux: dict | None = None) -> torch.Tensor:
        """Final-normed encoder output ``[b, enc_len, d]``; under sequence parallelism this rank's sequence
        shard, which is what the decoder's cross-attention takes."""
        ctx = self.encoder_context(input_ids.shape[1], attention_mask, input_ids.device, moe_aux)
        return self.encoder(self.embed(input_ids), ctx)

    def decode(self, decoder_input_ids: torch.Tensor, encoder_out: torch.Tensor,
               attention_mask: torch.Tensor | None = None, moe_aux: dict | None = None) -> torch.Tensor:
        """Final-normed decoder states ``[b, dec_len, d]``, scaled for a tied head as in T5."""
        ctx = self.decoder_context(decoder_input_ids.shape[1], attention_mask, encoder_out, moe_aux)
        return self.final(self.decoder(self.embed(decoder_input_ids), ctx))

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor, labels: torch.Tensor,
                attention_mask: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None) -> ModelOutput:
        moe_aux: dict[int, dict[str, torch.Tensor]] = {}
        enc = self.encode(input_ids, attention_mask, moe_aux)
        h = self.decode(decoder_input_ids, enc, attention_mask, moe_aux)
        token_loss = self.factory.cross_entropy(self.head(h), labels)
        return lm_output(token_loss, loss_mask, moe_aux, self.cfg.moe.aux_loss_weight, self.cfg.moe.z_loss_weight)

    def logits(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        enc = self.encode(input_ids, attention_mask)
        return self.factory.gather_logits(self.head(self.decode(decoder_input_ids, enc, attention_mask)))

    def stage_forward(self, enc: torch.Tensor, mask: torch.Tensor, dec: torch.Tensor, first: bool,
                      last: bool) -> tuple[tuple[torch.Tensor, ...] | torch.Tensor, dict]:
        """One pipeline stage of a model cut by :func:`pretrain.models.t5.parallelize.pipeline_stage`.

        Between stages travels ``(encoder states, encoder padding mask, decoder states)``: the decoder's
        cross-attention needs the encoder output (and sends its gradient back through every decoder stage),
        the mask is a batch input every stage needs. The first stage embeds both inputs (later stages only ever
        receive float states), the last returns this rank's vocabulary shard of the logits. Also returns the
        Switch auxiliary losses of the stage's blocks.
        """
        moe_aux: dict[int, dict[str, torch.Tensor]] = {}
        if first:
            enc, dec = self.embed(enc), self.embed(dec)
        if self.encoder is not None:
            enc = self.encoder(enc, self.encoder_context(mask.shape[1], mask, enc.device, moe_aux))
        if self.decoder is None:
            return (enc, mask, dec), moe_aux
        ctx = self.decoder_context(dec.shape[1] * self.factory.sequence_shards, mask, enc, moe_aux)
        dec = self.decoder(dec, ctx)
        if not last:
            return (enc.view_as(enc), mask, dec), moe_aux
        return self.head(self.final(dec)), moe_aux

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None,
                 eos_token_id: int | None = None) -> torch.Tensor:
        """Greedy decoding (encoder run once, decoder recomputed per step); returns ``[b, 1 + new]`` starting
        with ``decoder_start_token_id``."""
        was_training = self.training
        self.eval()
        enc = self.encode(input_ids, attention_mask)
        out = input_ids.new_full((input_ids.shape[0], 1), self.cfg.decoder_start_token_id)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            h = self.decode(out, enc, attention_mask)[:, -1:]
            nxt = self.factory.gather_logits(self.head(h))[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], dim=1)
            if eos_token_id is not None:
                done |= nxt.squeeze(1) == eos_token_id
                if done.all():
                    break
        self.train(was_training)
        return out
