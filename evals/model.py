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


class EvalModel:
    """What the scoring engine needs from a model. Subclasses implement the four methods below."""

    max_length: int          # tokens the model attends over
    prefix_token_id: int     # conditions the first token of an empty context / rolling window
    eot_token_id: int        # end-of-text, stops generation
    device: torch.device = torch.device("cpu")

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def logits(self, input_ids: torch.Tensor, starts: list[int]) -> list[torch.Tensor]:
        """For each row ``b`` of the causally masked, right-padded ``input_ids`` ``[batch, seq]``: logits
        ``[seq - starts[b], vocab]`` of positions ``starts[b]..seq-1``. Applying the output layer only to
        scored positions is a large share of the speed-up over full logits; applying it row by row keeps each
        row's numbers independent of the other rows in the batch."""
        raise NotImplementedError

    def greedy_generate(self, ids: list[int], max_new_tokens: int, stop: list[str]) -> list[int]:
        """Greedy continuation of ``ids``; may stop early once the decoded text contains a stop string."""
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]


class HFModel(EvalModel):
    """Any ``transformers`` causal LM plus its tokenizer."""

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
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not Path(path, "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a Hugging Face model directory (no config.json)")
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        return cls(model, AutoTokenizer.from_pretrained(str(path)), **kw)

    def _special(self, text: str) -> dict:
        return {"add_special_tokens": False} if text.startswith(self._prefix_str) else {}

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, **self._special(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        plain = [t for t in texts if not t.startswith(self._prefix_str)]
        if len(plain) != len(texts) or not getattr(self.tokenizer, "is_fast", False):
            return [self.encode(t) for t in texts]
        return self.tokenizer(texts)["input_ids"]  # one Rust call for the whole list

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, starts: list[int]) -> list[torch.Tensor]:
        if self._softcap:  # the head is not a plain linear layer: let the model apply it
            full = self.model(input_ids.to(self.device), use_cache=False).logits
            return [full[b, s:] for b, s in enumerate(starts)]
        h = self.model.base_model(input_ids.to(self.device), use_cache=False).last_hidden_state
        head = self.model.get_output_embeddings()
        return [head(h[b, s:]) for b, s in enumerate(starts)]

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


def _config_max_length(config, tokenizer) -> int:
    """Same sources and order as lm-eval's ``resolve_max_length``."""
    cfg = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(cfg, attr, None) is not None:
            return int(getattr(cfg, attr))
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit and limit < 10**9 else DEFAULT_MAX_LENGTH


def load_model(checkpoint: str | None = None, hf: str | None = None, tokenizer: str | None = None,
               device: str = "cpu", max_length: int | None = None) -> EvalModel:
    """Exactly one of ``checkpoint`` (ours) or ``hf`` (a Hugging Face model directory)."""
    if bool(checkpoint) == bool(hf):
        raise ValueError("give exactly one of checkpoint=... or hf=...")
    if hf:
        return HFModel.from_pretrained(hf, device=device, max_length=max_length)
    from evals.pretrain_model import load_checkpoint_model

    return load_checkpoint_model(checkpoint, tokenizer, device=device, max_length=max_length)
