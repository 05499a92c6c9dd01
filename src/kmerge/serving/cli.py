"""``kmerge serve``: its flags come from ServeConfig's fields (one flag per field)."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from kmerge.serving.config import ServeConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(ServeConfig)
    for f in dataclasses.fields(ServeConfig):
        help_text = f.metadata.get("help", "")
        if f.name == "checkpoint":
            parser.add_argument("checkpoint", help=help_text)
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _base_type(hints[f.name])
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_text)
            continue
        choices = ("local", "vllm") if f.name == "backend" else None
        if f.default is not None and "default" not in help_text:
            help_text = f"{help_text} (default: {f.default})"
        parser.add_argument(flag, type=kind, default=f.default, choices=choices, help=help_text)


def run(args: argparse.Namespace) -> None:
    from kmerge.serving.server import serve

    names = [f.name for f in dataclasses.fields(ServeConfig)]
    serve(ServeConfig(**{n: getattr(args, n) for n in names}))


def _base_type(hint) -> type:
    """``int | None`` -> int: the type argparse converts the flag's text with."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint
