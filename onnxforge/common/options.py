"""One schema per settings class: each field of a frozen settings dataclass declares, once, its
flag, its recipe key, its help, choices and range; the CLI's flags, the recipe's allowed keys
and checks, and the conversions from parsed flags or a recipe table to the settings object are
generated from it, so the three cannot drift (as Olive builds its CLI and its workflow files
from one pass config).

    level: str = option("auto", help="ONNX Runtime offline optimization", flag="--level", key=True, choices=LEVELS)

- ``flag``: the flag's spellings (a string or a tuple, the first names it); none: not on the CLI.
  A bool field whose default is False is a switch (``--fp16``); ``sets=VALUE`` makes any field a
  switch that sets VALUE (``--no-verify`` sets False, ``--per-tensor`` sets False); a ``bool | None``
  field without ``sets`` is ``--x / --no-x``. A tuple field reads a comma-separated list, or
  repeated flags with ``repeat=True``; a mapping field reads repeated ``NAME=VALUE`` flags.
- ``key``: the recipe key (True: the field's name); none: not in recipes.
- ``internal=True``: neither, on purpose (a Python-only knob); ``tests/test_options.py`` fails on
  a field that declares none of the three.
- ``flag_default``: what the flag holds when it is not given, where that differs from the field's
  default because the command tells "not given" apart (``prune --ratio``); the field's default
  is what the settings object gets either way.

- ``choices``: the flag's choices, and the values a recipe key accepts; ``low`` / ``high`` (with
  ``low_open`` / ``high_open``): the range of a flag's or a recipe key's value, checked after the
  class's own ``__post_init__`` (whose messages come first where it checks the same thing).
- ``nested=True``: the field is a settings class of its own (``BenchConfig.session``), whose
  flags stand in its place.

A flag holds its field's default, which the CLI's help shows. A command adds the flags of a
settings class with ``add_flags(parser, Settings)`` and builds it with ``from_args(Settings,
args)``; a recipe section's keys and types are ``recipe_types(Settings)``, and
``onnxforge.recipe.settings_from`` builds it with ``check_ranges``, ``from_table`` and ``check_choices``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from onnxforge.common.errors import UserError, closest

_MISSING = dataclasses.MISSING
_UNSET = type("Unset", (), {"__repr__": lambda self: "<unset>"})()  # a switch's value / a flag's default not declared


@dataclasses.dataclass(frozen=True)
class Option:
    help: str
    flag: tuple[str, ...] = ()
    key: bool | str = False
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # the lowest value itself is refused
    high_open: bool = False
    sets: Any = _UNSET
    repeat: bool = False
    metavar: str | None = None
    parse: Callable[[list[str]], Any] | None = None  # the flag's raw strings -> the field's value
    flag_default: Any = _UNSET
    internal: bool = False
    nested: bool = False  # a settings dataclass of its own: its flags are added and built in its place


def option(default: Any = _MISSING, *, help: str, flag: str | tuple[str, ...] | None = None, key: bool | str = False,
           default_factory: Any = _MISSING, **details: Any) -> Any:
    """A dataclass field that declares its flag and recipe key (see the module doc)."""
    flags = (flag,) if isinstance(flag, str) else tuple(flag or ())
    meta = Option(help=help, flag=flags, key=key, **details)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"option": meta})


@dataclasses.dataclass(frozen=True)
class Described:
    """A settings field with its declaration: ``kind`` is its base type (bool, int, float, str,
    tuple or dict), ``optional`` whether it may be None."""

    name: str
    option: Option
    key: str | None
    kind: type
    item: type
    optional: bool
    default: Any


def described(cls: type) -> list[Described]:
    """The fields of settings class ``cls`` with their declarations (fields without one are skipped)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get("option")
        if meta is None:
            continue
        kind, item, optional = _kind(hints[f.name])
        key = meta.key
        default = f.default if f.default is not _MISSING else (f.default_factory() if f.default_factory is not _MISSING else None)
        out.append(Described(f.name, meta, f.name if key is True else (key or None), kind, item, optional, default))
    return out


