"""Study specs -> compute-matched sweep points (`make_sweep`, pure) and the study directory.

A spec is a short YAML file:

    name: demo
    base:                    # a run config: preset + overrides (any RunConfig keys)
      train: {batch_size: 32}
    match: activated_flops   # or: backbone
    grid:                    # axes; every combination is a point
      size: [tiny, small]    # preset names
      routing: [dense, token_choice, expert_choice]
      num_experts: [8]
      capacity_factor: [2.0]
      top_k: [2]
      steps: [300]           # or images: [9600] (a budget in training images)
      lr: [1.0e-3]
      seed: [0]
      moe.group_size: [0]    # any dotted config key is an axis too
    exclude:                 # optional: drop points matching all of these axis values
      - {size: tiny, routing: token_choice}
    include:                 # optional: extra points (axes not given take the grid's first value)
      - {size: small, routing: expert_choice, num_experts: 16}

Rules:
- Axes that do not apply to a routing are collapsed, not multiplied: dense ignores
  num_experts / capacity_factor / top_k / group_size / routing_group, expert choice and race
  ignore top_k, token choice ignores routing_group, only race keeps moe.race_* axes. A
  combination that is invalid for its routing (e.g. top_k > num_experts) is an error naming it.
- match: activated_flops sets each dense point's FFN width (`moe.dense_width_mult`) so that its
  forward FLOPs per image equal those of the *reference MoE point* of the same size and budget:
  the first num_experts / capacity_factor / top_k values of the grid, expert choice if present.
  match: backbone keeps the dense backbone as is (the paper's comparison).
- Routing-variant axes (`moe.shared_experts`, `moe.expert_width_mult`, `moe.router_input`,
  `moe.capacity_schedule`, `moe.routing_debug`, ...; see VARIANT_TAGS) are MoE-only axes too: dense
  ignores them, and a value dense cannot take is never given to it.
- Run ids are readable, path-safe and derived from the point: `{size}-{ec|tc|race|dense}`, then
  `-e{E}-f{f}` (EC, race), `-e{E}-k{k}` (TC, plus `-f{f}` when f varies), `-batch` for a batch-routed
  point (and `-image` for the others when routing_group varies in the grid), then a tag for every
  routing-variant axis whose value differs from the default, whether or not it varies (`-sh1`,
  `-w0.5`, `-dec`, `-rand`; a capacity schedule replaces f: `-f4_2`), then any other varying axis
  (`-n{steps}`, `-i{images}`, `-lr{lr}`, `-{key}{value}`), then `-s{seed}`. A config at every
  variant default, routed per image, gets the id it had before these keys existed.
"""

from __future__ import annotations

import csv
import io
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ecdit_cli import rundir
from ecdit_cli.config import (
    ROUTING_ABBREV,
    ROUTINGS,
    VARIANT_DEFAULTS,
    RunConfig,
    config_from_dict,
    deep_merge,
    load_run_config,
    load_yaml,
    nest,
    resolve_config,
)
from ecdit_cli.errors import ConfigError, EcditError, did_you_mean
from ecdit_cli.files import atomic_write_text
from ecdit_cli.model.accounting import count, dense_width_for_flops

# Named axes -> config keys. Dotted keys are accepted as axes directly.
AXES: dict[str, str] = {
    "size": "preset",
    "routing": "moe.routing",
    "num_experts": "moe.num_experts",
    "capacity_factor": "moe.capacity_factor",
    "top_k": "moe.top_k",
    "group_size": "moe.group_size",
    "routing_group": "moe.routing_group",
    "steps": "train.steps",
    "images": "train.steps",  # converted: ceil(images / batch_size)
    "lr": "train.lr",
    "seed": "train.seed",
    # Routing variants (named axes for the moe.* keys of config.VARIANT_DEFAULTS).
    **{key: f"moe.{key}" for key in VARIANT_DEFAULTS},
}
# Run-id tag of each routing-variant key at a value other than its default: a prefix followed by
# the value, or a fixed tag per value. moe.capacity_schedule is written in place of f (`f4_2`).
VARIANT_TAGS: dict[str, str | dict[Any, str]] = {
    "shared_experts": "sh", "shared_expert_width_mult": "shw", "expert_width_mult": "w",
    "router_input": {"decoupled": "dec"}, "route_scale": "rs", "renormalize_gates": {True: "rn"},
    "routing_debug": {"balanced": "bal", "random": "rand"},
}
MOE_ONLY_AXES = {"num_experts", "capacity_factor", "top_k", "group_size", "moe.num_experts",
                 "moe.capacity_factor", "moe.top_k", "moe.group_size",
                 *VARIANT_DEFAULTS, *(f"moe.{key}" for key in VARIANT_DEFAULTS)}
