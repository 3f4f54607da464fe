"""Generic config machinery: plain dicts (YAML, ``key=value`` overrides) -> typed, checked dataclasses.

A leaf module (it imports nothing of this project), shared by the training config (:mod:`pretrain.config`),
the model families' configs and the Hugging Face mappings:

* :func:`load_yaml` reads YAML 1.1 with ``1e-5`` as a float; :func:`parse_overrides` turns
  ``["train.steps=10"]`` into a nested dict; :func:`merge` lays one nested dict over another;
* :func:`dataclass_from_dict` builds a dataclass from a dict, checking every key (unknown keys get a
  "did you mean") and every value's type; nothing is silently ignored;
* :func:`describe_keys` lists a dataclass's keys with type, default and the one-line doc written next to
  each field (the trailing ``# comment``, or the comment lines just above the field);
* :class:`ConfigError` is the one error type; its message names the key and says how to fix it.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import io
import re
import textwrap
import tokenize
import typing
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type or an invalid value; the message names the key."""


def need(ok: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``ok``."""
    if not ok:
        raise ConfigError(message)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, except that ``1e-5`` and ``3E+4`` are floats (PyYAML wants ``1.0e-5``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def suggest(key: str, options) -> str:
    """``"; did you mean 'steps'?"`` for a near miss, else the list of valid keys."""
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(options))}"


def plain(x: Any) -> Any:
    """Tuples -> lists, recursively (the YAML form of ``dataclasses.asdict``)."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


def dataclass_from_dict(cls: type, values: dict, where: str) -> Any:
    """Instantiate dataclass ``cls`` from plain ``values`` (a YAML section), checking names and types and
    recursing into nested dataclass fields; nothing is silently ignored."""
    if isinstance(values, cls):
        return values
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown key '{where}.{key}'{suggest(key, fields)}")
        hint = hints[key]
        name = f"{where}.{key}"
        kwargs[key] = (dataclass_from_dict(hint, value, name) if dataclasses.is_dataclass(hint)
                       else _coerce(value, hint, name))
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a type hint (int/float/bool/str/list/tuple, optionally ``| None``)."""
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args or hint is Any:
            return None
        raise ConfigError(f"{key} must not be null")
    if type(None) in args:
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint) or hint
    if hint is Any:
        return value
    if origin is bool:
        if isinstance(value, bool):
            return value
    elif origin is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # 1e6 in YAML
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"[-+]?[0-9_]+(\.0*)?([eE]\+?[0-9]+)?", value.strip()):
            return int(float(value))  # "1e6" read as a string by another YAML reader
    elif origin is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # plain PyYAML (YAML 1.1) reads 3e-4 as a string
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{key} must be a number (float), got {value!r}") from None
    elif origin is str:
        if isinstance(value, str):
            return value
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            return origin(value)
        if isinstance(value, str):  # `train.eval_tasks=a,b` on the command line
            return origin(v.strip() for v in value.split(",") if v.strip())
    else:
        return value
    raise ConfigError(f"{key} must be {getattr(origin, '__name__', origin)}, got {value!r} "
                      f"({type(value).__name__})")


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.steps=10", "optimizer.betas=[0.9,0.99]"]`` -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.steps=1000)")
        node = out
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}")
        node[leaf] = load_yaml(value) if value != "" else None
    return out


def merge(base: dict, update: dict) -> dict:
    """``update`` laid over ``base``; nested dicts are merged key by key, anything else replaced."""
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    """One config key as ``pretrain config keys`` lists it."""

    key: str  # dotted, e.g. "train.steps"
    type: str
    default: str
    doc: str


def describe_keys(cls: type, prefix: str) -> list[KeyDoc]:
    """Every field of dataclass ``cls`` (nested dataclasses flattened into ``prefix.field.sub``) with its
    type, default and doc comment."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            out += describe_keys(hints[f.name], key)
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        out.append(KeyDoc(key, type_name, repr(plain(default)), docs.get(f.name, "")))
    return out


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """``{field: doc}`` from the comments written next to the fields in ``cls``'s source: the trailing
    ``# comment`` of the field's line, else the ``#`` lines right above it (parsed once per class)."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    code_lines = {i + 1 for i, line in enumerate(source.splitlines()) if not line.lstrip().startswith("#")}
    docs = {}
    for node in ast.parse(source).body[0].body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        line = node.lineno
        if line in comments:
            docs[node.target.id] = comments[line]
            continue
        above = []
        while line - 1 in comments and line - 1 not in code_lines:
            line -= 1
            above.insert(0, comments[line])
        docs[node.target.id] = " ".join(above)
    return docs
