"""Parity: every layout trains like one process (same seed, same data), on real gloo processes.

Per launch, one group of layouts runs back to back in the same processes (imports and process start are the
slow part on CPU). The single-process reference is :class:`pretrain.local_engine.LocalEngine` in the test process.
Checked per layout: per-step loss (relative difference <= 1e-5), per-step global gradient norm (so clipping
sees the true norm; clipping is active: the norm exceeds ``clip_grad``) and the final parameters (gathered
over tensor, pipeline and expert ranks). Layouts cover plain DP (DDP), DP with ZeRO 0-3, TP, TP+SP, PP 1F1B
and interleaved (tied embeddings, Switch aux losses from an earlier stage, packed documents, BERT's
next-sentence head), EP, EP x TP (+SP), their 4-rank
combinations and DP2 x TP2 x PP2 on 8 ranks, context parallelism (CP2, CP4, with TP+SP, ZeRO-1/3, PP and EP,
over packed documents and sparse patterns too), for GPT-2 and Llama style GPT, T5, Switch-GPT, Switch-T5 and
BERT / ModernBERT-style encoders; some resume from a mid-run engine state dict, one skips a NaN step.
"""

from __future__ import annotations

import gc
import io
import math

import numpy as np
import pytest
import torch

from pretrain.config import from_dict
from tests.dist_utils import run_distributed

pytestmark = pytest.mark.dist

