"""Helpers shared by the command modules (argument resolution, exit codes)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def fmt_count(x: float) -> str:
    """1234567 -> '1.23M'; 9.7e10 -> '97.2B' (parameters, FLOPs)."""
    if abs(x) >= 1e15:
        return f"{x:.3g}"
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def exit_with(code: int) -> None:
    if code:
        raise typer.Exit(code)


def resolve_config_arg(config: Optional[str], overrides: list[str]):
    """CONFIG may be a YAML file or a preset name; --set overrides apply on top."""
    from ecdit_cli.config import resolve_config
    from ecdit_cli.errors import ConfigError, did_you_mean
    from ecdit_cli.presets import PRESETS

    if config is None:
        if any(o.startswith("preset=") for o in overrides):
            return resolve_config(overrides=overrides)
        raise ConfigError(f"give a run config file or a preset name ({', '.join(PRESETS)})")
    p = Path(config)
    if p.exists() or p.suffix in (".yaml", ".yml"):
        return resolve_config(file=p, overrides=overrides)
    if config in PRESETS:
        return resolve_config(preset=config, overrides=overrides)
    raise ConfigError(
        f"'{config}' is neither a config file nor a preset"
        + (did_you_mean(config, PRESETS) or f" (presets: {', '.join(PRESETS)})")
    )
