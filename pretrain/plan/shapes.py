"""The model, as the planner sees it: parameters and saved activations, block by block, from the config alone.

A model is ``pre`` (embeddings), ``blocks`` (what a pipeline splits, in order) and ``post`` (final norms and
head), each a :class:`Part` with its parameters split three ways: ``tp`` (split over tensor-parallel ranks:
matmul weights, vocabulary rows), ``rep`` (replicated: norms, routers, row-parallel biases, T5's bias tables)
and ``expert`` (Switch experts, split over expert-parallel ranks and never over tensor ranks, as in
:mod:`pretrain.models.moe`). The totals equal :mod:`pretrain.models.flops`'s counts (tests check it).

Activations are the elements one sample leaves saved for the backward pass: Korthikanti et al. 2022 ("Reducing
activation recomputation in large transformer models", section 4) without dropout (our blocks have none),
refined to what our blocks save (checked tensor by tensor with ``torch.autograd.graph.saved_tensors_hooks``).
Per token of a GPT block with width ``d``, ``q`` query and ``kv`` key/value features, ``a`` heads, FFN ``f``
wide (``w = 2f`` and one more ``f`` for the gate's product when gated, else ``w = f``):

    act_rep = 4d + norms      norm1 input, QKV input, norm2 input, FFN input (replicated over tp unless sp);
                              a LayerNorm adds its mean and rstd (2), an RMSNorm its rstd and normalized input (d+1)
    act_tp  = (q + 2kv) + (q + kv with RoPE) + a + q + w + f (+ f gated)
              QKV output, rotated queries and keys, the attention's log-sum-exp, its output, FFN input
              projection, activation output (and the gate's product)
    + a s                     the attention probabilities, only for the `reference` backend (T5 on a CPU too)

The backward of a gated FFN holds the gate's gradient (``f``, ``cf f`` in a Switch layer) beyond what is
saved: ``backward_extra``, which adds to the peak while a block is backpropagated. A mixture-of-experts layer replaces
``w + f (+ f)`` with ``act_moe = 3d + 2E + 6k + cf k (d + w + f (+ f))`` for ``k`` experts per token (the
gathered input, router logits and probabilities, routing indices, the capacity-padded dispatch buffer, expert
hidden and output, the combined output; ``cf = 1`` when dropless); it is neither tensor- nor sequence-split (the
layer gathers the sequence). A shared expert adds a dense MLP's terms.
A T5 encoder block is the GPT block with ``q = kv = a d_kv`` and no RoPE; a decoder block adds
cross-attention (``3d + 1`` replicated and ``2 q + a`` split per decoder token, plus ``2q`` per encoder token
for keys and values).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pretrain.configlib import ConfigError
from pretrain.models.gpt.config import GPTConfig
from pretrain.models.mlp import is_gated
from pretrain.models.t5.config import T5Config


@dataclass
class Part:
    """Parameters (counts) and saved activations (elements per sample) of one piece of the model."""

    tp: int = 0  # parameters split over tensor-parallel ranks
    rep: int = 0  # replicated parameters
    expert: int = 0  # expert parameters, split over expert-parallel ranks
    largest: int = 0  # parameters of the largest single module (what ZeRO-3 gathers at once)
    act_rep: float = 0  # saved elements replicated over tensor ranks (split by sequence parallelism)
    act_tp: float = 0  # saved elements split over tensor ranks
    act_moe: float = 0  # saved elements of a Switch layer (split by neither)
    checkpoint_input: float = 0  # elements a recomputed (checkpointed) block keeps: its input
    backward_extra: float = 0  # elements its backward holds beyond the saved ones (the gate's gradient)

    @property
    def params(self) -> int:
        return self.tp + self.rep + self.expert

    def local(self, tp: int, ep: int) -> float:
        """This rank's parameters under tensor size ``tp`` and expert size ``ep``."""
        return self.tp / tp + self.rep + self.expert / ep

    def activations(self, tp: int, sp: bool) -> float:
        """Saved elements of one sample on one rank."""
        return self.act_rep / (tp if sp else 1) + self.act_tp / tp + self.act_moe