TC_ONLY_AXES = {"top_k", "moe.top_k"}
# Batch-level groups apply to expert choice and race; race's own keys to race only.
GROUP_AXES = {"routing_group", "moe.routing_group"}
RACE_ONLY_AXES = {"moe.race_threshold_momentum", "moe.race_inference", "moe.race_expert_cap"}
MOE_ONLY_AXES |= GROUP_AXES | RACE_ONLY_AXES
SPEC_KEYS = ("name", "description", "base", "match", "grid", "include", "exclude")
MATCH_RULES = ("activated_flops", "backbone")
ACCOUNTING_COLUMNS = ("dense_width_mult", "params_total", "params_active", "flops_per_image", "train_flops")


@dataclass
class StudySpec:
    name: str
    base: dict[str, Any]
    grid: dict[str, list[Any]]
    match: str = "activated_flops"
    description: str = ""
    include: list[dict[str, Any]] = field(default_factory=list)
    exclude: list[dict[str, Any]] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass
class SweepPoint:
    run_id: str
    axes: dict[str, Any]  # axis name -> value (None where collapsed for this routing)
    config: RunConfig

    def manifest_row(self, axis_names: list[str]) -> dict[str, Any]:
        acc = count(self.config)
        row: dict[str, Any] = {"run_id": self.run_id}
        for a in axis_names:
            v = self.axes.get(a)
            row[a] = "" if v is None else v
        row.update({
            "dense_width_mult": round(self.config.moe.dense_width_mult, 6),
            "params_total": acc.params_total,
            "params_active": round(acc.params_active),
            "flops_per_image": round(acc.flops_per_image),
            "train_flops": acc.train_flops(self.config.train.steps * self.config.train.batch_size),
        })
        return row


def parse_spec(data: dict[str, Any], where: str = "spec") -> StudySpec:
    for key in data:
        if key not in SPEC_KEYS:
            raise ConfigError(f"{where}: unknown key '{key}'" + (did_you_mean(str(key), SPEC_KEYS)
                              or f" (allowed: {', '.join(SPEC_KEYS)})"))
    name = data.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", name or ""):
        raise ConfigError(f"{where}: 'name' must be a path-safe string (letters, digits, . _ -), got {name!r}")
    base = data.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError(f"{where}: 'base' must be a mapping (a run config), got {type(base).__name__}")
    match = data.get("match", "activated_flops")
    if match not in MATCH_RULES:
        raise ConfigError(f"{where}: match={match!r} is invalid: allowed: {', '.join(MATCH_RULES)}"
                          + (did_you_mean(str(match), MATCH_RULES) if isinstance(match, str) else ""))
    grid = data.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"{where}: 'grid' must be a non-empty mapping of axis -> list of values")
    clean: dict[str, list[Any]] = {}
    for axis, values in grid.items():
        if axis not in AXES and "." not in str(axis):
            raise ConfigError(f"{where}: unknown axis 'grid.{axis}'" + (did_you_mean(str(axis), AXES)
                              or f" (allowed: {', '.join(AXES)}, or a dotted config key such as moe.group_size)"))
        if not isinstance(values, list):
            values = [values]
        if not values:
            raise ConfigError(f"{where}: axis 'grid.{axis}' is empty; give at least one value")
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"{where}: axis 'grid.{axis}' repeats a value: {values}")
        clean[str(axis)] = values
    if "steps" in clean and "images" in clean:
        raise ConfigError(f"{where}: give either grid.steps or grid.images (a budget in images), not both")
    for r in clean.get("routing", []):
        if r not in ROUTINGS:
            raise ConfigError(f"{where}: grid.routing value {r!r} is invalid: allowed: {', '.join(ROUTINGS)}"
                              + did_you_mean(str(r), ROUTINGS))
    extra = {}
    for key in ("include", "exclude"):
        entries = data.get(key) or []
        if not isinstance(entries, list) or not all(isinstance(e, dict) and e for e in entries):
            raise ConfigError(f"{where}: '{key}' must be a list of mappings of axis -> value")
        for i, entry in enumerate(entries):
            for axis in entry:
                if axis not in clean and not (key == "include" and (axis in ("routing", *AXES)
                                                                   or variant_key(str(axis)) is not None)):
                    raise ConfigError(f"{where}: {key}[{i}] uses axis '{axis}', which is not in the grid"
                                      + did_you_mean(str(axis), clean))
        extra[key] = entries
    return StudySpec(name=name, base=base, grid=clean, match=match, description=str(data.get("description", "")),
                     raw=data, include=extra["include"], exclude=extra["exclude"])


