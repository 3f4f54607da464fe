"""The contract of a model family: one :class:`ModelSpec` per family, defined in the family's own folder
(``pretrain/models/<family>/__init__.py``) and registered in :mod:`pretrain.models.registry`.

Everything outside the family's folder asks the spec, never the family's name: the config and model classes,
the kind of batches :mod:`pretrain.data` builds for it, how it is parallelised (the sizes tensor parallelism
splits, the blocks a pipeline splits, activation checkpointing, how a pipeline stage is cut), its FLOPs, its
Hugging Face mapping and how evaluation scores it. docs/design.md, "Adding a model family", walks through it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

Batch = dict[str, torch.Tensor]


def _no_extra(cfg: Any) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class HFSpec:
    """The family's Hugging Face mapping (``pretrain export`` / ``pretrain import``).

    ``classes`` maps each architecture to its ``transformers`` config class name; ``architecture(cfg)`` picks
    the export architecture (raising ``UnsupportedConfig`` naming the field when there is none);
    ``to_config(cfg, arch, special_ids)`` gives the HF config kwargs; ``from_config[arch](hf_config)`` gives our
    config values (the importable architectures); ``rules(cfg, arch)`` gives the weight table and its tied
    aliases (:mod:`pretrain.hf.mapping`); ``generation(cfg)`` adds fields to ``generation_config.json``;
    ``tokenizer_tokens`` adds special tokens to the exported ``tokenizer_config.json``.
    """

    classes: dict[str, str]
    architecture: Callable[[Any], str]
    to_config: Callable[[Any, str, dict], dict[str, Any]]
    from_config: dict[str, Callable[[Any], dict[str, Any]]]
    rules: Callable[[Any, str], tuple[list, dict[str, str]]]
    generation: Callable[[Any], dict[str, Any]] = _no_extra
    # (training config dict, tokenizer_config.json dict) -> entries to add to it (an encoder's mask/cls/sep)
    tokenizer_tokens: Callable[[dict, dict], dict[str, str]] = lambda config, tok: {}


@dataclass(frozen=True)
class ModelSpec:
    """One model family. The config dataclass has ``validate()``, ``vocab_size`` and ``moe`` (a
    :class:`~pretrain.models.moe.MoEConfig`, disabled when the family has no Switch layers). The model class
    takes ``(cfg, factory)`` (a :class:`LayerFactory`, kept as ``model.factory``), returns a
    :class:`pretrain.models.output.ModelOutput` from ``model(**batch)`` and, for pipelines, has
    ``stage_forward(*inputs, first, last) -> (outputs, switch aux losses)``."""

    name: str  # the value of model.family
    config: type  # the config dataclass (the YAML model section); its validate() names model.<key>
    model: Callable[..., nn.Module]  # model(cfg, factory)
    dataset: str  # the batches pretrain.data builds: "gpt" (input_ids, labels) or "t5" (+ decoder inputs)
    tp_sizes: Callable[[Any], dict[str, int]]  # config key -> size tensor parallelism splits (must divide tp)
    pipeline_blocks: Callable[[Any], int]  # number of blocks a pipeline splits into stages
    parallelize: Callable[[nn.Module], None]  # applied after building: activation checkpointing
    pipeline_stage: Callable[[nn.Module, range, bool, bool], nn.Module]  # (model, blocks, first, last) -> cut
    stage_inputs: Callable[[Batch], tuple[torch.Tensor, ...]]  # the first stage's inputs from a batch
    batch_flops: Callable[[Any, Batch], float]  # model FLOPs of one training step on a batch (fwd + bwd)
    param_count: Callable[[Any, bool], int]  # (cfg, active): parameters; active = those one token uses (MoE)
    sequence_keys: tuple[str, ...] = ("data.seq_length",)  # lengths sequence parallelism splits
    eval_kind: str | None = None  # how pretrain.evals scores it: "causal", "seq2seq" or None (no evals)
    pipeline_eval: bool = False  # pretrain.evals can score it split over pipeline stages
    hf: HFSpec | None = None  # no Hugging Face export/import without it