@dataclass
class Shape:
    pre: Part
    blocks: list[Part]
    post: Part
    hidden: int
    vocab: int
    loss_tokens: int  # tokens per sample that reach the LM head
    tied_copy: int = 0  # parameters of the embedding a last pipeline stage keeps for a tied head
    boundary_tokens: int = 0  # hidden states per sample sent between pipeline stages (0: loss_tokens)

    @property
    def params(self) -> int:
        return self.pre.params + sum(b.params for b in self.blocks) + self.post.params


def _add(*parts: Part) -> Part:
    return Part(**{k: sum(getattr(p, k) for p in parts) for k in Part.__dataclass_fields__ if k != "largest"},
                largest=max(p.largest for p in parts))


def _dense(d: int, hidden: int, gated: bool, bias: bool, tokens: int) -> Part:
    """A dense (tensor-parallel) MLP: column-split input projection, row-split output projection."""
    width = hidden * (2 if gated else 1)
    bias_tp, bias_rep = (width, d) if bias else (0, 0)
    saved = width + hidden * (2 if gated else 1)  # input projection, activation (and the gate's product)
    return Part(tp=d * width + hidden * d + bias_tp, rep=bias_rep, largest=max(d * width, hidden * d) + bias_tp,
                act_tp=saved * tokens, backward_extra=hidden * tokens if gated else 0)


def _ffn(moe: Any, index: int, d: int, hidden: int, activation: str, bias: bool, tokens: int) -> Part:
    """The feed-forward half of block ``index``: a dense MLP or a mixture-of-experts layer (its routed experts
    split over expert ranks only, an optional shared expert split like a dense MLP)."""
    gated = is_gated(activation)
    inputs = Part(act_rep=2 * d * tokens)  # the norm's input and the FFN's input
    if not moe.is_moe_layer(index):
        return _add(inputs, _dense(d, hidden, gated, bias, tokens))
    e, k = moe.num_experts, moe.top_k
    cf = 1.0 if moe.dropless else moe.capacity_factor_train
    expert = _dense(d, moe.expert_hidden(hidden), gated, bias, tokens)
    routed = Part(rep=e * d, expert=e * expert.params, largest=e * expert.params + e * d,
                  act_moe=(3 * d + 2 * e + 6 * k) * tokens + cf * k * (d * tokens + expert.act_tp),
                  backward_extra=cf * k * expert.backward_extra)
    parts = [inputs, routed]
    shared = moe.shared_ffn_size
    if shared:
        parts.append(_dense(d, shared, gated, bias, tokens))
    if moe.shared_gate:
        parts.append(Part(rep=d))
    return _add(*parts)


def _attention(d: int, q: int, kv: int, heads: int, bias: bool, tokens: int, keys: int, probs: bool,
               rope: bool) -> Part:
    qkv = q + 2 * kv
    scores = heads * keys * tokens if probs else 0
    saved = qkv + (q + kv if rope else 0) + heads + q
    return Part(tp=d * qkv + q * d + (qkv if bias else 0), rep=d if bias else 0, largest=d * qkv + (qkv if bias else 0),
                act_rep=2 * d * tokens, act_tp=saved * tokens + scores)


def _norms(count: int, d: int, layernorm: bool, tokens: int) -> Part:
    """``count`` norms' parameters and what each saves besides its input (mean and rstd, or rstd and x * rstd)."""
    return Part(rep=count * (2 * d if layernorm else d), act_rep=count * (2 if layernorm else d + 1) * tokens)


