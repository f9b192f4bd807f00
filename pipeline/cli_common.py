"""Helpers shared by every `talon` command: the --json flag, output and error reporting."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

JsonFlag = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON summary on stdout instead of text.")]


def emit(summary: dict[str, Any], as_json: bool, lines: list[str]) -> None:
    """Print the summary as JSON, or the human-readable lines."""
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        for line in lines:
            typer.echo(line)


def fail(err: Exception) -> None:
    """Report an expected failure (bad input, missing cache...) without a traceback; exit 2."""
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(code=2)