STEPS, SEQ, DEC_SEQ, GLOBAL_BATCH, MICRO_BATCH, LR, CLIP = 10, 16, 8, 8, 2, 1e-2, 0.3
MODELS = {
    # GPT-2 style, with grouped-query attention and a tied head
    "gpt2": {"family": "gpt", "flavour": "gpt2", "vocab_size": 128, "hidden_size": 32, "num_layers": 2,
             "num_heads": 4, "num_kv_heads": 2, "max_seq_len": SEQ, "tie_embeddings": True},
    # Llama style: RMSNorm, RoPE, SwiGLU, untied head
    "llama": {"family": "gpt", "flavour": "llama", "vocab_size": 128, "hidden_size": 32, "num_layers": 2,
              "num_heads": 4, "ffn_hidden_size": 64, "max_seq_len": SEQ},
    # four blocks (for 2 x 2 interleaved stages), untied
    "gpt2_deep": {"family": "gpt", "flavour": "gpt2", "vocab_size": 128, "hidden_size": 32, "num_layers": 4,
                  "num_heads": 4, "num_kv_heads": 2, "max_seq_len": SEQ},
    # Switch-GPT: 4 experts in block 1, capacity factor 1 so tokens get dropped; no router jitter (random)
    "switch": {"family": "gpt", "flavour": "gpt2", "vocab_size": 128, "hidden_size": 32, "num_layers": 2,
               "num_heads": 4, "max_seq_len": SEQ,
               "moe": {"num_experts": 4, "capacity_factor_train": 1.0, "jitter": 0.0}},
    # Switch-GPT over packed documents (context parallelism gathers each MoE layer's sequence in global order)
    "switch_docs": {"family": "gpt", "flavour": "gpt2", "vocab_size": 128, "hidden_size": 32, "num_layers": 2,
                    "num_heads": 4, "max_seq_len": SEQ, "document_masking": True,
                    "moe": {"num_experts": 4, "capacity_factor_train": 1.0, "jitter": 0.0}},
    # four blocks, Switch in blocks 1 and 3 (earlier and last pipeline stage), tied head
    "switch_deep": {"family": "gpt", "flavour": "gpt2", "vocab_size": 128, "hidden_size": 32, "num_layers": 4,
                    "num_heads": 4, "max_seq_len": SEQ, "tie_embeddings": True,
                    "moe": {"num_experts": 4, "capacity_factor_train": 1.0, "jitter": 0.0}},
    # packed documents (random borders, positions reset per document), attention kept within each document
    "gpt2_docs": {"family": "gpt", "flavour": "gpt2", "vocab_size": 128, "hidden_size": 32, "num_layers": 2,
                  "num_heads": 4, "num_kv_heads": 2, "max_seq_len": SEQ, "document_masking": True},
    "llama_docs": {"family": "gpt", "flavour": "llama", "vocab_size": 128, "hidden_size": 32, "num_layers": 2,
                   "num_heads": 4, "ffn_hidden_size": 64, "max_seq_len": SEQ, "document_masking": True},
    # sparse patterns (in global positions under CP): causal window + global tokens over documents, with dynamic
    # NTK RoPE (the longest position of the micro-batch sets the base); BigBird's blocks (window, global, random)
    "llama_window": {"family": "gpt", "flavour": "llama", "vocab_size": 128, "hidden_size": 32, "num_layers": 2,
                     "num_heads": 4, "ffn_hidden_size": 64, "max_seq_len": SEQ, "document_masking": True,
                     "sparse": {"pattern": "sliding_window", "window": 3, "global_tokens": 2},
                     "rope_scaling": {"type": "dynamic", "factor": 4.0, "original_max_seq_len": 4}},
    "gpt2_bigbird": {"family": "gpt", "flavour": "gpt2", "vocab_size": 128, "hidden_size": 32, "num_layers": 2,
                     "num_heads": 4, "num_kv_heads": 2, "max_seq_len": SEQ,
                     "sparse": {"pattern": "bigbird", "block_size": 2, "window_blocks": 1, "random_blocks": 1,
                                "global_tokens": 2}},
    # top-2 of 4 small experts in every block, dropless, sigmoid scores, shared expert (gated), aux-loss-free bias
    "moe": {"family": "gpt", "flavour": "llama", "vocab_size": 128, "hidden_size": 32, "num_layers": 2,
            "num_heads": 4, "ffn_hidden_size": 64, "max_seq_len": SEQ,
            "moe": {"num_experts": 4, "every": 1, "top_k": 2, "dropless": True, "expert_ffn_size": 16,
                    "shared_ffn_size": 32, "shared_gate": True, "score": "sigmoid", "normalize_top_k": True,
                    "bias_update_rate": 0.01, "aux_loss_scope": "sequence", "jitter": 0.0}},
    # T5 v1.1 (gated GELU, relative position bias), padded encoder inputs
    "t5": {"family": "t5", "vocab_size": 128, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2,
           "num_heads": 4},
    # Switch-T5: 4 experts in block 1 of each stack
    "switch_t5": {"family": "t5", "vocab_size": 128, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2,
                  "num_heads": 4, "moe": {"num_experts": 4, "capacity_factor_train": 1.0, "jitter": 0.0}},
    # T5 with BigBird blocks (window, global, random) in the encoder (in global positions under CP)
    "t5_bigbird": {"family": "t5", "vocab_size": 128, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2,
                   "num_heads": 4, "sparse": {"pattern": "bigbird", "block_size": 2, "window_blocks": 1,
                                              "random_blocks": 1, "global_tokens": 2}},
    # encoders (masked LM over padded rows): BERT (post-LN, learned positions, two token types) and ModernBERT
    # style (pre-LN, RoPE, GeGLU, global block 0 and a 4-token sliding window in block 1)
    "bert": {"family": "encoder", "flavour": "bert", "vocab_size": 128, "hidden_size": 32, "num_layers": 2,
             "num_heads": 4, "ffn_hidden_size": 64, "max_seq_len": SEQ},
    "modernbert": {"family": "encoder", "flavour": "modernbert", "vocab_size": 128, "hidden_size": 32,
                   "num_layers": 2, "num_heads": 4, "ffn_hidden_size": 64, "max_seq_len": SEQ, "type_vocab_size": 0,
                   "global_every": 2, "local_window": 4},
    # for pipelines: packed documents over 2 x 2 stages (GPT-2 style, tied, multi-head: with GQA, or Llama style, 4
    # blocks over documents drift past 1e-5 in 10 steps in every layout, TP2 too), BERT's next-sentence head,
    # ModernBERT style over packed documents
    "gpt2_docs_deep": {"family": "gpt", "flavour": "gpt2", "vocab_size": 128, "hidden_size": 32, "num_layers": 4,
                       "num_heads": 4, "max_seq_len": SEQ, "tie_embeddings": True, "document_masking": True},
    "bert_nsp": {"family": "encoder", "flavour": "bert", "vocab_size": 128, "hidden_size": 32, "num_layers": 2,
                 "num_heads": 4, "ffn_hidden_size": 64, "max_seq_len": SEQ, "nsp_head": True},
    "modernbert_docs": {"family": "encoder", "flavour": "modernbert", "vocab_size": 128, "hidden_size": 32,
                        "num_layers": 4, "num_heads": 4, "ffn_hidden_size": 64, "max_seq_len": SEQ,
                        "type_vocab_size": 0, "global_every": 2, "local_window": 4, "document_masking": True},
    # ModernBERT style over packed documents in 2 blocks (global, local) for context parallelism
    "modernbert_packed": {"family": "encoder", "flavour": "modernbert", "vocab_size": 128, "hidden_size": 32,
                          "num_layers": 2, "num_heads": 4, "ffn_hidden_size": 64, "max_seq_len": SEQ,
                          "type_vocab_size": 0, "global_every": 2, "local_window": 4, "document_masking": True},
    # RoBERTa: positions count the non-pad tokens from pad id + 1 (over the whole sequence under CP)
    "roberta": {"family": "encoder", "flavour": "roberta", "vocab_size": 128, "hidden_size": 32, "num_layers": 2,
                "num_heads": 4, "ffn_hidden_size": 64, "max_seq_len": SEQ + 2, "pad_token_id": 1},
}
LOSS_RTOL = NORM_RTOL = 1e-5
PARAM_ATOL = 5e-6
# Adam eps: key biases get an exactly-zero true gradient (softmax ignores a constant shift), so with the usual
# eps=1e-8 Adam turns their ~1e-10 rounding noise into full-size updates of random sign in every layout.
ADAM_EPS = 1e-5


