"""``kmerge serve``: its flags come from ServeConfig's fields (kmerge.options)."""

from __future__ import annotations

import argparse

from kmerge.options import add_options, check_requirements, given
from kmerge.serving.config import ServeConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="kmerge checkpoint directory (what kmerge train saves)")
    add_options(parser, ServeConfig)


def run(args: argparse.Namespace) -> None:
    from kmerge.serving.server import serve

    flags = given(args, ServeConfig)
    config = ServeConfig(checkpoint=args.checkpoint, **flags)
    check_requirements(config, flags)
    serve(config)
