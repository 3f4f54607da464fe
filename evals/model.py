"""The small model interface the scorer needs, and its Hugging Face implementation.

The engine never touches a model directly: it needs token ids in, log-probabilities out for a window of
positions, a tokenizer, a prefix token for empty contexts and a context length. Anything providing
:class:`EvalModel` (an HF causal LM, our own checkpoints, a pipeline-parallel model) is scored the same way.

Tokenisation follows lm-evaluation-harness's ``hf`` backend so that numbers agree: ``encode`` uses the
tokenizer's default special tokens (unless the text already starts with the prefix token), the prefix token is
BOS, or EOS when there is no BOS, and the context length comes from the model config.
"""

from __future__ import annotations

from pathlib import Path

import torch

DEFAULT_MAX_LENGTH = 2048
MIN_HEAD_ROWS = 16


class EvalModel:
    """What the scoring engine needs from a model: tokenizer calls, ``logits`` and ``greedy_generate``;
    ``packed_logits`` only where ``supports_packing``. Encoder-decoder models
    (``is_encoder_decoder``) provide ``seq2seq_logits`` instead of ``logits`` and are scored by
    :mod:`pretrain.evals.seq2seq` (the context is the encoder input, the continuation the decoder's target)."""

    max_length: int          # tokens the model attends over (encoder-decoder: per encoder input and target)
    prefix_token_id: int     # conditions the first token of an empty context / rolling window
    eot_token_id: int        # end-of-text, stops generation
    device: torch.device = torch.device("cpu")
    supports_packing: bool = False
    is_encoder_decoder: bool = False
    decoder_start_token_id: int | None = None  # first decoder input of an encoder-decoder model

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def logits(self, input_ids: torch.Tensor, spans: list[tuple[int, int]]) -> list[torch.Tensor]:
        """For each row ``b`` of the causally masked, right-padded ``input_ids`` ``[batch, seq]``: logits
        ``[stop - start, vocab]`` of positions ``start..stop-1`` (``spans[b]``). Applying the output layer
        only to scored positions is part of the speed-up over full logits (see :func:`head_on_rows`)."""
        raise NotImplementedError

    def packed_logits(self, input_ids: torch.Tensor, position_ids: torch.Tensor, segment_ids: torch.Tensor,
                      positions: list[list[int]]) -> list[torch.Tensor]:
        """Several sequences that share a prefix, packed into one row: ``segment_ids`` is 0 on the shared
        prefix and ``k`` on the k-th sequence's own tokens (-1 on padding); a token attends causally to the
        prefix and to its own segment only, at ``position_ids``. Returns, per row ``b``, the logits of
        positions ``positions[b]`` (``[len, vocab]``). Only needed when ``supports_packing``; it runs a
        multiple-choice context once for all its choices, in the same single pass."""
        raise NotImplementedError

    def seq2seq_logits(self, encoder_ids: torch.Tensor, encoder_lens: list[int], decoder_ids: torch.Tensor,
                       owner: list[int], decoder_lens: list[int]) -> list[torch.Tensor]:
        """Encoder-decoder models: run each right-padded encoder input ``[g, we]`` (``encoder_lens[g]`` real
        tokens, padding masked) once, then each right-padded decoder input ``[r, wd]`` (starting with
        ``decoder_start_token_id``) on the output of encoder input ``owner[r]``. Returns the logits
        ``[decoder_lens[r], vocab]`` of every decoder row's real positions."""
        raise NotImplementedError

    def greedy_generate(self, ids: list[int], max_new_tokens: int, stop: list[str]) -> list[int]:
        """Greedy continuation of ``ids``; may stop early once the decoded text contains a stop string.
        Encoder-decoder models: ``ids`` is the encoder input, the result the decoder's tokens after the start."""
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_plain(self, text: str) -> list[int]:
        """Without any special tokens (a continuation scored after the prefix token)."""
        return self.encode(text)


