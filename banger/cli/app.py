"""Shared typer plumbing: the --json option and the app factory. Output and error mapping live in
banger/cli/output.py (typer-free) and are re-exported here for the command modules."""

from __future__ import annotations

from typing import Annotated

import typer

from banger.cli.output import emit, human_bytes, make_ctx, print_kv, print_table, say  # noqa: F401  (re-exports)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON envelope on stdout.")]


def make_app(help: str) -> typer.Typer:
    return typer.Typer(help=help, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                       rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]})