def make_config(model: str, parallel: dict):
    return from_dict({
        "model": MODELS[model],
        "data": {"seq_length": SEQ, "decoder_seq_length": DEC_SEQ},
        "optimizer": {"lr": LR, "clip_grad": CLIP, "weight_decay": 0.1, "eps": ADAM_EPS},
        "train": {"steps": STEPS, "global_batch_size": GLOBAL_BATCH, "micro_batch_size": MICRO_BATCH,
                  "seed": 7, "device": "cpu", "tf32": False},  # exact fp32 (TF32 would be on for CUDA)
        "parallel": parallel,
    })


def global_batch(step: int, model: str) -> dict[str, torch.Tensor]:
    """Random tokens; a random quarter of the loss mask is off so token-weighted averaging matters. T5 gets
    encoder inputs with up to 4 padding tokens per row and shifted decoder inputs."""
    rng = np.random.default_rng(1000 + step)
    vocab = MODELS[model]["vocab_size"]
    t5 = MODELS[model]["family"] == "t5"
    seq = DEC_SEQ if t5 else SEQ
    tokens = torch.from_numpy(rng.integers(0, vocab, (GLOBAL_BATCH, seq + 1)))
    mask = torch.from_numpy((rng.random((GLOBAL_BATCH, seq)) > 0.25).astype(np.float32))
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask}
    if t5:
        lengths = torch.from_numpy(rng.integers(SEQ - 4, SEQ + 1, GLOBAL_BATCH))
        batch = {"input_ids": torch.from_numpy(rng.integers(0, vocab, (GLOBAL_BATCH, SEQ))),
                 "attention_mask": (torch.arange(SEQ)[None] < lengths[:, None]).long(),
                 "decoder_input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask}
    if MODELS[model].get("document_masking"):  # a border before ~1 token in 5, anywhere (across CP chunks)
        starts = torch.from_numpy(rng.random((GLOBAL_BATCH, seq)) < 0.2)
        starts[:, 0] = True
        doc_ids = starts.long().cumsum(1) - 1
        first = torch.where(starts, torch.arange(seq), 0).cummax(1).values
        batch["document_ids"] = doc_ids
        if MODELS[model]["family"] == "gpt":  # encoders count positions from the document ids
            batch["position_ids"] = torch.arange(seq) - first
    if MODELS[model]["family"] == "encoder":  # up to 4 padding tokens per row; segment B from the middle
        lengths = torch.from_numpy(rng.integers(SEQ - 4, SEQ + 1, GLOBAL_BATCH))
        batch |= {"attention_mask": (torch.arange(SEQ)[None] < lengths[:, None]).long(),
                  "token_type_ids": (torch.arange(SEQ)[None] >= lengths[:, None] // 2).long()}
    if MODELS[model].get("nsp_head"):
        batch["next_sentence_label"] = torch.from_numpy(rng.integers(0, 2, GLOBAL_BATCH))
    return batch


def micro_batches(step: int, model: str, dp_rank: int, dp_size: int) -> list[dict]:
    batch = global_batch(step, model)
    per_rank = GLOBAL_BATCH // dp_size
    mine = {k: v[dp_rank * per_rank:(dp_rank + 1) * per_rank] for k, v in batch.items()}
    return [{k: v[i:i + MICRO_BATCH] for k, v in mine.items()} for i in range(0, per_rank, MICRO_BATCH)]


def train(engine, model: str, steps: range = range(STEPS)) -> dict[str, list[float]]:
    from pretrain.moe_balance import ExpertBalance

    losses, norms, balance = [], [], ExpertBalance(engine)
    for step in steps:
        m = engine.train_step(micro_batches(step, model, engine.dp_rank, engine.dp_size), LR)
        balance.after_step(m.skipped)  # as the trainer does: MoE selection-bias update
        losses.append(m.loss)
        norms.append(m.grad_norm)
    return {"loss": losses, "grad_norm": norms}


def assert_nan_step_is_skipped(engine, step: int, model: str) -> None:
    """One data-parallel rank sees a NaN loss: every rank must skip the update and keep its weights."""
    def poison(module, inputs, out):
        out.loss, out.lm_loss_sum = out.loss * float("nan"), out.lm_loss_sum * float("nan")
        return out

    before = [p.detach().clone() for p in engine.model.parameters()]
    handle = engine.model.register_forward_hook(poison) if engine.dp_rank == 1 else None
    metrics = engine.train_step(micro_batches(step, model, engine.dp_rank, engine.dp_size), LR)
    if handle:
        handle.remove()
    assert metrics.skipped, metrics
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, engine.model.parameters()))


def roundtrip(state: dict) -> dict:
    """Through bytes and back as checkpoints store it (``weights_only`` load)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def layouts_worker(args: dict) -> dict:
    """Runs on every rank: train each layout in ``args["layouts"]``; rank 0 returns full parameters.

    A layout marked ``True`` stops halfway, saves the engine state, builds a fresh engine, loads it and
    finishes; one marked ``"nan"`` gets a NaN loss on one rank halfway (the step must be skipped everywhere)
    and then repeats that step normally. Both must still equal the uninterrupted single-process run.
    """
    import torch.distributed as dist

    from pretrain.engines import build_engine

    out = {}
    for name, (model, parallel, *resume) in args["layouts"].items():
        cfg = make_config(model, parallel)
        engine = build_engine(cfg, parallel=bool(parallel))  # {} = plain DP; {"zero": 0} = DeepSpeed
        if resume == ["nan"]:  # a skipped step in the middle must leave no trace
            half = train(engine, model, range(STEPS // 2))
            assert_nan_step_is_skipped(engine, STEPS // 2, model)
            rest = train(engine, model, range(STEPS // 2, STEPS))
            result = {k: half[k] + rest[k] for k in half}
        elif resume:
            half = train(engine, model, range(STEPS // 2))
            state = roundtrip(engine.state_dict())
            del engine
            engine = build_engine(cfg, parallel=bool(parallel))
            engine.load_state_dict(state)
            rest = train(engine, model, range(STEPS // 2, STEPS))
            result = {k: half[k] + rest[k] for k in half}
        else:
            result = train(engine, model)
        state = engine.state_dict()["model"]
        if cfg.parallel.tp > 1:
            from pretrain.parallel.tensor import full_state_dict

            state = full_state_dict(engine.model, state, engine.mesh.group("tp"))
        if cfg.parallel.ep > 1:  # each expert-parallel rank holds E/ep experts (dim 0)
            for key, p in engine.model.named_parameters():
                if getattr(p, "expert_parallel", False):
                    parts = [torch.empty_like(p) for _ in range(cfg.parallel.ep)]
                    dist.all_gather(parts, p.detach().contiguous(), group=engine.mesh.group("ep"))
                    state[key] = torch.cat(parts)
        if cfg.parallel.pp > 1:  # each pipeline rank holds its stages' tensors, under the full model's names
            parts = [None] * cfg.parallel.pp
            dist.all_gather_object(parts, state, group=engine.mesh.group("pp"))
            state = {k: v for part in parts for k, v in part.items()}
        if dist.get_rank() == 0:
            out[name] = {**result, "params": state}
        del engine
        gc.collect()
    return out


def reference(model: str) -> dict:
    from pretrain.engines import build_engine

    cfg = make_config(model, {})
    engine = build_engine(cfg)
    result = train(engine, model)
    return {**result, "params": engine.state_dict()["model"]}


def differences(got: dict, ref: dict) -> dict[str, float]:
    """Max relative loss / grad-norm differences over the steps and max absolute final-parameter difference."""
    assert set(got["params"]) == set(ref["params"])
    rel = lambda key: max(abs(a - b) / abs(b) if math.isfinite(a) else math.inf  # noqa: E731
                          for a, b in zip(got[key], ref[key]))
    params = max((got["params"][k] - ref["params"][k]).abs().max().item() for k in ref["params"])
    return {"loss": rel("loss"), "grad_norm": rel("grad_norm"), "params": params}


def assert_all_match(results: dict, layouts: dict, references: dict) -> None:
    diffs = {name: differences(results[name], references[model]) for name, (model, *_) in layouts.items()}
    for name, d in diffs.items():
        print(f"{name:<24} loss rel {d['loss']:.1e}  grad-norm rel {d['grad_norm']:.1e}  params abs {d['params']:.1e}")
    bad = {n: d for n, d in diffs.items()
           if not (d["loss"] <= LOSS_RTOL and d["grad_norm"] <= NORM_RTOL and d["params"] <= PARAM_ATOL)}
    assert not bad, bad


@pytest.fixture(scope="module")
def references() -> dict[str, dict]:
    torch.set_num_threads(1)
    refs = {m: reference(m) for m in MODELS}
    for r in refs.values():
        assert max(r["grad_norm"]) > CLIP  # clipping is active, so a wrong global norm would show
    return refs


LAYOUTS_2 = {
    "dp2 zero0 gpt2": ("gpt2", {"zero": 0}),
    "dp2 ddp gpt2": ("gpt2", {}),  # plain data parallelism: LocalEngine with DDP buckets
    "dp2 zero1 llama": ("llama", {"zero": 1}),
    "dp2 zero2 gpt2 nan-skip": ("gpt2", {"zero": 2}, "nan"),
    "dp2 zero3 llama": ("llama", {"zero": 3}),
    "tp2 llama resumed": ("llama", {"tp": 2}, True),
    "tp2 sp zero1 llama": ("llama", {"tp": 2, "sp": True, "zero": 1}),
    "tp2 t5": ("t5", {"tp": 2}),
    "tp2 sp t5": ("t5", {"tp": 2, "sp": True}),
    "dp2 zero1 t5": ("t5", {"zero": 1}),
    "ep2 switch_t5": ("switch_t5", {"ep": 2}),
    "tp2 sp zero1 switch_t5": ("switch_t5", {"tp": 2, "sp": True, "zero": 1}),
    "dp2 zero1 llama resumed": ("llama", {"zero": 1}, True),
    "dp2 zero3 gpt2 resumed": ("gpt2", {"zero": 3}, True),
    "pp2 1f1b llama": ("llama", {"pp": 2}),
    "pp2 interleaved gpt2_deep": ("gpt2_deep", {"pp": 2, "vpp": 2}),
    "pp2 1f1b gpt2 tied": ("gpt2", {"pp": 2}),
    "pp2 interleaved switch_deep": ("switch_deep", {"pp": 2, "vpp": 2}),
    "pp2 1f1b t5": ("t5", {"pp": 2}),
    "ep2 switch": ("switch", {"ep": 2}),
    "tp2 sp zero1 bert": ("bert", {"tp": 2, "sp": True, "zero": 1}),
    "dp2 zero3 modernbert resumed": ("modernbert", {"zero": 3}, True),
    "tp2 modernbert": ("modernbert", {"tp": 2}),
    "pp2 1f1b bert": ("bert", {"pp": 2}),
    "pp2 1f1b bert_nsp": ("bert_nsp", {"pp": 2}),  # the next-sentence loss on the last stage
    "pp2 1f1b llama_docs": ("llama_docs", {"pp": 2}),  # positions and document ids travel with the hidden states
    "pp2 interleaved gpt2_docs_deep": ("gpt2_docs_deep", {"pp": 2, "vpp": 2}),
    "pp2 interleaved modernbert_docs": ("modernbert_docs", {"pp": 2, "vpp": 2}),
    "ep2 moe": ("moe", {"ep": 2}),  # dropless top-2 + shared expert + aux-loss-free bias
    "cp2 gpt2": ("gpt2", {"cp": 2}),  # context parallelism: load-balanced chunks, all-gathered K/V
    "cp2 gpt2_docs": ("gpt2_docs", {"cp": 2}),  # documents spanning chunk borders
    "cp2 zero1 llama_docs resumed": ("llama_docs", {"cp": 2, "zero": 1}, True),
    "cp2 ring gpt2_docs": ("gpt2_docs", {"cp": 2, "cp_comm": "ring"}),  # K/V passed rank to rank
    "cp2 llama_window": ("llama_window", {"cp": 2}),  # window + global tokens + documents + dynamic RoPE
    "cp2 ring gpt2_bigbird": ("gpt2_bigbird", {"cp": 2, "cp_comm": "ring"}),  # BigBird blocks on the ring's tiles
    "cp2 ep2 switch": ("switch", {"cp": 2, "ep": 2}),  # capacity and dropping decided over the whole sequence
    "cp2 ep2 switch_docs": ("switch_docs", {"cp": 2, "ep": 2, "cp_comm": "ring"}),
    "cp2 ep2 moe": ("moe", {"cp": 2, "ep": 2}),  # dropless top-2, shared gated expert, per-sequence aux, bias
    # encoders: bidirectional, padding keys hidden, local window and positions in global positions
    "cp2 modernbert": ("modernbert", {"cp": 2}),
    "cp2 modernbert_packed": ("modernbert_packed", {"cp": 2}),  # documents across chunk borders, RoPE restarting
    "cp2 ring modernbert": ("modernbert", {"cp": 2, "cp_comm": "ring"}),  # pads that see no key in their window
    "cp2 ring modernbert_packed": ("modernbert_packed", {"cp": 2, "cp_comm": "ring"}),
    "cp2 bert_nsp": ("bert_nsp", {"cp": 2}),  # learned positions, token types, [CLS] from context rank 0
    "cp2 roberta": ("roberta", {"cp": 2}),  # pad-offset positions counted over the whole sequence
    "cp2 t5": ("t5", {"cp": 2}),  # both sequences split; relative bias over global positions; padded encoder
    "cp2 t5_bigbird": ("t5_bigbird", {"cp": 2}),  # the encoder's BigBird pattern in global positions
    "cp2 ring t5_bigbird": ("t5_bigbird", {"cp": 2, "cp_comm": "ring"}),  # bias tiles and their gradient
    "cp2 ep2 switch_t5": ("switch_t5", {"cp": 2, "ep": 2}),
}
LAYOUTS_4 = {
    "dp2 tp2 zero1 llama": ("llama", {"tp": 2, "zero": 1}),
    "dp2 tp2 sp zero2 gpt2": ("gpt2", {"tp": 2, "sp": True, "zero": 2}),
    "dp2 tp2 sp zero3 llama": ("llama", {"tp": 2, "sp": True, "zero": 3}),
    "dp2 tp2 zero2 gpt2 resumed": ("gpt2", {"tp": 2, "zero": 2}, True),
    "dp2 pp2 zero1 llama resumed": ("llama", {"pp": 2, "zero": 1}, True),
    "tp2 pp2 sp gpt2_deep": ("gpt2_deep", {"tp": 2, "pp": 2, "sp": True}),
    "dp2 pp2 zero1 switch_deep": ("switch_deep", {"pp": 2, "zero": 1}),
    "ep2 pp2 zero1 switch_t5": ("switch_t5", {"pp": 2, "ep": 2, "zero": 1}),
    "dp2 pp2 interleaved t5": ("t5", {"pp": 2, "vpp": 2}),
    "tp2 pp2 sp t5": ("t5", {"tp": 2, "pp": 2, "sp": True}),
    "dp2 ep2 zero1 switch resumed": ("switch", {"ep": 2, "zero": 1}, True),
    "ep2 tp2 switch": ("switch", {"ep": 2, "tp": 2}),
    "ep2 tp2 sp zero1 switch": ("switch", {"ep": 2, "tp": 2, "sp": True, "zero": 1}),
    "ep2 tp2 sp switch_t5": ("switch_t5", {"ep": 2, "tp": 2, "sp": True}),
    "dp2 tp2 sp zero2 modernbert": ("modernbert", {"tp": 2, "sp": True, "zero": 2}),
    "dp2 pp2 zero1 bert resumed": ("bert", {"pp": 2, "zero": 1}, True),
    "ep2 tp2 sp moe": ("moe", {"ep": 2, "tp": 2, "sp": True}),
    "dp2 ep2 zero1 moe resumed": ("moe", {"ep": 2, "zero": 1}, True),  # the selection bias is engine state
    "ep2 pp2 moe": ("moe", {"ep": 2, "pp": 2}),
    "cp4 llama": ("llama", {"cp": 4}),
    "cp4 gpt2_docs": ("gpt2_docs", {"cp": 4}),
    "cp2 tp2 sp llama": ("llama", {"cp": 2, "tp": 2, "sp": True}),
    "cp2 tp2 sp llama_docs": ("llama_docs", {"cp": 2, "tp": 2, "sp": True}),
    "cp2 dp2 zero1 gpt2": ("gpt2", {"cp": 2, "zero": 1}),
    "cp2 dp2 zero1 gpt2_docs": ("gpt2_docs", {"cp": 2, "zero": 1}),
    "cp2 dp2 zero3 llama": ("llama", {"cp": 2, "zero": 3}),
    "cp2 dp2 zero3 llama_docs": ("llama_docs", {"cp": 2, "zero": 3}),
    "cp2 pp2 llama": ("llama", {"cp": 2, "pp": 2}),
    "cp2 pp2 llama_docs": ("llama_docs", {"cp": 2, "pp": 2}),  # each stage's mask from its micro-batch's documents
    "cp4 ring llama_docs": ("llama_docs", {"cp": 4, "cp_comm": "ring"}),  # masked tiles
    "cp4 ring llama": ("llama", {"cp": 4, "cp_comm": "ring"}),  # causal chunk pairs on SDPA's CPU flash kernel
    "cp2 tp2 sp ring gpt2": ("gpt2", {"cp": 2, "tp": 2, "sp": True, "cp_comm": "ring"}),
    "cp2 ep2 tp2 sp switch_docs": ("switch_docs", {"cp": 2, "ep": 2, "tp": 2, "sp": True}),  # SP, then CP gather
    "cp2 tp2 sp modernbert_packed": ("modernbert_packed", {"cp": 2, "tp": 2, "sp": True}),
    "cp2 dp2 zero1 modernbert_packed": ("modernbert_packed", {"cp": 2, "zero": 1}),
    "cp2 dp2 zero3 bert_nsp": ("bert_nsp", {"cp": 2, "zero": 3}),
    "cp2 pp2 bert_nsp": ("bert_nsp", {"cp": 2, "pp": 2}),  # the next-sentence head on the last stage
    "cp2 pp2 modernbert_packed": ("modernbert_packed", {"cp": 2, "pp": 2}),
    "cp4 ring modernbert_packed": ("modernbert_packed", {"cp": 4, "cp_comm": "ring"}),  # out-of-window tiles skipped
    "cp4 t5": ("t5", {"cp": 4}),
    "cp4 ring t5": ("t5", {"cp": 4, "cp_comm": "ring"}),
    "cp2 tp2 sp t5": ("t5", {"cp": 2, "tp": 2, "sp": True}),
    "cp2 dp2 zero1 t5": ("t5", {"cp": 2, "zero": 1}),
    "cp2 dp2 zero3 t5": ("t5", {"cp": 2, "zero": 3}),
    "cp2 pp2 t5": ("t5", {"cp": 2, "pp": 2}),
}

LAYOUTS_8 = {
    "dp2 tp2 pp2 sp zero1 gpt2_deep": ("gpt2_deep", {"tp": 2, "pp": 2, "sp": True, "zero": 1}),
}

@pytest.mark.parametrize("world,layouts", [(2, LAYOUTS_2), (4, LAYOUTS_4), (8, LAYOUTS_8)],
                         ids=["world2", "world4", "world8"])
def test_layouts_match_single_process(world, layouts, references):
    results = run_distributed("tests.test_parallel_parity:layouts_worker", world, {"layouts": layouts},
                              timeout=600)[0]
    assert_all_match(results, layouts, references)
