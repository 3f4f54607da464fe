"""Our own models (GPT and T5 / Switch-T5, live during training or loaded from a checkpoint) behind
:class:`EvalModel`.

Tokens are encoded without special tokens, as in training, and the prefix token is BOS (EOS when the
tokenizer has none): the same convention lm-eval's ``hf`` backend applies to the exported HF model, whose
tokenizer adds no BOS either, so both give the same numbers. An imported HF model keeps its own BOS/EOS ids
(recorded at import: SmolLM2's BOS is ``<|im_start|>``, which no spelling-based guess would find).
Logits come from ``model.hidden`` + ``model.head`` on the scored positions only; under tensor parallelism
``gather_logits`` assembles the full vocabulary.

The family's spec says how a model is scored (``eval_kind``): "causal" as above, or "seq2seq": a T5
(``encode``/``decode``) is an encoder-decoder model for :mod:`pretrain.evals.seq2seq`: the encoder runs once per
distinct context, the decoder on the continuations; generation recomputes the decoder per step (our T5 has
no KV cache; the encoder output is reused). T5's relative positions have no length limit, so ``max_length``
defaults to lm-eval's 2048, what lm-eval resolves for the exported model (no ``n_positions``). Switch layers
score *dropless* (capacity = all tokens, as the exported HF model's capacity bound): a token's score then does
not depend on the other tokens of its batch, padding included.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from pretrain.evals.model import DEFAULT_MAX_LENGTH, EvalModel, head_on_rows, packed_mask, rows_logits
from pretrain.models.registry import spec_for_config


class PretrainModel(EvalModel):
    def __init__(self, model: torch.nn.Module, tokenizer, max_length: int | None = None,
                 bos_id: int | None = None, eos_id: int | None = None):
        kind = spec_for_config(model.cfg).eval_kind
        if kind not in ("causal", "seq2seq"):
            raise TypeError(f"{type(model).__name__}: its family's spec names no evaluation kind this scorer "
                            "knows (eval_kind must be 'causal' or 'seq2seq')")
        self.is_encoder_decoder = kind == "seq2seq"
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        # sequence parallelism splits every width over the tensor ranks: widths are padded to a multiple
        self.seq_multiple = model.factory.sequence_shards
        limit = max_length or getattr(model.cfg, "max_seq_len", None) or DEFAULT_MAX_LENGTH
        self.max_length = limit - limit % self.seq_multiple
        if self.is_encoder_decoder:
            self.decoder_start_token_id = model.cfg.decoder_start_token_id
        bos = bos_id if bos_id is not None else tokenizer.bos_id
        eos = eos_id if eos_id is not None else tokenizer.eos_id
        self.prefix_token_id = bos if bos is not None else eos
        self.eot_token_id = eos if eos is not None else self.prefix_token_id
        if self.prefix_token_id is None:
            raise ValueError(f"{tokenizer}: no BOS or EOS token to condition empty contexts on")

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [a.tolist() for a in self.tokenizer.encode_batch(texts)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i not in (self.prefix_token_id, self.eot_token_id)])

    @contextmanager
    def _scoring(self) -> Iterator[None]:
        """Eval mode, Switch layers dropless; the model's previous mode and capacity are restored after."""
        was_training, moe = self.model.training, self.model.cfg.moe
        factor = moe.capacity_factor_eval
        self.model.eval()
        if moe.enabled:
            moe.capacity_factor_eval = float(moe.num_experts)  # capacity = every token of the batch
        try:
            yield
        finally:
            moe.capacity_factor_eval = factor
            self.model.train(was_training)

    def _pad(self, x: torch.Tensor, value: int) -> torch.Tensor:
        """``[batch, width]`` right-padded to a multiple of ``seq_multiple`` (a no-op without sequence
        parallelism); causal attention and masked keys keep the padding out of the real positions."""
        return F.pad(x, (0, -x.shape[1] % self.seq_multiple), value=value).to(self.device)

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, spans: list[tuple[int, int]]) -> list[torch.Tensor]:
        with self._scoring():
            h, _ = self.model.hidden(self._pad(input_ids, self.prefix_token_id))
            return [self.model.factory.gather_logits(x) for x in head_on_rows(self.model.head, h, spans)]

    @property
    def supports_packing(self) -> bool:
        return not self.is_encoder_decoder

    @torch.inference_mode()
    def packed_logits(self, input_ids, position_ids, segment_ids, positions):
        with self._scoring():
            h, _ = self.model.hidden(self._pad(input_ids, self.prefix_token_id), self._pad(position_ids, 0),
                                     mask=packed_mask(self._pad(segment_ids, -1)))
            return [self.model.factory.gather_logits(x) for x in rows_logits(self.model.head, h, positions)]

    @torch.inference_mode()
    def seq2seq_logits(self, encoder_ids, encoder_lens, decoder_ids, owner, decoder_lens):
        with self._scoring():
            encoder_ids = self._pad(encoder_ids, self.decoder_start_token_id)
            lens = torch.tensor(encoder_lens, device=self.device)
            mask = torch.arange(encoder_ids.shape[1], device=self.device)[None] < lens[:, None]
            enc = self.model.encode(encoder_ids, mask)
            rows = torch.tensor(owner, device=self.device)
            h = self.model.decode(self._pad(decoder_ids, self.decoder_start_token_id), enc[rows], mask[rows])
            spans = [(0, n) for n in decoder_lens]
            return [self.model.factory.gather_logits(x) for x in head_on_rows(self.model.head, h, spans)]

    @torch.inference_mode()
    def greedy_generate(self, ids: list[int], max_new_tokens: int, stop: list[str]) -> list[int]:
        new: list[int] = []
        with self._scoring():
            for token in itertools.islice(self._steps(ids, max_new_tokens), max_new_tokens):
                new.append(token)
                if token == self.eot_token_id or (stop and any(s in self.decode(new) for s in stop)):
                    break
        return new

    def _steps(self, ids: list[int], max_new_tokens: int) -> Iterator[int]:
        """Greedy tokens after ``ids``; one-token KV-cache steps cannot be split over sequence-parallel ranks."""
        if self.is_encoder_decoder:
            return self._decoder_steps(ids)
        return self._cached_steps(ids, max_new_tokens) if self.seq_multiple == 1 else self._recomputed_steps(ids)

    def _recomputed_steps(self, ids: list[int]) -> Iterator[int]:
        """GPT without a KV cache: each token from the whole (left-truncated) sequence."""
        seq = list(ids)
        while True:
            window = seq[-self.max_length:]
            token = int(self.logits(torch.tensor([window]), [(len(window) - 1, len(window))])[0][-1].argmax())
            yield token
            seq.append(token)

    def _cached_steps(self, ids: list[int], max_new_tokens: int) -> Iterator[int]:
        """GPT: greedy tokens, each step running only the newest token on the KV cache."""
        cache = self.model.new_cache(1, len(ids) + max_new_tokens)
        step = torch.tensor([ids], device=self.device)
        while True:
            token = int(self.model.logits(step, cache=cache)[0, -1].argmax())
            yield token
            step = torch.tensor([[token]], device=self.device)

    def _decoder_steps(self, ids: list[int]) -> Iterator[int]:
        """T5: greedy decoder tokens after the start token; the encoder runs once."""
        start = self.decoder_start_token_id
        enc_ids = self._pad(torch.tensor([ids]), start)
        padded = enc_ids.shape[1] > len(ids)
        mask = torch.arange(enc_ids.shape[1], device=self.device)[None] < len(ids) if padded else None
        enc = self.model.encode(enc_ids, mask)
        out = [start]
        while True:
            h = self.model.decode(self._pad(torch.tensor([out]), start), enc, mask)[:, len(out) - 1:len(out)]
            token = int(self.model.factory.gather_logits(self.model.head(h))[0, -1].argmax())
            yield token
            out.append(token)


