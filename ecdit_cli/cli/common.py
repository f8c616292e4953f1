"""Helpers shared by the command modules (argument resolution, exit codes)."""

from __future__ import annotations

import typer


def exit_with(code: int) -> None:
    if code:
        raise typer.Exit(code)
