"""Encoder-only masked language model: ``embed -> blocks (-> final norm) -> MLM head`` (BERT, RoBERTa,
ModernBERT-style; :mod:`pretrain.models.encoder.config` says which piece each flavour has).

Batches (``pretrain.data.mlm_dataset``): ``input_ids`` (masked), ``labels`` (the original tokens),
``loss_mask`` (1 where a token was chosen for prediction), ``attention_mask`` (1 = real token, pads are hidden
from attention), optionally ``token_type_ids`` and, with ``nsp_head``, ``next_sentence_label``.

Tensor parallelism: the word embedding and the tied MLM decoder are vocab-sharded, the decoder's bias is a
``[vocab, 1]`` embedding sharded the same way (so each rank adds its own slice to its logits shard); position
and token-type tables, the head's transform and the NSP head are replicated (they work on the full sequence,
every rank computes them identically). Under sequence parallelism the embedding LayerNorm runs after entering
the sequence-parallel region, like every block norm. Fused QKV is laid out ``[head][q, k, v][head_dim]`` (whole
heads per tensor-parallel rank). GELU is the exact (erf) one, as in BERT and ModernBERT.

Context parallelism (``factory.cp`` inside its ``sharding()``, :mod:`pretrain.parallel.context`): each rank holds
the load-balanced chunks of every row; positions (learned, RoBERTa's pad-offset count, RoPE, restarting per
document) are computed over the whole sequence and this rank's taken, and every layer attends its queries to the
context group's keys bidirectionally under the padding and document masks in global positions (local layers:
the window ``|i - j| <= local_window // 2`` in global positions too), all-gathered or on the ring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.models.attention import DocumentMask, attention
from pretrain.models.encoder.config import EncoderConfig
from pretrain.models.gpt.model import apply_rope, rope_tables
from pretrain.models.layers import LayerFactory, LocalLayers
from pretrain.models.mlp import MLP
from pretrain.models.output import ModelOutput, lm_output


def roberta_positions(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """fairseq / Hugging Face RoBERTa position ids: ``pad_id + 1, pad_id + 2, ...`` over real tokens, ``pad_id`` on
    padding."""
    real = input_ids.ne(pad_id).long()
    return real.cumsum(1) * real + pad_id


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """Each token's index within its document (a run of equal ids in a row), without a host sync."""
    idx = torch.arange(document_ids.shape[1], device=document_ids.device)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return idx - torch.where(starts, idx, 0).cummax(1).values


def band_mask(seq_len: int, half_window: int, device: torch.device) -> torch.Tensor:
    """Local attention ``[1, 1, s, s]``: token ``i`` sees ``j`` when ``|i - j| <= half_window``."""
    pos = torch.arange(seq_len, device=device)
    return ((pos[None] - pos[:, None]).abs() <= half_window)[None, None]


@dataclass
class Context:
    """Per-batch inputs of every block besides the hidden states."""

    key_mask: torch.Tensor | None  # [b, s], 1 = real token
    rope: dict[bool, tuple[torch.Tensor, torch.Tensor]]  # modernbert: is_global -> (cos, signed sin)
    local_mask: torch.Tensor | None  # modernbert: the band of local layers
    documents: DocumentMask | None = None  # document_masking: attention stays within each document
    cp: dict[bool, Any] | None = None  # context parallelism: is_global -> ContextAttention (masks inside)


