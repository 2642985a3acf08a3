"""Command-line options derived from a stage's config dataclass, so each default lives once.

A config field declared with ``option(default, "help")`` becomes ``--field-name`` with that
default, that help (the default appended) and a type read off the annotation: ``int``,
``float``, ``str`` (optionally ``| None``) or ``bool`` (``--x`` / ``--no-x``). ``choices``,
``flag`` (the option's spelling, when not ``--field-name``), ``metavar`` and ``positional`` refine it; fields without
``option`` metadata are not options (a stage adds those itself, with defaults read off the
dataclasses they hold); ``group`` puts an option in a named help section.
``config_from_args`` builds the config back.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

_META = "distill.option"


def option(default: Any = dataclasses.MISSING, help: str = "", *, choices=None, flag: str | None = None,
           metavar: str | None = None, positional: bool = False, required: bool = False, group: str | None = None):
    meta = {_META: {"help": help, "choices": choices, "flag": flag, "metavar": metavar,
                    "positional": positional, "required": required, "group": group}}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _is_sequence(annotation) -> bool:
    """``tuple[X, ...]``: one or more values (``nargs="+"``)."""
    if isinstance(annotation, str):
        return annotation.replace(" ", "").startswith("tuple[")
    return typing.get_origin(annotation) is tuple


def _scalar_type(annotation) -> type:
    if isinstance(annotation, str) and _is_sequence(annotation):
        annotation = annotation.replace(" ", "")[len("tuple["):].split(",")[0]
    elif _is_sequence(annotation):
        annotation = typing.get_args(annotation)[0]
    if isinstance(annotation, str):
        names = {"int": int, "float": float, "str": str, "bool": bool}
        base = annotation.replace(" ", "").split("|")
        kinds = [names[b] for b in base if b in names]
        if not kinds:
            raise TypeError(f"option type {annotation!r} is not int, float, str or bool")
        return kinds[0]
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def add_options(parser: argparse.ArgumentParser, cls) -> dict[str, Any]:
    """One argument per ``option`` field of the dataclass ``cls``, in field order, in the
    argument group its ``group`` names (created on first use). Returns the groups by name."""
    groups: dict[str, Any] = {}
    target = parser
    for f in dataclasses.fields(cls):
        meta = f.metadata.get(_META)
        if meta is None:
            continue
        group = meta.get("group")
        parser = groups.setdefault(group, target.add_argument_group(group)) if group else target
        kind = _scalar_type(f.type)
        has_default = f.default is not dataclasses.MISSING
        text = meta["help"]
        if has_default and f.default is not None and kind is not bool and not meta["positional"]:
            text = f"{text} (default: {f.default})" if text else f"default: {f.default}"
        many = {"nargs": "+"} if _is_sequence(f.type) else {}
        if meta["positional"]:
            parser.add_argument(f.name, help=text, metavar=meta["metavar"], **many)
            continue
        names = [meta["flag"] or f"--{f.name.replace('_', '-')}"]
        kwargs: dict[str, Any] = {"dest": f.name, "help": text}
        if kind is bool:
            kwargs.update(action=argparse.BooleanOptionalAction, default=f.default)
            kwargs["help"] = f"{text} (default: {'on' if f.default else 'off'})"
        else:
            kwargs.update(type=kind, metavar=meta["metavar"], choices=meta["choices"], **many)
            if meta["required"] or not has_default:
                kwargs["required"] = True
            else:
                kwargs["default"] = f.default
        parser.add_argument(*names, **kwargs)
    return groups


def config_from_args(cls, args: argparse.Namespace, **extra):
    """The config ``cls`` from parsed arguments (its option fields) plus ``extra``."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if _META in f.metadata}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**values, **extra)
