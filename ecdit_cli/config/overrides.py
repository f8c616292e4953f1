"""Configs from plain data: `--set key=value` overrides, merging, and type-checked building.

`config_from_dict` builds a `RunConfig` from a nested dict, checking every key against the
schema (an unknown key gets a did-you-mean suggestion) and every value against its field's
annotation (ints are accepted for floats, never strings for numbers). Overrides are
`section.key=value` with the value parsed as YAML (nanoGPT's configurator behaviour, without
its `exec`).
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from typing import Any, Literal

import yaml

from ecdit_cli.config.schema import RunConfig
from ecdit_cli.errors import ConfigError, did_you_mean


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool) and {"on", "off"} <= set(allowed):
            value = "on" if value else "off"  # YAML 1.1 reads on/off (and true/false) as booleans
        if value not in allowed:
            raise ConfigError(
                f"{key}={value!r} is invalid: allowed: {', '.join(map(str, allowed))}"
                + (did_you_mean(str(value), map(str, allowed)) if isinstance(value, str) else "")
            )
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        # `--set train.tracker=tensorboard,csv` as well as `[tensorboard, csv]` (lists of names only:
        # a list of numbers such as moe.capacity_schedule is written [4, 2]).
        if isinstance(value, str) and item is str:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} is invalid: expected a list, e.g. "
                              f"{'[tensorboard, csv]' if item is str else '[4, 2]'}")
        return [_coerce(v, item, key) for v in value]
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is invalid: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}={value!r} is invalid: expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} is invalid: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} is invalid: expected a string")
        return value
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(
                f"unknown config key '{full}'"
                + (did_you_mean(str(key), names) or f" (allowed: {', '.join(names)})")
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Build and validate a RunConfig from a nested dict (unknown keys are errors)."""
    return _build(RunConfig, data, "")


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """A copy of `base` with `update` merged in recursively (update wins)."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def nest(key: str, value: Any) -> dict[str, Any]:
    """'moe.top_k', 2 -> {'moe': {'top_k': 2}}."""
    *parents, last = key.split(".")
    out: dict[str, Any] = {last: value}
    for part in reversed(parents):
        out = {part: out}
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """'moe.top_k=2' -> (['moe', 'top_k'], 2); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is invalid: expected KEY=VALUE, e.g. moe.top_k=2")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} is invalid: expected KEY=VALUE, e.g. moe.top_k=2")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def overrides_to_dict(overrides: list[str]) -> dict[str, Any]:
    """['moe.top_k=2', 'train.lr=1e-3'] -> {'moe': {'top_k': 2}, 'train': {'lr': 0.001}}."""
    out: dict[str, Any] = {}
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r} conflicts with an earlier override of '{part}'")
        node[path[-1]] = value
    return out


def yaml_numbers(value: Any) -> Any:
    """Strings that YAML 1.1 leaves unparsed but a user meant as numbers ('1e-3') -> floats."""
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in "eE.") else value
        except ValueError:
            return value
    if isinstance(value, dict):
        return {k: yaml_numbers(v) for k, v in value.items()}
    return value
