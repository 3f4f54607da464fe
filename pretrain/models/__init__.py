"""Model families: one folder per family (``gpt``, ``t5``), each defining its :class:`ModelSpec`
(:mod:`pretrain.models.spec`), registered in :mod:`pretrain.models.registry`; mixture of experts (Switch, top-k,
shared experts, dropless) is a config option of both. Shared pieces: :mod:`~pretrain.models.layers` (the layer
factory), :mod:`~pretrain.models.attention`, :mod:`~pretrain.models.mlp`, :mod:`~pretrain.models.moe` (with
:mod:`~pretrain.models.router` and :mod:`~pretrain.models.dropless`), :mod:`~pretrain.models.output`.

``build_model(family, cfg, factory)`` is the only entry point the trainer needs; family packages are imported
when first used, so ``import pretrain.models`` stays cheap.
"""

from pretrain.models.output import ModelOutput, lm_output
from pretrain.models.registry import build_model, config_class, family_spec, model_config

__all__ = ["ModelOutput", "build_model", "config_class", "family_spec", "lm_output", "model_config"]
