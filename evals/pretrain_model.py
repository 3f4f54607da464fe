"""Our own GPT models (live during training, or loaded from a checkpoint) behind :class:`EvalModel`.

Tokens are encoded without special tokens, as in training, and the prefix token is BOS (EOS when the
tokenizer has none): the same convention lm-eval's ``hf`` backend applies to the exported HF model, whose
tokenizer adds no BOS either, so both give the same numbers. An imported HF model keeps its own BOS/EOS ids
(recorded at import: SmolLM2's BOS is ``<|im_start|>``, which no spelling-based guess would find).
Logits come from ``model.hidden`` + ``model.head`` on the scored positions only; under tensor parallelism
``gather_logits`` assembles the full vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import torch

from evals.model import EvalModel, head_on_rows


class PretrainModel(EvalModel):
    def __init__(self, model: torch.nn.Module, tokenizer, max_length: int | None = None,
                 bos_id: int | None = None, eos_id: int | None = None):
        if not hasattr(model, "hidden") or not hasattr(model, "head"):
            raise TypeError(f"{type(model).__name__} is not a decoder-only model (needs hidden() and head); "
                            "encoder-decoder models are not supported by the scoring engine yet")
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self.max_length = max_length or model.cfg.max_seq_len
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

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, spans: list[tuple[int, int]]) -> list[torch.Tensor]:
        was_training = self.model.training
        self.model.eval()
        h, _ = self.model.hidden(input_ids.to(self.device))
        out = [self.model.layers.gather_logits(x) for x in head_on_rows(self.model.head, h, spans)]
        self.model.train(was_training)
        return out

    @torch.inference_mode()
    def greedy_generate(self, ids: list[int], max_new_tokens: int, stop: list[str]) -> list[int]:
        was_training = self.model.training
        self.model.eval()
        cache = self.model.new_cache(1, len(ids) + max_new_tokens)
        step, new = torch.tensor([ids], device=self.device), []
        for _ in range(max_new_tokens):
            token = int(self.model.logits(step, cache=cache)[0, -1].argmax())
            new.append(token)
            if token == self.eot_token_id or (stop and any(s in self.decode(new) for s in stop)):
                break
            step = torch.tensor([[token]], device=self.device)
        self.model.train(was_training)
        return new


def load_checkpoint_model(path: str | Path, tokenizer: str | Path | None = None,
                          device: str = "cpu", max_length: int | None = None) -> PretrainModel:
    """A checkpoint (``DIR/step_N`` or a root with ``latest``, saved under any layout) as an EvalModel.
    The tokenizer defaults to the one the training config names (``data.tokenizer``); BOS/EOS ids recorded by
    ``pretrain import`` (``hf_token_ids``) override the tokenizer's guesses."""
    from data.tokenizer import load_tokenizer
    from pretrain.hf.export import load_model_state
    from pretrain.models import build_model

    state, meta, step_dir = load_model_state(path)
    model_cfg = dict(meta["config"]["model"])
    model = build_model(model_cfg.pop("family"), model_cfg)
    model.load_state_dict(state)
    tok_path = tokenizer or meta["config"].get("data", {}).get("tokenizer")
    if not tok_path:
        raise ValueError(f"{step_dir}: the training config names no data.tokenizer; pass --tokenizer")
    hf_ids = meta.get("hf_token_ids") or {}
    return PretrainModel(model.to(device).eval(), load_tokenizer(tok_path), max_length,
                         hf_ids.get("bos_token_id"), hf_ids.get("eos_token_id"))
