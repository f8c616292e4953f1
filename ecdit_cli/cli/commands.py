"""The command table: every `ecdit` command and the module that holds it.

Command modules import the library (torch, DeepSpeed) inside their functions so that
`ecdit --help` stays fast.
"""

from __future__ import annotations

import importlib

import typer

# (command name, module under ecdit_cli.cli, attribute): a function, or a Typer app for groups.
COMMANDS: list[tuple[str, str, str]] = [
    ("info", "info", "info"),
    ("prepare", "prepare", "prepare"),
    ("train", "train", "train"),
    ("sweep", "sweep", "sweep"),
    ("status", "sweep", "status"),
    ("archive", "archive", "archive"),
    ("collect", "analysis", "collect"),
    ("fit", "analysis", "fit"),
    ("plot", "analysis", "plot"),
    ("sample", "evaluate", "sample"),
    ("eval", "evaluate", "eval_"),
    ("analyze", "evaluate", "analyze"),
    ("export", "export", "export"),
    ("bench", "bench", "app"),
]


def register(app: typer.Typer) -> None:
    for name, module, attr in COMMANDS:
        try:
            mod = importlib.import_module(f"ecdit_cli.cli.{module}")
        except ModuleNotFoundError as err:
            if err.name == f"ecdit_cli.cli.{module}":
                continue  # not built yet
            raise
        obj = getattr(mod, attr, None)
        if obj is None:
            continue
        if isinstance(obj, typer.Typer):
            app.add_typer(obj, name=name)
        else:
            app.command(name)(obj)
