"""Resolving a run config (defaults -> preset -> file -> overrides) and reading and writing it.

`config.yaml` in a run directory is the one serialised form of a run's config: written by
`save_config`, read back by `load_run_config`, which refuses a run directory written by
another run-format version.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from ecdit_cli import RUN_FORMAT_VERSION
from ecdit_cli.config.overrides import config_from_dict, deep_merge, overrides_to_dict, yaml_numbers
from ecdit_cli.config.presets import PRESETS, preset_overrides
from ecdit_cli.config.schema import RunConfig
from ecdit_cli.errors import ConfigError, did_you_mean
from ecdit_cli.files import atomic_write_text


def load_yaml(path: str | Path, what: str = "config") -> dict[str, Any]:
    """Read a YAML mapping with one-line errors for missing files and bad syntax."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{what} file not found: {p}")
    if p.is_dir():
        raise ConfigError(f"{what} path is a directory, expected a YAML file: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "malformed YAML"
        raise ConfigError(f"{what} file {p} is not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} file {p} is not a text file") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} file {p} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def resolve_config(
    file: str | Path | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> RunConfig:
    """defaults -> preset -> file (or `base`) -> overrides, validated.

    A `preset:` key in the file (or `base`) selects a preset when `preset` is not given; the
    preset fills in defaults and the file's own keys win over it.
    """
    data: dict[str, Any] = copy.deepcopy(base) if base else {}
    if file is not None:
        data = deep_merge(data, load_yaml(file))
    over = overrides_to_dict(overrides or [])
    chosen = over.pop("preset", None) or preset or data.get("preset") or ""
    if chosen and not isinstance(chosen, str):
        raise ConfigError(f"preset={chosen!r} is invalid: expected a preset name")
    merged: dict[str, Any] = {}
    if chosen:
        merged = preset_overrides(chosen)
    merged = deep_merge(merged, data)
    merged = deep_merge(merged, yaml_numbers(over))
    merged["preset"] = chosen
    return config_from_dict(yaml_numbers(merged))


def resolve_named_config(config: str | None, overrides: list[str]) -> RunConfig:
    """`config` is a YAML file or a preset name (`preset=...` in the overrides also names one);
    the overrides apply on top."""
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


def save_config(cfg: RunConfig, path: str | Path) -> None:
    atomic_write_text(path, cfg.to_yaml())


def config_changes(old: RunConfig, new: RunConfig, ignore: set[str] = frozenset()) -> list[tuple[str, Any, Any]]:
    """The dotted keys (e.g. "train.steps") whose values differ between two configs, sorted,
    as (key, old value, new value); keys in `ignore` are left out."""

    def flat(d: dict, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(old.to_dict()), flat(new.to_dict())
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k) and k not in ignore]


def load_run_config(path: str | Path) -> RunConfig:
    """Read a run directory's `config.yaml` (or a config file), checking the format version."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.yaml"
        if not p.exists():
            raise ConfigError(f"{p.parent} is not an ecdit run directory (no config.yaml)")
    data = load_yaml(p)
    version = data.get("format_version", RUN_FORMAT_VERSION)
    if version != RUN_FORMAT_VERSION:
        raise ConfigError(
            f"{p} has run format version {version!r}; this ecdit reads version {RUN_FORMAT_VERSION} "
            "(re-run with the ecdit version that wrote it)"
        )
    return config_from_dict(yaml_numbers(data))