class GeluMLP(MLP):
    """:class:`MLP` with the exact (erf) GELU: ``gelu`` for BERT, ``geglu`` (GELU of the first half times the
    second) for ModernBERT."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w_in(x)
        if self.activation == "geglu":
            gate, up = h.chunk(2, dim=-1)
            return self.w_out(F.gelu(gate) * up)
        return self.w_out(F.gelu(h))


class SelfAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig, factory: LayerFactory, index: int):
        super().__init__()
        self.backend, self.head_dim, self.is_global = cfg.attention_backend, cfg.head_dim, cfg.is_global(index)
        self.heads = factory.local_heads(cfg.num_heads)
        self.qkv = factory.column(cfg.hidden_size, 3 * cfg.hidden_size, cfg.biases, cfg.init_std)
        self.proj = factory.row(cfg.hidden_size, cfg.hidden_size, cfg.biases, cfg.init_std)

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        qkv = self.qkv(x)
        b, s = qkv.shape[:2]
        qk, v = qkv.view(b, s, self.heads, 3, self.head_dim).split([2, 1], dim=3)
        if ctx.rope:
            qk = apply_rope(qk, *(t.to(qk.dtype) for t in ctx.rope[self.is_global]))
        q, k = qk.unbind(3)
        if ctx.cp is not None:  # the padding, document and window masks are cp's, in global positions
            y = ctx.cp[self.is_global].attention(q, k, v.squeeze(3), causal=False, backend=self.backend)
            return self.proj(y.reshape(b, s, -1))
        mask = None if self.is_global else ctx.local_mask
        y = attention(q, k, v.squeeze(3), causal=False, backend=self.backend, key_mask=ctx.key_mask, mask=mask,
                      document_ids=ctx.documents)
        return self.proj(y.reshape(b, s, -1))


class Block(nn.Module):
    """Post-norm (BERT, RoBERTa) or pre-norm (ModernBERT, whose first block has no attention norm: the
    embedding norm precedes it)."""

    def __init__(self, cfg: EncoderConfig, factory: LayerFactory, index: int):
        super().__init__()
        self.pre_norm = cfg.modern
        norm = dict(dim=cfg.hidden_size, kind="layernorm", eps=cfg.norm_eps, bias=cfg.biases)
        self.norm1 = nn.Identity() if cfg.modern and index == 0 else factory.norm(**norm)
        self.attn = SelfAttention(cfg, factory, index)
        self.norm2 = factory.norm(**norm)
        self.mlp = GeluMLP(factory, cfg.hidden_size, cfg.ffn_hidden_size, "geglu" if cfg.modern else "gelu",
                           cfg.biases, cfg.init_std, cfg.init_std)

    def forward(self, h: torch.Tensor, ctx: Context) -> torch.Tensor:
        if self.pre_norm:
            h = h + self.attn(self.norm1(h), ctx)
            return h + self.mlp(self.norm2(h))
        h = self.norm1(h + self.attn(h, ctx))
        return self.norm2(h + self.mlp(h))


class Encoder(nn.Module):
    def __init__(self, cfg: EncoderConfig, factory: LayerFactory | None = None):
        super().__init__()
        self.cfg, self.factory = cfg, factory or LocalLayers()
        factory, local, d = self.factory, LocalLayers(), cfg.hidden_size
        norm = dict(dim=d, kind="layernorm", eps=cfg.norm_eps, bias=cfg.biases)
        self.tok_emb = factory.embedding(cfg.vocab_size, d, cfg.init_std)
        self.pos_emb = None if cfg.modern else local.embedding(cfg.max_seq_len, d, cfg.init_std)
        self.type_emb = local.embedding(cfg.type_vocab_size, d, cfg.init_std) if cfg.type_vocab_size else None
        self.emb_norm = factory.norm(**norm)
        self.blocks = nn.ModuleList(Block(cfg, factory, i) for i in range(cfg.num_layers))
        self.norm = factory.norm(**norm) if cfg.modern else None
        self.head_dense = local.column(d, d, cfg.biases, cfg.init_std)
        self.head_norm = local.norm(**norm)
        self.head = factory.lm_head(d, cfg.vocab_size, cfg.init_std, tied_to=self.tok_emb)
        self.head_bias = factory.embedding(cfg.vocab_size, 1, 0.0)  # the decoder bias, vocab-sharded like it
        self.pooler = local.column(d, d, True, cfg.init_std) if cfg.nsp_head else None
        self.nsp = local.column(d, 2, True, cfg.init_std) if cfg.nsp_head else None
        if cfg.modern:
            for is_global, theta in ((True, cfg.global_rope_theta), (False, cfg.local_rope_theta)):
                cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, theta)
                self.register_buffer(f"rope_cos_{is_global}", cos, persistent=False)
                self.register_buffer(f"rope_sin_{is_global}", sin, persistent=False)

    def _check_length(self, seq_len: int) -> None:
        if seq_len > self.cfg.max_tokens:
            raise ValueError(f"sequence of {seq_len} tokens exceeds the {self.cfg.max_tokens} positions of "
                             f"model.max_seq_len={self.cfg.max_seq_len}")

    def documents(self, document_ids: torch.Tensor | None) -> torch.Tensor | None:
        """The document ids this model uses: ``document_ids`` under ``model.document_masking``, else None."""
        return document_ids if self.cfg.document_masking else None

    def _over_sequence(self, fn, x: torch.Tensor) -> torch.Tensor:
        """``fn`` of row-wise ``x`` ``[b, s]``; under context parallelism computed over the whole sequence (the
        group's chunks gathered in global order) and this rank's chunks of it returned."""
        cp = self.factory.cp
        return fn(x) if cp is None or not cp.enabled else cp.mine(fn(cp.whole(x)))

    def sequence_positions(self, seq_len: int, device: torch.device,
                           document_ids: torch.Tensor | None) -> torch.Tensor:
        """Each token's index in its document (``document_ids`` given) or in the row: ``[b or 1, seq_len]``."""
        if document_ids is not None:
            return self._over_sequence(document_positions, document_ids)
        cp = self.factory.cp
        if cp is not None and cp.enabled:  # this rank's chunks' global indices
            return cp.positions(seq_len, device)
        return torch.arange(seq_len, device=device)[None]

    def positions(self, input_ids: torch.Tensor, document_ids: torch.Tensor | None) -> torch.Tensor:
        """Position ids: restarting in every document under document masking, else 0, 1, ...; RoBERTa's are
        offset past the pad id (and equal it on padding)."""
        if document_ids is None and self.cfg.flavour == "roberta":
            return self._over_sequence(lambda ids: roberta_positions(ids, self.cfg.pad_token_id), input_ids)
        return self.sequence_positions(input_ids.shape[1], input_ids.device, document_ids) + self.cfg.position_offset

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
              document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings summed, entering the sequence-parallel region, normed: ``[b, s, d]`` (a shard under SP)."""
        self._check_length(input_ids.shape[1])
        h = self.tok_emb(input_ids)
        if self.pos_emb is not None:
            h = h + self.pos_emb(self.positions(input_ids, self.documents(document_ids)))
        if self.type_emb is not None:
            types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            h = h + self.type_emb(types)
        return self.emb_norm(self.factory.scatter_sequence(h))

    def context(self, seq_len: int, attention_mask: torch.Tensor | None, device: torch.device,
                document_ids: torch.Tensor | None = None) -> Context:
        docs = self.documents(document_ids)
        rope, half = {}, self.cfg.local_window // 2
        if self.cfg.modern:
            self._check_length(seq_len)
            pos = self.sequence_positions(seq_len, device, docs)
            rope = {g: (getattr(self, f"rope_cos_{g}")[pos][:, :, None, None],
                        getattr(self, f"rope_sin_{g}")[pos][:, :, None, None]) for g in (True, False)}
        cp = None if self.factory.cp is None else self.factory.cp.forward_state(
            seq_len, docs, device, causal=False, key_mask=attention_mask)
        if cp is not None:
            local = cp.with_pattern(lambda q, k: (q - k).abs() <= half, reach=half)
            return Context(key_mask=None, rope=rope, local_mask=None, cp={True: cp, False: local})
        return Context(key_mask=attention_mask, rope=rope,
                       local_mask=band_mask(seq_len, half, device) if self.cfg.modern else None,
                       documents=None if docs is None else DocumentMask(docs))

    def final(self, h: torch.Tensor) -> torch.Tensor:
        """Leave the sequence-parallel region (after ModernBERT's final norm): ``[b, s, d]``."""
        return self.factory.gather_sequence(self.norm(h) if self.norm is not None else h)

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The last hidden states ``[b, s, d]`` (full sequence)."""
        ctx = self.context(input_ids.shape[1], attention_mask, input_ids.device, document_ids)
        h = self.embed(input_ids, token_type_ids, document_ids)
        for block in self.blocks:
            h = block(h, ctx)
        return self.final(h)

    def mlm_logits(self, h: torch.Tensor) -> torch.Tensor:
        """This rank's vocabulary shard of the MLM logits of hidden states ``h``."""
        return self.head(self.head_norm(F.gelu(self.head_dense(h)))) + self.head_bias.weight[:, 0]

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                next_sentence_label: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None) -> ModelOutput:
        h = self.hidden(input_ids, attention_mask, token_type_ids, document_ids)
        out = lm_output(self.factory.cross_entropy(self.mlm_logits(h), labels), loss_mask, {}, 0.0, 0.0)
        if self.nsp is not None and next_sentence_label is not None:
            nsp_loss = F.cross_entropy(self.nsp_logits(h).float(), next_sentence_label)
            # reported as the step's auxiliary loss (pretrain.step adds it once per micro-batch, averaged)
            out.loss = out.loss + nsp_loss
            out.metrics["aux_loss"] = nsp_loss.detach()
        return out

    def nsp_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Next-sentence (or sentence-order) logits ``[b, 2]`` from the first token's hidden state."""
        cls = h[:, 0] if self.factory.cp is None else self.factory.cp.first(h)  # context rank 0's, on every rank
        return self.nsp(torch.tanh(self.pooler(cls)))

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Full-vocabulary MLM logits ``[b, s, vocab]``."""
        h = self.hidden(input_ids, attention_mask, token_type_ids, document_ids)
        return self.factory.gather_logits(self.mlm_logits(h))

    def stage_forward(self, x: torch.Tensor, mask: torch.Tensor, types: torch.Tensor, docs: torch.Tensor,
                      first: bool, last: bool) -> tuple[tuple[torch.Tensor, ...] | torch.Tensor, dict]:
        """One pipeline stage of a model cut by :func:`pretrain.models.encoder.parallelize.pipeline_stage`.

        Between stages travels ``(hidden states, attention mask, token types, document ids)`` (every stage needs
        the mask and the documents); the first stage embeds the token ids, the last returns this rank's
        vocabulary shard of the MLM logits, with ``nsp_head`` also the next-sentence logits (the pipeline adds
        their loss: :class:`pretrain.parallel.pipeline.PipelineEngine`).
        """
        h = self.embed(x, types, docs) if first else x
        ctx = self.context(mask.shape[1], mask, mask.device, docs)
        for block in self.blocks:
            h = block(h, ctx)
        if last:
            h = self.final(h)
            return ((self.mlm_logits(h), self.nsp_logits(h)) if self.nsp is not None else self.mlm_logits(h)), {}
        return (h, mask, types, docs), {}