def load_spec(path: str | Path) -> StudySpec:
    return parse_spec(load_yaml(path, what="study spec"), where=str(path))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        s = f"{v:g}"
    else:
        s = str(v)
    return re.sub(r"[^A-Za-z0-9.-]+", "", s.replace("+", ""))


def _applies(axis: str, routing: str) -> bool:
    if routing == "dense":
        return axis not in MOE_ONLY_AXES
    if axis in RACE_ONLY_AXES:
        return routing == "race"
    if routing in ("expert_choice", "race"):
        return axis not in TC_ONLY_AXES
    return axis not in GROUP_AXES


def make_sweep(spec: StudySpec) -> list[SweepPoint]:
    """Every point of the study, with its resolved and validated RunConfig (pure)."""
    axes = list(spec.grid)
    if "routing" not in spec.grid:
        axes.append("routing")
    grid = dict(spec.grid)
    grid.setdefault("routing", [spec.base.get("moe", {}).get("routing", "dense")])
    varying = {a for a, v in grid.items() if len(v) > 1}

    combos = [dict(zip(axes, combo)) for combo in itertools.product(*(grid[a] for a in axes))]
    combos = [c for c in combos if not any(all(c.get(a) == v for a, v in ex.items()) for ex in spec.exclude)]
    for inc in spec.include:
        combos.append({**{a: grid[a][0] for a in axes}, **inc})
    for inc in spec.include:
        for a in inc:
            if a not in axes:
                axes.append(a)
    seen: dict[tuple, SweepPoint] = {}
    for values in combos:
        routing = values["routing"]
        point_axes = {a: (v if _applies(a, routing) else None) for a, v in values.items()}
        # Collapsed axes (None) do not count: an include that names an axis the grid lacks collapses
        # onto the grid's point as well.
        key = tuple(sorted((a, repr(v)) for a, v in point_axes.items() if v is not None))
        if key in seen:
            continue  # collapsed duplicate (e.g. dense x several expert counts)
        cfg = _point_config(spec, point_axes, where=_describe(point_axes))
        seen[key] = SweepPoint(run_id="", axes=point_axes, config=cfg)
    points = list(seen.values())
    if spec.match == "activated_flops":
        _match_dense_flops(spec, points, grid)
    for p in points:
        p.run_id = _run_id(p.axes, varying)
        p.config.name = p.run_id
    ids = [p.run_id for p in points]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ConfigError(f"two sweep points get the same run id '{dup}': make the differing axis a named axis")
    return points


def _describe(point_axes: dict[str, Any]) -> str:
    return "point " + ", ".join(f"{a}={v}" for a, v in point_axes.items() if v is not None)


