"""Command-line flags derived from the config dataclasses: one source for every setting.

A field declared with :func:`option` carries its help text; :func:`add_options` turns the
fields of a dataclass into ``--field-name`` flags (type, choices and default taken from the
field) and :func:`given` returns only the values a user typed, so an unset flag keeps the
dataclass default and the CLI never restates one.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from kmerge.errors import KMergeConfigError

SEQUENCES = (list, Sequence)  # typed as comma-separated values


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    cli: bool = True,
    requires: str | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    positive: bool = False,
    **kw,
) -> Any:
    """A dataclass field with a help text (``cli=False``: no flag, e.g. filled in by code;
    ``requires``: the field that must be set, or "field=value", for this one to mean
    anything; see check_requirements). ``minimum`` / ``maximum`` (inclusive) and ``positive``
    (> 0 and finite) declare the valid range, checked by :func:`check_values`."""
    metadata = {
        "help": help, "cli": cli, "requires": requires,
        "minimum": minimum, "maximum": maximum, "positive": positive,
    }  # fmt: skip
    return dataclasses.field(default=default, metadata=metadata, **kw)


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap_optional(hint: Any) -> Any:
    """``X | None`` -> X (for ``str | list[str]`` the first member: what a flag can type)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        return members[0]
    return hint


def _list_item(hint: Any) -> type | None:
    """The item type of a ``list[X]`` or ``Sequence[X]`` field (None for any other field)."""
    kind = _unwrap_optional(hint)
    return typing.get_args(kind)[0] if typing.get_origin(kind) in SEQUENCES else None


def comma_list(text: str, kind: type, option_name: str) -> list:
    """``"1, 2,4"`` -> ``[1, 2, 4]``; a bad item is a KMergeConfigError naming the option."""
    try:
        return [kind(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise KMergeConfigError(
            f"{option_name} takes comma-separated numbers, got {text!r}"
        ) from None


def _argument(f: dataclasses.Field, hint: Any, help_text: str) -> dict:
    """add_argument keywords for one field; the default is SUPPRESS so that only typed flags
    reach :func:`given` (the dataclass keeps its own default)."""
    kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
    default = field_default(f)
    kind = _unwrap_optional(hint)
    # booleans show their default through the flag's form (--x, or --x / --no-x)
    if (
        kind is not bool
        and default is not None
        and default not in ("", [], ())
        and ("default" not in help_text)
    ):
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        if isinstance(default, str) and default.strip() != default or "\n" in str(default):
            shown = repr(default)
        help_text = f"{help_text} (default: {shown})".strip()
    kw["help"] = help_text or None
    if kind is bool:
        kw["action"] = "store_true" if default is False else argparse.BooleanOptionalAction
    elif typing.get_origin(kind) is Literal:
        kw["choices"] = typing.get_args(kind)
    elif typing.get_origin(kind) in SEQUENCES:  # comma-separated; parsed by given()
        kw["metavar"] = f.name.upper().rstrip("S") + ",..."
    elif kind in (int, float, str):
        kw["type"] = kind
    else:
        raise TypeError(f"no flag for field {f.name!r} of type {hint!r}: give it cli=False")
    return kw


def add_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    only: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    help: dict[str, str] | None = None,
) -> list[str]:
    """Add a flag for every CLI field of dataclass ``cls`` (those in ``only``, if given, less
    ``skip``); ``help`` replaces a field's text where the flag means something narrower.
    Returns the field names added."""
    hints = typing.get_type_hints(cls)
    wanted = None if only is None else set(only)
    added = []
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True) or f.name in skip:
            continue
        if wanted is not None and f.name not in wanted:
            continue
        text = (help or {}).get(f.name, f.metadata.get("help", ""))
        kw = _argument(f, hints[f.name], text)
        short = ["-k"] if f.name == "k" else []
        parser.add_argument(*short, flag(f.name), **kw)
        added.append(f.name)
    if wanted is not None and wanted - set(added):
        raise TypeError(f"{cls.__name__} has no CLI fields {sorted(wanted - set(added))}")
    return added


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` that the user set on the command line (comma lists parsed: a bad
    item is a KMergeConfigError naming the flag)."""
    values, hints = vars(args), typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in values and f.metadata.get("cli", True):
            value, item = values[f.name], _list_item(hints[f.name])
            if item is not None and isinstance(value, str):
                value = comma_list(value, item, flag(f.name))
            out[f.name] = value
    return out


def check_requirements(config: Any, names: Iterable[str]) -> None:
    """Refuse a flag the user gave (``names``) whose ``requires`` field is unset in ``config``:
    it would be silently ignored."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    for name in names:
        needed = fields[name].metadata.get("requires") if name in fields else None
        if not needed:
            continue
        field, _, value = needed.partition("=")  # "field" (set at all) or "field=value"
        actual = getattr(config, field)
        if (str(actual) != value) if value else actual in (None, False, 0, "", []):
            wanted = f"{flag(field)} {value}" if value else flag(field)
            raise KMergeConfigError(f"{flag(name)} applies only with {wanted}")


def _spelled(choices: Sequence[Any]) -> str:
    """('a', 'b', 'c') -> "'a', 'b' or 'c'"."""
    quoted = [repr(c) for c in choices]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def check_values(config: Any) -> None:
    """Refuse a field value outside what its declaration allows: a Literal's choices, the
    ``minimum`` / ``maximum`` / ``positive`` of :func:`option`. One check, one message format
    for every config (None means unset and is always allowed)."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is None:
            continue
        kind = _unwrap_optional(hints[f.name])
        if typing.get_origin(kind) is Literal and value not in typing.get_args(kind):
            raise KMergeConfigError(
                f"{f.name} must be {_spelled(typing.get_args(kind))}, got {value!r}"
            )
        low, high = f.metadata.get("minimum"), f.metadata.get("maximum")
        if low is not None and high is not None and not low <= value <= high:
            raise KMergeConfigError(f"{f.name} must be in {low}..{high}, got {value}")
        if low is not None and value < low:
            raise KMergeConfigError(f"{f.name} must be >= {low}, got {value}")
        if high is not None and value > high:
            raise KMergeConfigError(f"{f.name} must be <= {high}, got {value}")
        if f.metadata.get("positive") and not (value > 0 and math.isfinite(value)):
            raise KMergeConfigError(f"{f.name} must be a positive number, got {value}")


def from_known_keys(cls: type, data: dict, what: str) -> Any:
    """``cls(**data)``, refusing keys that are not fields of ``cls`` by name (a config saved
    by another version, or a typo) instead of a TypeError from the constructor."""
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise KMergeConfigError(f"unknown {what} keys: {', '.join(unknown)}")
    return cls(**data)