def undeclared(cls: type) -> list[str]:
    """Fields of ``cls`` that declare neither a flag nor a recipe key nor ``internal=True``
    (a nested settings class's as ``field.inner``)."""
    nested = {d.name: d.kind for d in described(cls) if d.option.nested}
    declared = {d.name for d in described(cls) if d.option.flag or d.key or d.option.internal}
    out = []
    for f in dataclasses.fields(cls):
        if f.name in nested:
            out += [f"{f.name}.{inner}" for inner in undeclared(nested[f.name])]
        elif f.name not in declared:
            out.append(f.name)
    return out


def _kind(hint) -> tuple[type, type, bool]:
    args = typing.get_args(hint)
    optional = type(None) in args
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    origin = typing.get_origin(hint) or hint
    if origin is tuple:
        return tuple, args[0] if args else str, optional
    if isinstance(origin, type) and issubclass(origin, Mapping) or origin is Mapping:
        return dict, args[1] if len(args) == 2 else str, optional
    return origin, origin, optional


def help_of(cls: type, name: str) -> str:
    """The declared help of field ``name`` of settings class ``cls``."""
    return next(d.option.help for d in described(cls) if d.name == name)


# ---- flags


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, skip: tuple[str, ...] = (),
              adjust: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Add a flag for every field of ``cls`` that declares one, holding the field's default (which
    the CLI's help formatter shows at the end of the help).
    ``adjust`` changes a flag's argparse keywords where a command offers more than the settings
    class takes (``quantize --mode int8-weight`` routes to weight-only quantization)."""
    for d in described(cls):
        if d.option.nested and d.name not in skip:
            add_flags(parser, d.kind, skip, adjust)
        if not d.option.flag or d.name in skip:
            continue
        o = d.option
        kwargs: dict[str, Any] = {"dest": d.name, "help": o.help, **(adjust or {}).get(d.name, {})}
        default = d.default if o.flag_default is _UNSET else o.flag_default
        switch = o.sets is not _UNSET or (d.kind is bool and d.default is False)
        if switch:
            kwargs.update(action="store_const", const=True if o.sets is _UNSET else o.sets, default=None)
        elif d.kind is bool:
            kwargs.update(action=argparse.BooleanOptionalAction, default=default)
        elif d.kind in (tuple, dict):
            kwargs.update(action="append" if o.repeat or d.kind is dict else "store", default=None)
            if d.default and not o.repeat and "default" not in kwargs["help"]:  # a comma-separated list: shown as typed
                kwargs["help"] += f" (default: {','.join(map(str, d.default))})"
        else:
            kwargs.update(type=d.kind, default=default)
        if o.choices is not None and not switch:
            kwargs.setdefault("choices", o.choices)
        if o.metavar:
            kwargs["metavar"] = o.metavar
        elif not switch and d.kind is not bool and "choices" not in kwargs:  # named after the flag, not the field
            kwargs["metavar"] = o.flag[0].lstrip("-").replace("-", "_").upper()
        parser.add_argument(*o.flag, **kwargs)


def parse_pairs(items: list[str], flag: str, metavar: str, value_type: type) -> dict[str, Any]:
    """Repeated ``NAME=VALUE`` flags as a mapping; a malformed one is named."""
    pairs: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        try:
            pairs[name] = value_type(value)
        except ValueError:
            name = ""
        if not sep or not name:
            raise UserError(f"malformed {flag} {item!r}: expected {metavar}")
    return pairs


def key_values(items: list[str], flag: str, example: str) -> tuple[tuple[str, str], ...]:
    """Repeated ``KEY=VALUE`` flags as ordered pairs (keys may repeat); a malformed one is named."""
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"malformed {flag} {item!r}: expected KEY=VALUE, e.g. {example}")
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)


def _listed(d: Described, raw: str) -> tuple | None:
    """A comma-separated flag value as the field's tuple of items; one line when it is not."""
    flag = d.option.flag[0]
    try:
        values = tuple(d.item(v.strip()) for v in raw.split(",") if v.strip())
    except ValueError:
        kind = {int: "integers", float: "numbers"}.get(d.item, "values")
        raise UserError(f"{flag} must be comma-separated {kind}, got {raw!r}") from None
    if not values and d.default:
        raise UserError(f"{flag} is empty")
    return values if values or not d.optional else None