def _point_config(spec: StudySpec, point_axes: dict[str, Any], where: str) -> RunConfig:
    data = dict(spec.base)
    preset = None
    images = None
    for axis, value in point_axes.items():
        if value is None:
            continue
        if axis == "size":
            preset = value
            continue
        if axis == "images":
            images = value
            continue
        data = deep_merge(data, nest(AXES.get(axis, axis), value))
    try:
        cfg = resolve_config(preset=preset, base=data)
        if images is not None:
            if not isinstance(images, int) or images <= 0:
                raise ConfigError(f"grid.images value {images!r} is invalid: expected a positive integer")
            cfg.train.steps = -(-images // cfg.train.batch_size)
        return config_from_dict(cfg.to_dict())
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def _reference_moe(grid: dict[str, list[Any]]) -> dict[str, Any]:
    routings = grid["routing"]
    ref = "expert_choice" if "expert_choice" in routings else next((r for r in routings if r != "dense"), None)
    return {"routing": ref, **{a: grid[a][0] for a in grid if a in MOE_ONLY_AXES}}


def _match_dense_flops(spec: StudySpec, points: list[SweepPoint], grid: dict[str, list[Any]]) -> None:
    ref = _reference_moe(grid)
    if ref["routing"] is None:
        return  # no MoE point to match
    for p in points:
        if p.axes["routing"] != "dense":
            continue
        ref_axes = {**p.axes, **ref}
        ref_cfg = _point_config(spec, ref_axes, where=_describe(ref_axes) + " (FLOPs reference)")
        target = count(ref_cfg).flops_per_image
        p.config.moe.dense_width_mult = dense_width_for_flops(p.config, target)


def variant_key(axis: str) -> str | None:
    """The routing-variant key (`shared_experts`, ...) an axis sets, or None."""
    key = AXES.get(axis, axis)
    return key[4:] if key.startswith("moe.") and key[4:] in VARIANT_DEFAULTS else None


def _variants(point_axes: dict[str, Any]) -> dict[str, Any]:
    """The point's routing-variant values that differ from their defaults, by key."""
    out = {}
    for axis, value in point_axes.items():
        key = variant_key(axis)
        if key is not None and value is not None and value != VARIANT_DEFAULTS[key]:
            out[key] = value
    return out


def _variant_tags(variants: dict[str, Any]) -> list[str]:
    tags = []
    for key, tag in VARIANT_TAGS.items():
        if key in variants:
            value = variants[key]
            tags.append(tag.get(value, _fmt(value)) if isinstance(tag, dict) else f"{tag}{_fmt(value)}")
    return tags


def _run_id(point_axes: dict[str, Any], varying: set[str]) -> str:
    routing = point_axes["routing"]
    parts = [_fmt(point_axes.get("size") or "custom"), ROUTING_ABBREV[routing]]
    variants = _variants(point_axes) if routing != "dense" else {}
    schedule = variants.get("capacity_schedule")
    f_part = f"f{'_'.join(_fmt(float(v)) for v in schedule)}" if schedule else None
    if routing != "dense":
        if point_axes.get("num_experts") is not None:
            parts.append(f"e{_fmt(point_axes['num_experts'])}")
        if routing in ("expert_choice", "race") and (f_part or point_axes.get("capacity_factor") is not None):
            parts.append(f_part or f"f{_fmt(point_axes['capacity_factor'])}")
        if routing == "token_choice":
            if point_axes.get("top_k") is not None:
                parts.append(f"k{_fmt(point_axes['top_k'])}")
            if f_part:
                parts.append(f_part)
            elif "capacity_factor" in varying and point_axes.get("capacity_factor") is not None:
                parts.append(f"f{_fmt(point_axes['capacity_factor'])}")
        if "group_size" in varying and point_axes.get("group_size") is not None:
            parts.append(f"g{_fmt(point_axes['group_size'])}")
        for axis in sorted(GROUP_AXES):  # `-batch` always; `-image` only where the routing group varies
            value = point_axes.get(axis)
            if value is not None and (value == "batch" or axis in varying):
                parts.append(_fmt(value))
        parts += _variant_tags(variants)
    short = {"steps": "n", "images": "i", "lr": "lr"}
    for axis, value in point_axes.items():
        if axis in ("size", "routing", "num_experts", "capacity_factor", "top_k", "group_size", "seed", *GROUP_AXES):
            continue
        if variant_key(axis) is not None:
            continue
        if axis in varying and value is not None:
            parts.append(f"{short.get(axis, axis.split('.')[-1].replace('_', ''))}{_fmt(value)}")
    parts.append(f"s{_fmt(point_axes.get('seed', 0) if point_axes.get('seed') is not None else 0)}")
    return "-".join(parts)


def run_id_for_config(cfg: RunConfig) -> str:
    """The run id a single `ecdit train` gets by default, in the sweep's naming scheme."""
    m = cfg.moe
    axes: dict[str, Any] = {"size": cfg.preset or "custom", "routing": m.routing, "seed": cfg.train.seed}
    if m.is_moe:
        axes["num_experts"] = m.num_experts
        axes["capacity_factor"] = m.capacity_factor
        if m.routing == "token_choice":
            axes["top_k"] = m.top_k
        axes.update({key: getattr(m, key) for key in VARIANT_DEFAULTS})
    if m.routing_group == "batch":
        axes["routing_group"] = "batch"
    return _run_id(axes, varying=set())


# ----------------------------------------------------------------------------------------------
# Writing the study directory.


def manifest_csv(points: list[SweepPoint], axis_names: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["run_id", *axis_names, *ACCOUNTING_COLUMNS])
    writer.writeheader()
    for p in points:
        writer.writerow(p.manifest_row(axis_names))
    return buf.getvalue()


def axis_names(spec: StudySpec) -> list[str]:
    names = list(spec.grid)
    if "routing" not in names:
        names.insert(0, "routing")
    for inc in spec.include:
        names += [a for a in inc if a not in names]
    return names


def write_study(spec: StudySpec, points: list[SweepPoint], out: str | Path) -> list[str]:
    """Write study.yaml, manifest.csv and each point's config.yaml; returns warnings.

    Never overwrites the config of a run that already has results: a changed spec warns
    instead of silently mixing old and new runs.
    """
    out = Path(out)
    warnings: list[str] = []
    spec_text = yaml.safe_dump(spec.raw, sort_keys=False)
    old_spec = out / rundir.STUDY_SPEC
    if old_spec.exists() and yaml.safe_load(old_spec.read_text()) != spec.raw:
        warnings.append(f"{out} was generated from a different spec; runs with results keep their old config")
    kept_ids = set()
    for p in points:
        run_dir = out / rundir.RUNS / p.run_id
        cfg_path = run_dir / rundir.CONFIG
        if cfg_path.exists():
            try:
                old = load_run_config(cfg_path)
            except EcditError:
                old = None
            has_results = (run_dir / rundir.METRICS).exists() or (run_dir / rundir.CHECKPOINTS).exists()
            if old is not None and old.to_dict() != p.config.to_dict():
                if has_results:
                    warnings.append(
                        f"run {p.run_id} has results from a different config; it was not overwritten "
                        f"(delete {run_dir} to regenerate it)"
                    )
                    kept_ids.add(p.run_id)
                    continue
        atomic_write_text(cfg_path, p.config.to_yaml())
    existing = {d.name for d in (out / rundir.RUNS).iterdir()} if (out / rundir.RUNS).is_dir() else set()
    orphans = sorted(existing - {p.run_id for p in points})
    if orphans:
        warnings.append(f"{len(orphans)} run(s) in {out / rundir.RUNS} are not in the spec any more "
                        f"(kept, not in the manifest): {', '.join(orphans[:5])}")
    atomic_write_text(old_spec, spec_text)
    atomic_write_text(out / rundir.MANIFEST, manifest_csv(points, axis_names(spec)))
    return warnings


def launch_script(points: list[SweepPoint], nproc: int, hostfile: str | None, launcher: str = "deepspeed") -> str:
    """A shell script with one launcher command per point (run from any node seeing the study)."""
    from ecdit_cli.train.launch import launch_command

    lines = ["#!/usr/bin/env bash", "# Generated by `ecdit sweep`: one command per point; finished points are skipped.",
             "set -u", 'cd "$(dirname "$0")"', "status=0"]
    for p in points:
        cmd = launch_command(f"{rundir.RUNS}/{p.run_id}", nproc=nproc, hostfile=hostfile, launcher=launcher,
                             python="python")
        lines.append(" ".join(_shell_quote(c) for c in cmd) + " || status=1")
    lines.append("exit $status")
    return "\n".join(lines) + "\n"


def _shell_quote(s: str) -> str:
    import shlex

    return shlex.quote(s)
