"""``pretrain config keys [SECTION]``: every config key with its type, default and one-line doc.

Generated from the config dataclasses (:mod:`pretrain.config` and each model family's config class): the doc
is the comment written next to the field, so this listing cannot drift from the code.
"""

from __future__ import annotations

import argparse

from pretrain.config import SECTIONS
from pretrain.configlib import ConfigError, KeyDoc, describe_keys, suggest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    keys = sub.add_parser("keys", help="list the config keys with type, default and doc")
    keys.add_argument("section", nargs="?", help=f"one of: model, {', '.join(SECTIONS)} (default: all)")


def section_keys(section: str) -> list[KeyDoc]:
    """The keys of ``section``; ``model`` lists ``model.family`` and then each family's keys."""
    if section in SECTIONS:
        return describe_keys(SECTIONS[section], section)
    if section != "model":
        raise ConfigError(f"unknown config section {section!r}{suggest(section, ['model', *SECTIONS])}")
    from pretrain.models.registry import config_class, family_names

    families = family_names()
    out = [KeyDoc("model.family", "str", "(required)", f"the model family: {' | '.join(families)}")]
    for family in families:
        out += [KeyDoc(k.key, k.type, k.default, f"[{family}] {k.doc}".rstrip())
                for k in describe_keys(config_class(family), "model")]
    return out


def run(args: argparse.Namespace) -> int:
    keys = [k for s in ([args.section] if args.section else ["model", *SECTIONS]) for k in section_keys(s)]
    width = [max(len(getattr(k, f)) for k in keys) for f in ("key", "type", "default")]
    for k in keys:
        print(f"{k.key:<{width[0]}}  {k.type:<{width[1]}}  {k.default:<{width[2]}}  {k.doc}".rstrip())
    return 0
