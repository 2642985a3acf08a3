"""Command-line options derived from a stage's config dataclass, so each option is stated once.

A config field declared with ``option(default, "help")`` becomes ``--field-name`` with that
default, that help (the default appended) and a type read off the annotation: ``int``,
``float``, ``str`` (optionally ``| None``), ``bool`` (``--x`` / ``--no-x``) or
``tuple[X, ...]`` (one or more values). ``choices``, ``flag`` (the option's spelling, when not
``--field-name``), ``aliases`` (old names, still read), ``metavar`` and ``positional`` refine
it; ``group`` puts an option in a named help section. Fields without ``option`` metadata are not options (a stage adds those itself,
with defaults read off the dataclasses they hold).

The parser records only the options the user gave (argparse defaults are suppressed), so
``config_from_args`` can lay them over another base than the dataclass's defaults: a config
file (``--config FILE``, TOML or YAML: the same field names, unknown keys refused) or a saved
run (``distill train --resume``). A flag that disagrees with its base wins, and says so.
``dump_toml`` writes a config back as a file ``--config`` reads (``--print-config``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import typing
from typing import Any, Mapping

from distill.errors import BadOption

log = logging.getLogger(__name__)

_META = "distill.option"


def option(default: Any = dataclasses.MISSING, help: str = "", *, choices=None, flag: str | None = None,
           metavar: str | None = None, positional: bool = False, required: bool = False, group: str | None = None,
           aliases: tuple[str, ...] = (), path: bool | str = False):
    """``path``: the value names a file or folder (``"list"``: several, comma-separated); a
    relative one is resolved against the current folder (given on the command line) or the
    config file's folder (read from ``--config FILE``), so the config holds absolute paths and
    works from anywhere. Object-store URIs are left as they are."""
    meta = {_META: {"help": help, "choices": choices, "flag": flag, "metavar": metavar,
                    "positional": positional, "required": required, "group": group, "aliases": aliases,
                    "path": path}}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def option_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if _META in f.metadata]


def _is_sequence(annotation) -> bool:
    """``tuple[X, ...]``: one or more values (``nargs="+"``)."""
    if isinstance(annotation, str):
        return annotation.replace(" ", "").startswith("tuple[")
    return typing.get_origin(annotation) is tuple


def _optional(annotation) -> bool:
    if isinstance(annotation, str):
        return "None" in annotation.replace(" ", "").split("|")
    return type(None) in typing.get_args(annotation)


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


def flag_of(f: dataclasses.Field) -> str:
    meta = f.metadata[_META]
    return meta["flag"] or f"--{f.name.replace('_', '-')}"


def finite(text: str) -> float:
    """A float option's value: a number (``nan`` and ``inf`` parse as floats, and no option means
    them: a learning rate or a loss weight of nan would train to nan)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def add_options(parser: argparse.ArgumentParser, cls, *, config_file: bool = False) -> dict[str, Any]:
    """One argument per ``option`` field of the dataclass ``cls``, in field order, in the
    argument group its ``group`` names (created on first use). Only options the user gives are
    recorded (``config_from_args`` supplies the rest). With ``config_file``, ``--config FILE``
    and ``--print-config`` too, and the required options may come from the file instead.
    Returns the groups by name."""
    groups: dict[str, Any] = {}
    target = parser
    for f in option_fields(cls):
        meta = f.metadata[_META]
        group = meta.get("group")
        parser = groups.setdefault(group, target.add_argument_group(group)) if group else target
        kind = _scalar_type(f.type)
        has_default = f.default is not dataclasses.MISSING
        text = meta["help"]
        if has_default and f.default is not None and kind is not bool and not meta["positional"]:
            text = f"{text} (default: {f.default})" if text else f"default: {f.default}"
        many = {"nargs": "+"} if _is_sequence(f.type) else {}
        if meta["positional"]:
            # (also as a flag, ``--shards DIR``, the spelling other verbs use for the same input)
            nargs = many or {"nargs": "?"}
            name = meta["metavar"] or f.name.upper()
            parser.add_argument(f.name, help=f"{text} (or {flag_of(f)} {name})", metavar=name,
                                default=argparse.SUPPRESS, **nargs)
            parser.add_argument(flag_of(f), dest=f.name, metavar=name, default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                                **many)
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "help": text, "default": argparse.SUPPRESS}
        if kind is bool:
            kwargs.update(action=argparse.BooleanOptionalAction)
            if f.default is not None:  # (None: the stage decides, and its help says how)
                kwargs["help"] = f"{text} (default: {'on' if f.default else 'off'})"
        else:
            kwargs.update(type=finite if kind is float else kind, metavar=meta["metavar"], choices=meta["choices"], **many)
            if (meta["required"] or not has_default) and not config_file:
                kwargs["required"] = True
        parser.add_argument(flag_of(f), *(f"--{a.replace('_', '-')}" for a in meta["aliases"]), **kwargs)
    if config_file:
        target.add_argument("--config", metavar="FILE", default=None,
                            help="read the options from this TOML or YAML file (the option names, with _ for -); "
                                 "flags given as well win")
        target.add_argument("--print-config", action="store_true",
                            help="print the options as a TOML file --config reads, and exit")
    return groups


