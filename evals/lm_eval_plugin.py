"""Our scoring engine as an lm-evaluation-harness model named ``pretrain``, so every lm-eval task runs on our
checkpoints (and on any HF directory through our engine).

lm-eval 0.4.13 finds models only in its registry (no entry-point discovery). After ``python -m
evals.lm_eval_plugin install`` (the Makefile runs it; see :mod:`pretrain.evals.lm_eval_hook`) the plain command works::

    lm_eval --model pretrain --model_args checkpoint=CKPT_DIR --tasks hellaswag
    lm_eval --model pretrain --model_args hf=HF_DIR --batch_size 32 --tasks ...

Without it, ``lm-eval-pretrain`` (or ``python -m pretrain.evals.lm_eval_plugin``) is lm-eval's command with the model
registered, and from Python ``import evals.lm_eval_plugin`` before ``lm_eval.simple_evaluate(model="pretrain")``.
``model_args``: ``checkpoint`` or ``hf``, optional ``tokenizer``, ``max_length``, ``device``.
"""

from __future__ import annotations

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from pretrain.evals.seq2seq import make_scorer
from pretrain.evals.loading import load_model
from pretrain.evals.model import EvalModel


class PretrainLM(LM):
    def __init__(self, checkpoint: str | None = None, hf: str | None = None, tokenizer: str | None = None,
                 max_length: int | None = None, device: str | None = None, batch_size: int | str | None = 16,
                 model: EvalModel | None = None, **_ignored):
        super().__init__()
        if not device or (device.startswith("cuda") and not torch.cuda.is_available()):
            device = "cpu"  # lm-eval's CLI passes device="cuda" unless told otherwise
        self.eval_model = model or load_model(checkpoint, hf, tokenizer, device,
                                              int(max_length) if max_length else None)
        bs = int(batch_size) if str(batch_size or "").isdigit() else 16  # "auto" -> default
        self.engine = make_scorer(self.eval_model, batch_size=bs)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self.engine.progress = not disable_tqdm
        return self.engine.loglikelihood([r.args for r in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        self.engine.progress = not disable_tqdm
        return [ll for ll, _ in self.engine.loglikelihood_rolling([r.args[0] for r in requests])]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        self.engine.progress = not disable_tqdm
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            kw = r.args[1] or {}
            until = kw.get("until") or []
            groups.setdefault((tuple([until] if isinstance(until, str) else until),
                               int(kw.get("max_gen_toks", 256))), []).append(i)
        for (until, max_gen), idx in groups.items():
            texts = self.engine.generate_until([requests[i].args[0] for i in idx], list(until), max_gen)
            for i, text in zip(idx, texts):
                out[i] = text
        return out  # type: ignore[return-value]


def main() -> None:
    """lm-eval's command line with ``pretrain`` registered (the ``lm-eval-pretrain`` console script), plus
    ``install`` / ``uninstall`` of the hook that registers it for the plain ``lm_eval`` command."""
    import sys

    from pretrain.evals import lm_eval_hook

    if sys.argv[1:] == ["install"]:
        print(f"wrote {lm_eval_hook.write_pth()}: `lm_eval --model {lm_eval_hook.NAME}` now finds our model")
        return
    if sys.argv[1:] == ["uninstall"]:
        print(f"removed {lm_eval_hook.remove_pth()}")
        return
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":  # `python -m pretrain.evals.lm_eval_plugin ...`: register the importable class, not this copy
    import pretrain.evals.lm_eval_plugin as plugin

    plugin.main()
else:
    register_model("pretrain")(PretrainLM)
