"""The `ecdit` command line: thin Typer commands over the library, composed here.

Library errors (`EcditError`) become one red line and exit code 2; anything else is a bug and
prints one line too, with the traceback only under `--debug` (or ECDIT_DEBUG=1).
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from ecdit_cli import __version__
from ecdit_cli.errors import EcditError

app = typer.Typer(
    name="ecdit",
    help="Scaling studies of Mixture-of-Experts diffusion transformers: dense vs token choice vs expert choice.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ecdit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    _state["debug"] = debug or os.environ.get("ECDIT_DEBUG") == "1"


def _register() -> None:
    from ecdit_cli.cli import commands

    commands.register(app)


def _error_line(msg: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {msg}", markup=True)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    _register()
    debug = "--debug" in (argv if argv is not None else sys.argv[1:]) or os.environ.get("ECDIT_DEBUG") == "1"
    from rich.markup import escape

    try:
        app(args=argv, standalone_mode=True)
    except EcditError as err:
        if debug:
            raise
        _error_line(escape(str(err)))
        sys.exit(2)
    except KeyboardInterrupt:
        _error_line("interrupted")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as err:  # a bug: one line by default, the traceback with --debug
        if debug:
            raise
        _error_line(escape(f"{type(err).__name__}: {err} (a bug in ecdit? re-run with --debug for the traceback)"))
        sys.exit(1)