class HFModel(EvalModel):
    """Any ``transformers`` causal LM plus its tokenizer."""

    auto_class = "AutoModelForCausalLM"

    def __init__(self, model, tokenizer, max_length: int | None = None, device: str | torch.device = "cpu"):
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.max_length = max_length or _config_max_length(model.config, tokenizer)
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.prefix_token_id = bos if bos is not None else eos
        self.eot_token_id = eos if eos is not None else self.prefix_token_id
        if self.prefix_token_id is None:
            raise ValueError("tokenizer has neither a BOS nor an EOS token; cannot condition empty contexts")
        self._prefix_str = tokenizer.decode(self.prefix_token_id)
        self._softcap = getattr(getattr(model.config, "text_config", None) or model.config,
                                "final_logit_softcapping", None)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, **kw) -> "HFModel":
        import transformers
        from transformers import AutoTokenizer

        if not Path(path, "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a Hugging Face model directory (no config.json)")
        model = getattr(transformers, cls.auto_class).from_pretrained(str(path), dtype=dtype)
        return cls(model, AutoTokenizer.from_pretrained(str(path)), **kw)

    def _special(self, text: str) -> dict:
        return {"add_special_tokens": False} if text.startswith(self._prefix_str) else {}

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, **self._special(text))

    def encode_plain(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        plain = [t for t in texts if not t.startswith(self._prefix_str)]
        if len(plain) != len(texts) or not getattr(self.tokenizer, "is_fast", False):
            return [self.encode(t) for t in texts]
        return self.tokenizer(texts)["input_ids"]  # one Rust call for the whole list

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def supports_packing(self) -> bool:
        return not self._softcap

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, spans: list[tuple[int, int]]) -> list[torch.Tensor]:
        if self._softcap:  # the head is not a plain linear layer: let the model apply it
            full = self.model(input_ids.to(self.device), use_cache=False).logits
            return [full[b, a:z] for b, (a, z) in enumerate(spans)]
        h = self.model.base_model(input_ids.to(self.device), use_cache=False).last_hidden_state
        return head_on_rows(self.model.get_output_embeddings(), h, spans)

    @torch.inference_mode()
    def packed_logits(self, input_ids, position_ids, segment_ids, positions):
        allowed = packed_mask(segment_ids.to(self.device))
        dtype = self.model.get_output_embeddings().weight.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=self.device).masked_fill(~allowed, torch.finfo(dtype).min)
        h = self.model.base_model(input_ids.to(self.device), attention_mask=mask, use_cache=False,
                                  position_ids=position_ids.to(self.device)).last_hidden_state
        return rows_logits(self.model.get_output_embeddings(), h, positions)

    @torch.inference_mode()
    def greedy_generate(self, ids: list[int], max_new_tokens: int, stop: list[str]) -> list[int]:
        from transformers import DynamicCache

        cache, new = DynamicCache(), []
        step = torch.tensor([ids], device=self.device)
        for _ in range(max_new_tokens):
            out = self.model(step, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = int(out.logits[0, -1].argmax())
            new.append(token)
            if token == self.eot_token_id or (stop and any(s in self.decode(new) for s in stop)):
                break
            step = torch.tensor([[token]], device=self.device)
        return new


class HFSeq2SeqModel(HFModel):
    """A ``transformers`` encoder-decoder LM (T5, Switch Transformers) plus its tokenizer, scored by
    :mod:`pretrain.evals.seq2seq`; generation decodes on the model's KV cache, the encoder runs once."""

    auto_class = "AutoModelForSeq2SeqLM"
    is_encoder_decoder = True
    supports_packing = False

    def __init__(self, model, tokenizer, max_length: int | None = None, device: str | torch.device = "cpu"):
        super().__init__(model, tokenizer, max_length, device)
        self.decoder_start_token_id = model.config.decoder_start_token_id

    @torch.inference_mode()
    def seq2seq_logits(self, encoder_ids, encoder_lens, decoder_ids, owner, decoder_lens):
        mask = (torch.arange(encoder_ids.shape[1])[None] < torch.tensor(encoder_lens)[:, None]).long().to(self.device)
        enc = self.model.get_encoder()(input_ids=encoder_ids.to(self.device), attention_mask=mask)
        rows = torch.tensor(owner, device=self.device)
        enc["last_hidden_state"] = enc.last_hidden_state[rows]  # keeps the model's own output type (Switch's)
        logits = self.model(encoder_outputs=enc, attention_mask=mask[rows], use_cache=False,
                            decoder_input_ids=decoder_ids.to(self.device)).logits
        return [logits[r, :n] for r, n in enumerate(decoder_lens)]

    @torch.inference_mode()
    def greedy_generate(self, ids: list[int], max_new_tokens: int, stop: list[str]) -> list[int]:
        enc = self.model.get_encoder()(input_ids=torch.tensor([ids], device=self.device))
        step, cache, new = torch.tensor([[self.decoder_start_token_id]], device=self.device), None, []
        for _ in range(max_new_tokens):
            out = self.model(encoder_outputs=enc, decoder_input_ids=step, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, int(out.logits[0, -1].argmax())
            new.append(token)
            if token == self.eot_token_id or (stop and any(s in self.decode(new) for s in stop)):
                break
            step = torch.tensor([[token]], device=self.device)
        return new


def packed_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """``[batch, 1, seq, seq]`` True where a packed token may attend (see :meth:`EvalModel.packed_logits`)."""
    width = segment_ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segment_ids.device).tril()
    seg = segment_ids
    return (causal & ((seg[:, :, None] == seg[:, None, :]) | (seg[:, None, :] == 0)))[:, None]


def rows_logits(head, h: torch.Tensor, positions: list[list[int]]) -> list[torch.Tensor]:
    """``head`` on positions ``positions[b]`` of each row of ``h`` (one matmul, see :func:`head_on_rows`)."""
    rows = torch.cat([h[b, idx] for b, idx in enumerate(positions)])
    return list(head_on_rows(head, rows[None], [(0, len(rows))])[0].split([len(idx) for idx in positions]))


def head_on_rows(head, h: torch.Tensor, spans: list[tuple[int, int]]) -> list[torch.Tensor]:
    """``head`` applied to positions ``spans[b]`` of each row of ``h`` ``[batch, seq, dim]`` in one matmul
    (reading the vocab-sized weight once per batch). CPU GEMM kernels take other paths for small inputs (seen
    below 16 rows with 2 threads: the last bits of a row's logits changed with the row count), so tiny inputs
    are padded with zero rows to ``MIN_HEAD_ROWS``: each row's logits then do not depend on how many other rows
    are in the call."""
    parts = [h[b, a:z] for b, (a, z) in enumerate(spans)]
    x = torch.cat(parts)
    n = x.shape[0]
    if n < MIN_HEAD_ROWS:
        x = torch.cat([x, x.new_zeros(MIN_HEAD_ROWS - n, x.shape[1])])
    return list(head(x)[:n].split([len(p) for p in parts]))


def _config_max_length(config, tokenizer) -> int:
    """Same sources and order as lm-eval's ``resolve_max_length``."""
    cfg = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(cfg, attr, None) is not None:
            return int(getattr(cfg, attr))
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit and limit < 10**9 else DEFAULT_MAX_LENGTH