def given(cls, args: argparse.Namespace) -> dict[str, Any]:
    """The options of ``cls`` the user gave on the command line."""
    values = {f.name: getattr(args, f.name) for f in option_fields(cls) if hasattr(args, f.name)}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def config_from_args(cls, args: argparse.Namespace, *, base: Mapping[str, Any] | None = None, base_name: str = "",
                     **extra):
    """The config ``cls`` from the options given, laid over ``base`` (a config file's or a saved
    run's values; else ``--config FILE`` when the parser has it), then over the dataclass's
    defaults, plus ``extra``. A given option that changes a base value says so."""
    path = getattr(args, "config", None)
    if base is None and path:
        base, base_name = resolve_paths(cls, load_config_file(cls, path), os.path.dirname(os.path.abspath(path))), path
    values = dict(base or {})
    for k, v in resolve_paths(cls, given(cls, args), os.getcwd()).items():
        if k in values and values[k] != v:
            log.info("%s %s overrides %s = %r in %s", flag_of(_field(cls, k)), v, k, values[k], base_name)
        values[k] = v
    missing = [_spelling(f) for f in option_fields(cls)
               if f.default is dataclasses.MISSING and f.name not in values and f.name not in extra]
    if missing:
        raise BadOption(f"give {' and '.join(missing)}" + (" (on the command line, or in the --config file)"
                                                           if hasattr(args, "config") else ""))
    return cls(**values, **extra)


def resolve_path(value: str, base_dir: str) -> str:
    """``value`` as an absolute path, a relative one taken from ``base_dir``; a URI (``s3://``,
    ``redis://``) or an empty value as it is. Pure (no file system)."""
    if not value or "://" in value:
        return value
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(value)))


def resolve_paths(cls, values: Mapping[str, Any], base_dir: str) -> dict[str, Any]:
    """``values`` with every path option (``option(path=...)``) resolved against ``base_dir``."""
    kinds = {f.name: f.metadata[_META].get("path") for f in option_fields(cls)}
    out = dict(values)
    for name, value in values.items():
        kind = kinds.get(name)
        if not kind or value is None:
            continue
        if isinstance(value, tuple):
            out[name] = tuple(resolve_path(v, base_dir) for v in value)
        elif kind == "list":
            out[name] = ",".join(resolve_path(v.strip(), base_dir) for v in value.split(",") if v.strip())
        else:
            out[name] = resolve_path(value, base_dir)
    return out


def _spelling(f: dataclasses.Field) -> str:
    """How a user gives the option: ``--out``, or ``SHARDS (or --shards SHARDS)`` for a positional."""
    meta = f.metadata[_META]
    if not meta["positional"]:
        return flag_of(f)
    name = meta["metavar"] or f.name.upper()
    return f"{name} (or {flag_of(f)} {name})"


def _field(cls, name: str) -> dataclasses.Field:
    return next(f for f in option_fields(cls) if f.name == name)


# ---------------------------------------------------------------- config files


def load_config_file(cls, path: str) -> dict[str, Any]:
    """A TOML (``.toml``) or YAML (``.yaml``/``.yml``) file of ``cls``'s options, checked:
    unknown keys and values of the wrong type are refused, naming the key."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path} does not exist")
    with open(path, "rb") as f:
        raw = f.read()
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            data = yaml.safe_load(raw) or {}
        except yaml.YAMLError as e:
            raise BadOption(f"--config {path} is not valid YAML: {e}") from None
    else:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(raw.decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise BadOption(f"--config {path} is not valid TOML: {e} (a .yaml or .yml name reads YAML)") from None
    if not isinstance(data, dict):
        raise BadOption(f"--config {path} must hold `option = value` pairs, got {type(data).__name__}")
    return check_values(cls, data, path)


def check_values(cls, data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``data`` as ``cls``'s option values: every key an option, every value of its type. Pure."""
    import difflib

    fields = {f.name: f for f in option_fields(cls)}
    renamed = {a: f.name for f in fields.values() for a in f.metadata[_META]["aliases"]}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        name = renamed.get(name, name)  # an option's old name
        if name not in fields:
            near = difflib.get_close_matches(name, fields, n=1)
            raise BadOption(f"{where}: unknown option {key!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
                            + f"; the options are those of --help: {', '.join(sorted(fields))}")
        out[name] = _typed(fields[name], value, where)
    return out


def _typed(f: dataclasses.Field, value: Any, where: str) -> Any:
    kind = _scalar_type(f.type)
    if value is None and _optional(f.type):
        return None
    if _is_sequence(f.type):
        items = value if isinstance(value, list) else [value]
        return tuple(_typed_scalar(f, kind, v, where) for v in items)
    return _typed_scalar(f, kind, value, where)


def _typed_scalar(f: dataclasses.Field, kind: type, value: Any, where: str) -> Any:
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise BadOption(f"{where}: {f.name} = {value!r} is not {'an' if kind is int else 'a'} {kind.__name__}")
    if kind is float and not math.isfinite(value):
        raise BadOption(f"{where}: {f.name} = {value!r} is not a finite number")
    choices = f.metadata[_META]["choices"]
    if choices and value not in choices:
        raise BadOption(f"{where}: {f.name} = {value!r} is not one of {', '.join(map(str, choices))}")
    return value


def dump_toml(cfg, skip: tuple[str, ...] = ()) -> str:
    """The config's options as TOML that ``load_config_file`` reads back to the same values
    (an option that is None is left out: absent means its default, which is None)."""
    lines = []
    for f in option_fields(type(cfg)):
        value = getattr(cfg, f.name)
        if value is None or f.name in skip:
            continue
        lines.append(f"{f.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
