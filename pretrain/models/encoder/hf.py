"""Encoder <-> Hugging Face: bert <-> ``BertForMaskedLM`` (``BertForPreTraining`` with ``nsp_head``), roberta <->
``RobertaForMaskedLM``, modernbert <-> ``ModernBertForMaskedLM``; the config translation and the weight tables
(:mod:`pretrain.hf.mapping`'s rules) that export and import both walk. Dropout is written as 0 everywhere.
"""

from __future__ import annotations

from typing import Any

from pretrain.hf.configs import get, need
from pretrain.hf.mapping import Rule, gpt2_qkv, per_head, same
from pretrain.models.encoder.config import EncoderConfig
from pretrain.models.spec import HFSpec

BERT, BERT_PRETRAINING, ROBERTA, MODERNBERT = ("BertForMaskedLM", "BertForPreTraining", "RobertaForMaskedLM",
                                               "ModernBertForMaskedLM")


def architecture(cfg: EncoderConfig) -> str:
    if cfg.flavour == "bert":
        return BERT_PRETRAINING if cfg.nsp_head else BERT
    return ROBERTA if cfg.flavour == "roberta" else MODERNBERT


def to_config(cfg: EncoderConfig, arch: str, ids: dict[str, int | None]) -> dict[str, Any]:
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                  num_attention_heads=cfg.num_heads, intermediate_size=cfg.ffn_hidden_size,
                  max_position_embeddings=cfg.max_seq_len, initializer_range=cfg.init_std,
                  tie_word_embeddings=True, **{**ids, "pad_token_id": cfg.pad_token_id})
    if arch != MODERNBERT:
        return dict(common, type_vocab_size=cfg.type_vocab_size, layer_norm_eps=cfg.norm_eps, hidden_act="gelu",
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    layers = ["full_attention" if cfg.is_global(i) else "sliding_attention" for i in range(cfg.num_layers)]
    rope = {"full_attention": {"rope_type": "default", "rope_theta": float(cfg.global_rope_theta)},
            "sliding_attention": {"rope_type": "default", "rope_theta": float(cfg.local_rope_theta)}}
    return dict(common, norm_eps=cfg.norm_eps, norm_bias=False, hidden_activation="gelu",
                classifier_activation="gelu", layer_types=layers, rope_parameters=rope,
                local_attention=cfg.local_window, attention_bias=False, mlp_bias=False, classifier_bias=False,
                decoder_bias=True, embedding_dropout=0.0, attention_dropout=0.0, mlp_dropout=0.0,
                sparse_prediction=False, cls_token_id=ids.get("bos_token_id"), sep_token_id=ids.get("eos_token_id"))


def _from_bert_like(hf, flavour: str) -> dict[str, Any]:
    need(hf.hidden_act == "gelu", f"hidden_act={hf.hidden_act!r}: only gelu (exact) is supported")
    need(get(hf, "position_embedding_type", "absolute") == "absolute",
         f"position_embedding_type={get(hf, 'position_embedding_type')!r}: only absolute positions are supported")
    need(bool(get(hf, "tie_word_embeddings", True)), "tie_word_embeddings=false: our MLM decoder is tied")
    return dict(flavour=flavour, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
                num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
                ffn_hidden_size=hf.intermediate_size, max_seq_len=hf.max_position_embeddings,
                type_vocab_size=hf.type_vocab_size, pad_token_id=hf.pad_token_id, norm_eps=float(hf.layer_norm_eps),
                init_std=float(hf.initializer_range))


def from_modernbert(hf) -> dict[str, Any]:
    for key, want in (("hidden_activation", "gelu"), ("classifier_activation", "gelu"), ("norm_bias", False),
                      ("attention_bias", False), ("mlp_bias", False), ("classifier_bias", False),
                      ("decoder_bias", True), ("tie_word_embeddings", True)):
        need(get(hf, key, want) == want, f"{key}={get(hf, key)!r}: only {want!r} is supported")
    layers = list(hf.layer_types)
    every = next((i for i in range(1, len(layers)) if layers[i] == "full_attention"), len(layers))
    need(layers == ["full_attention" if i % every == 0 else "sliding_attention" for i in range(len(layers))],
         f"layer_types={layers}: only every n-th layer global (0, n, 2n, ...) is supported")
    rope = hf.rope_parameters
    return dict(flavour="modernbert", vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
                num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
                ffn_hidden_size=hf.intermediate_size, max_seq_len=hf.max_position_embeddings, type_vocab_size=0,
                pad_token_id=hf.pad_token_id, norm_eps=float(hf.norm_eps), init_std=float(hf.initializer_range),
                global_every=every, local_window=hf.local_attention,
                global_rope_theta=float(rope["full_attention"]["rope_theta"]),
                local_rope_theta=float(rope["sliding_attention"]["rope_theta"]))


def _head_bias(hf: str) -> Rule:
    """Our decoder bias ``[vocab, 1]`` (an embedding, vocab-sharded like the decoder) <-> HF's ``[vocab]``."""
    return Rule("head_bias.weight", (hf,), lambda t: (t[:, 0].contiguous(),), lambda ts: ts[0][:, None].contiguous())


def _weight_bias(ours: str, hf: str) -> list[Rule]:
    return [same(ours + ".weight", hf + ".weight"), same(ours + ".bias", hf + ".bias")]


def bert_rules(cfg: EncoderConfig, arch: str) -> list[Rule]:
    """bert / roberta <-> ``BertForMaskedLM`` / ``BertForPreTraining`` / ``RobertaForMaskedLM``."""
    m = "roberta." if arch == ROBERTA else "bert."
    head = "lm_head." if arch == ROBERTA else "cls.predictions."
    transform = "lm_head." if arch == ROBERTA else "cls.predictions.transform."
    rules = [same("tok_emb.weight", m + "embeddings.word_embeddings.weight"),
             same("pos_emb.weight", m + "embeddings.position_embeddings.weight"),
             same("type_emb.weight", m + "embeddings.token_type_embeddings.weight"),
             *_weight_bias("emb_norm", m + "embeddings.LayerNorm"), _head_bias(head + "bias"),
             *_weight_bias("head_dense", transform + "dense"),
             *_weight_bias("head_norm", transform + ("layer_norm" if arch == ROBERTA else "LayerNorm"))]
    if arch == BERT_PRETRAINING:
        rules += [*_weight_bias("pooler", m + "pooler.dense"), *_weight_bias("nsp", "cls.seq_relationship")]
    for i in range(cfg.num_layers):
        o, h = f"blocks.{i}.", f"{m}encoder.layer.{i}."
        qkv = tuple(f"{h}attention.self.{p}" for p in ("query", "key", "value"))
        rules += [
            per_head(o + "attn.qkv.weight", tuple(n + ".weight" for n in qkv), cfg.num_heads, cfg.head_dim),
            per_head(o + "attn.qkv.bias", tuple(n + ".bias" for n in qkv), cfg.num_heads, cfg.head_dim),
            *_weight_bias(o + "attn.proj", h + "attention.output.dense"),
            *_weight_bias(o + "norm1", h + "attention.output.LayerNorm"),
            *_weight_bias(o + "mlp.w_in", h + "intermediate.dense"),
            *_weight_bias(o + "mlp.w_out", h + "output.dense"),
            *_weight_bias(o + "norm2", h + "output.LayerNorm"),
        ]
    return rules


def modernbert_rules(cfg: EncoderConfig) -> list[Rule]:
    """modernbert <-> ``ModernBertForMaskedLM`` (its ``Wqkv`` is ``[q_all; k_all; v_all]``, like GPT-2's)."""
    rules = [same("tok_emb.weight", "model.embeddings.tok_embeddings.weight"),
             same("emb_norm.weight", "model.embeddings.norm.weight"), same("norm.weight", "model.final_norm.weight"),
             same("head_dense.weight", "head.dense.weight"), same("head_norm.weight", "head.norm.weight"),
             _head_bias("decoder.bias")]
    for i in range(cfg.num_layers):
        o, h = f"blocks.{i}.", f"model.layers.{i}."
        if i:
            rules.append(same(o + "norm1.weight", h + "attn_norm.weight"))
        rules += [gpt2_qkv(o + "attn.qkv.weight", h + "attn.Wqkv.weight", cfg.num_heads, cfg.head_dim, weight=False),
                  same(o + "attn.proj.weight", h + "attn.Wo.weight"), same(o + "norm2.weight", h + "mlp_norm.weight"),
                  same(o + "mlp.w_in.weight", h + "mlp.Wi.weight"), same(o + "mlp.w_out.weight", h + "mlp.Wo.weight")]
    return rules


def rules(cfg: EncoderConfig, arch: str) -> tuple[list[Rule], dict[str, str]]:
    """The weight table of ``arch`` and its tied aliases (the decoder is the word embedding; BERT's and
    RoBERTa's decoder bias is their head's bias)."""
    if arch == MODERNBERT:
        return modernbert_rules(cfg), {"decoder.weight": "model.embeddings.tok_embeddings.weight"}
    if arch == ROBERTA:
        return bert_rules(cfg, arch), {"lm_head.decoder.weight": "roberta.embeddings.word_embeddings.weight",
                                       "lm_head.decoder.bias": "lm_head.bias"}
    return bert_rules(cfg, arch), {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
                                   "cls.predictions.decoder.bias": "cls.predictions.bias"}


def tokenizer_tokens(config: dict, tok: dict) -> dict[str, str]:
    """The exported tokenizer's ``mask_token`` (``data.mask_token``, when set) and ``cls_token`` / ``sep_token``
    (its BOS / EOS unless it names them), so ``fill-mask`` and ``[CLS] ... [SEP]`` framing work in transformers."""
    out = {"cls_token": tok.get("cls_token", tok.get("bos_token")),
           "sep_token": tok.get("sep_token", tok.get("eos_token")),
           "mask_token": (config.get("data") or {}).get("mask_token") or tok.get("mask_token")}
    return {k: v for k, v in out.items() if v}


HF = HFSpec(classes={BERT: "BertConfig", BERT_PRETRAINING: "BertConfig", ROBERTA: "RobertaConfig",
                     MODERNBERT: "ModernBertConfig"},
            architecture=architecture, to_config=to_config,
            from_config={BERT: lambda hf: _from_bert_like(hf, "bert"),
                         ROBERTA: lambda hf: _from_bert_like(hf, "roberta"), MODERNBERT: from_modernbert},
            rules=rules, tokenizer_tokens=tokenizer_tokens)