def load_checkpoint_model(path: str | Path, tokenizer: str | Path | None = None,
                          device: str = "cpu", max_length: int | None = None) -> PretrainModel:
    """A checkpoint (``DIR/step_N`` or a root with ``latest``, saved under any layout) as an EvalModel.
    The tokenizer defaults to the one the training config names (``data.tokenizer``); BOS/EOS ids recorded by
    ``pretrain import`` (``hf_token_ids``) override the tokenizer's guesses."""
    from pretrain.hf.export import load_model_state, model_config
    from pretrain.models import build_model

    state, meta, step_dir = load_model_state(path)
    model = build_model(*model_config(meta, step_dir))
    model.load_state_dict(state)
    tok, bos, eos = checkpoint_tokenizer(meta, step_dir, tokenizer)
    return PretrainModel(model.to(device).eval(), tok, max_length, bos, eos)


def checkpoint_tokenizer(meta: dict, step_dir: Path, tokenizer: str | Path | None = None) -> tuple:
    """``(tokenizer, BOS id or None, EOS id or None)`` for a checkpoint: ``tokenizer``, else the training
    config's ``data.tokenizer``; ids recorded by ``pretrain import`` override the tokenizer's guesses."""
    from pretrain.data.tokenizer import load_tokenizer

    tok_path = tokenizer or meta["config"].get("data", {}).get("tokenizer")
    if not tok_path:
        raise ValueError(f"{step_dir}: the training config names no data.tokenizer; pass --tokenizer")
    hf_ids = meta.get("hf_token_ids") or {}
    return load_tokenizer(tok_path), hf_ids.get("bos_token_id"), hf_ids.get("eos_token_id")
