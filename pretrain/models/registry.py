"""The one place model families are registered, and the one "dict -> validated model config".

:data:`FAMILIES` maps each ``model.family`` name to the module that defines its :class:`ModelSpec` as
``SPEC`` (``pretrain/models/<family>/spec.py``); that module is imported when the family is first asked for.
Adding a family is one folder and one line here (docs/design.md, "Adding a model family"); :func:`register`
adds one at run time (tests, plugins). Callers ask :func:`family_spec`, never compare family names.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch.nn as nn

from pretrain.configlib import ConfigError, dataclass_from_dict
from pretrain.models.layers import LayerFactory
from pretrain.models.spec import ModelSpec

FAMILIES: dict[str, str] = {
    "gpt": "pretrain.models.gpt.spec",
    "t5": "pretrain.models.t5.spec",
    "encoder": "pretrain.models.encoder.spec",
}
_SPECS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> None:
    """Register ``spec`` under ``spec.name`` (replacing a family of that name)."""
    _SPECS[spec.name] = spec


def family_names() -> list[str]:
    return sorted({*FAMILIES, *_SPECS})


def family_spec(family: str) -> ModelSpec:
    """The spec of ``family``; a clear error naming ``model.family`` and the registered families otherwise."""
    if family not in _SPECS:
        if family not in FAMILIES:
            raise ConfigError(f"unknown model family {family!r}; set model.family to one of "
                              f"{', '.join(family_names())}")
        register(importlib.import_module(FAMILIES[family]).SPEC)
    return _SPECS[family]


def spec_for_config(cfg: Any) -> ModelSpec:
    """The spec whose config class ``cfg`` is (for code that holds a model rather than a family name)."""
    for name in family_names():
        if type(cfg) is family_spec(name).config:
            return family_spec(name)
    raise TypeError(f"{type(cfg).__name__} is the config of no registered model family ({family_names()})")


def config_class(family: str) -> type:
    """The config dataclass of ``family``."""
    return family_spec(family).config


def model_config(family: str, values: dict | Any) -> Any:
    """The validated config dataclass of ``family`` from ``values``: the YAML ``model`` section (a dict, its
    ``family`` key allowed) or the family's dataclass. Errors are :class:`ConfigError` naming ``model.<key>``."""
    spec = family_spec(family)
    if isinstance(values, dict):
        values = dict(values)
        named = values.pop("family", family)
        if named != family:
            raise ConfigError(f"model.family={named!r} contradicts the requested family {family!r}")
        values = dataclass_from_dict(spec.config, values, "model")
    elif not isinstance(values, spec.config):
        raise TypeError(f"model config for family {family!r} must be a dict or {spec.config.__name__}, "
                        f"got {type(values).__name__}")
    try:
        values.validate()
    except ValueError as e:
        raise ConfigError(str(e) if "model" in str(e) else f"model: {e}") from None
    return values


def build_model(family: str, cfg: dict | Any, factory: LayerFactory | None = None) -> nn.Module:
    """Validate ``cfg`` (see :func:`model_config`), build the model from ``factory`` (default: single-process
    torch layers; ``pretrain.parallel`` passes its own) and apply the family's ``parallelize`` step."""
    spec = family_spec(family)
    model = spec.model(model_config(family, cfg), factory)
    spec.parallelize(model)
    return model