def from_args(cls: type, args: argparse.Namespace, **given: Any) -> Any:
    """The settings object from parsed flags: flags not given keep the field's default, ``given``
    (fields the command computes itself) win; a nested settings class is built from its own flags."""
    values: dict[str, Any] = {}
    for d in described(cls):
        if d.option.nested and d.name not in given:
            values[d.name] = from_args(d.kind, args)
            continue
        raw = getattr(args, d.name, None) if d.option.flag else None
        if d.name in given or raw is None:
            continue
        if d.option.parse is not None:
            raw = d.option.parse(raw)
        elif d.kind is tuple:
            raw = tuple(raw) if isinstance(raw, list) else _listed(d, raw)
        elif d.kind is dict:
            raw = parse_pairs(raw, d.option.flag[0], d.option.metavar or "NAME=VALUE", d.item)
        values[d.name] = raw
    settings = cls(**values, **given)
    for d in described(cls):
        value = values.get(d.name)
        if value is not None and not isinstance(value, bool) and isinstance(value, (int, float)):
            check_range(value, d.option.flag[0], d.option.low, d.option.high, d.option.low_open, d.option.high_open)
    return settings


# ---- recipe keys


def recipe_types(cls: type) -> dict[str, tuple]:
    """Recipe key -> the TOML value types it accepts (an int where a float goes)."""
    accepted = {bool: (bool,), int: (int,), float: (float, int), str: (str,), tuple: (list,), dict: (dict,)}
    return {d.key: accepted.get(d.kind, (d.kind,)) for d in described(cls) if d.key}


def check_ranges(table: Mapping[str, Any], cls: type, where: str) -> None:
    """The declared ranges of the recipe keys in ``table``: one line naming the key."""
    for d in described(cls):
        value = table.get(d.key) if d.key else None
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        check_range(value, f"{where}.{d.key}", d.option.low, d.option.high, d.option.low_open, d.option.high_open)


def check_choices(table: Mapping[str, Any], cls: type, where: str) -> None:
    """The declared choices of the recipe keys in ``table``: one line naming the key and the choices."""
    for d in described(cls):
        value = table.get(d.key) if d.key else None
        if value is not None and d.option.choices is not None and value not in d.option.choices:
            raise UserError(f"'{where}.{d.key}' must be one of {', '.join(map(str, d.option.choices))}, got {value!r}"
                            f"{closest(str(value), d.option.choices)}")


def check_range(value: float, name: str, low: float | None, high: float | None, low_open: bool = False,
                high_open: bool = False) -> None:
    too_low = low is not None and (value < low or (low_open and value == low))
    too_high = high is not None and (value > high or (high_open and value == high))
    if too_low or too_high:
        parts = ([f"{'above' if low_open else 'at least'} {low}"] if low is not None else []) + \
                ([f"{'below' if high_open else 'at most'} {high}"] if high is not None else [])
        raise UserError(f"'{name}' must be {' and '.join(parts)}, got {value!r}")


def from_table(cls: type, table: Mapping[str, Any], **given: Any) -> Any:
    """The settings object from a recipe table of declared keys (lists become tuples)."""
    by_key = {d.key: d for d in described(cls) if d.key}
    unknown = [k for k in table if k not in by_key]
    if unknown:
        raise UserError(f"unknown key '{unknown[0]}'{closest(unknown[0], by_key)}; known keys: {', '.join(sorted(by_key))}")
    values = {by_key[k].name: tuple(v) if by_key[k].kind is tuple and isinstance(v, list) else v for k, v in table.items()}
    return cls(**values, **given)