def gpt_shape(cfg: GPTConfig, seq: int) -> Shape:
    d, hd = cfg.hidden_size, cfg.head_dim
    act = "swiglu" if cfg.llama else "gelu"
    blocks = []
    for i in range(cfg.num_layers):
        attn = _attention(d, cfg.num_heads * hd, cfg.kv_heads * hd, cfg.num_heads, not cfg.llama, seq, seq,
                          cfg.attention_backend == "reference", cfg.llama)
        ffn = _ffn(cfg.moe, i, d, cfg.ffn_size, act, not cfg.llama, seq)
        qk_norm = Part(rep=2 * hd) if cfg.qk_norm else Part()  # per-head query/key norms
        blocks.append(_add(attn, ffn, qk_norm, _norms(2, d, not cfg.llama, seq), Part(checkpoint_input=d * seq)))
    positions = 0 if cfg.llama else cfg.max_seq_len * d
    pre = Part(tp=cfg.vocab_size * d + positions, largest=cfg.vocab_size * d, act_rep=d * seq)
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    post = _add(Part(tp=head, largest=head, act_rep=d * seq), _norms(1, d, not cfg.llama, seq))
    return Shape(pre, blocks, post, d, cfg.vocab_size, seq, tied_copy=cfg.vocab_size * d if cfg.tie_embeddings else 0)


def t5_shape(cfg: T5Config, enc: int, dec: int, cpu: bool = False) -> Shape:
    """``cpu``: on a CPU torch's sdpa takes the math path for the relative-position bias, saving probabilities
    (on GPUs the memory-efficient kernel takes the bias in O(s))."""
    d, inner, h = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.num_heads
    probs = cfg.attention_backend == "reference"
    blocks = []
    for i in range(cfg.num_layers):
        attn = _attention(d, inner, inner, h, False, enc, enc, probs or cpu, False)
        ffn = _ffn(cfg.moe, i, d, cfg.d_ff, cfg.activation, False, enc)
        blocks.append(_add(attn, ffn, _norms(2, d, False, enc), Part(checkpoint_input=d * enc)))
    for i in range(cfg.decoder_layers):
        attn = _attention(d, inner, inner, h, False, dec, dec, probs or cpu, False)
        scores = h * enc * dec if probs else 0
        cross = Part(tp=4 * d * inner, largest=2 * d * inner, act_rep=2 * d * dec,
                     act_tp=(2 * inner + h) * dec + 2 * inner * enc + scores)
        ffn = _ffn(cfg.moe, i, d, cfg.d_ff, cfg.activation, False, dec)
        blocks.append(_add(attn, cross, ffn, _norms(3, d, False, dec), Part(checkpoint_input=d * dec)))
    vd = cfg.vocab_size * d
    bias_tables = 2 * cfg.relative_attention_num_buckets * h
    pre = Part(tp=vd, rep=bias_tables, largest=vd, act_rep=d * (enc + dec))
    head = 0 if cfg.tie_embeddings else vd
    post = _add(Part(tp=head, largest=head, act_rep=d * (enc + dec)), _norms(1, d, False, enc),
                _norms(1, d, False, dec))
    return Shape(pre, blocks, post, d, cfg.vocab_size, dec, tied_copy=vd if cfg.tie_embeddings else 0,
                 boundary_tokens=enc + dec)  # encoder and decoder states travel together


def model_shape(cfg: Any, cpu: bool = False) -> Shape:
    """The :class:`Shape` of a whole config (``cfg.model`` and the sequence lengths of ``cfg.data``); ``cpu``:
    as trained on a CPU (see :func:`t5_shape`). Families other than GPT and T5 are refused by name."""
    if isinstance(cfg.model, T5Config):
        return t5_shape(cfg.model, cfg.data.seq_length, cfg.data.decoder_seq_length, cpu)
    if isinstance(cfg.model, GPTConfig):
        return gpt_shape(cfg.model, cfg.data.seq_length)
    raise ConfigError(f"model.family={cfg.family}: the planner models the gpt and t5 families (and their MoE "
                      f"variants) only; plan an equivalent gpt config instead")
