"""Gather a study's runs into two tables: `runs.csv` (one row per run) and `curves.csv` (long).

`collect(dir)` reads the layout of `rundir.py`: the manifest gives each run's sweep axes and
parameter/FLOP accounting, `summary.json` its status and final numbers, `metrics.jsonl` its
curves and `eval.json` (when present; else the run's own GenEval of its final step,
`train.eval_every`) its GenEval-style scores. A single run directory is
accepted too: its axes then come from its config.yaml and the tables are written into it.
Beyond the listed columns, runs.csv has `val_t0..K-1` (the timesteps of `final_val_loss_t*`),
`eval_prompts_with_any_correct` and, when the eval computed them, `eval_fd_scenes` and
`eval_fd_scenes_floor`; when a run started from another's weights (`train.init_from`),
`init_from`, `init_flops` (the source run's training FLOPs) and `total_train_flops`.

Decisions:
- Runs are never dropped: pending, running, interrupted and failed runs keep their row and say
  so in `status` (failed ones with their `error`). For runs that are not done, the `final_*`
  columns hold the latest values logged so far.
- Corrupt or truncated metrics lines are skipped and reported in `warnings` (file and line).
- Duplicate steps (a run resumed from an earlier checkpoint re-logs them) keep the last record.
- A study in which no run has logged anything yet is an error ("nothing has been trained
  yet"), not a pair of header-only tables: there is nothing to plot or fit.
- Manifest points whose run directory does not exist are listed in `missing` and kept as
  pending rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ecdit_cli import rundir
from ecdit_cli.data.scenes import TAGS as EVAL_TASKS  # GenEval's six tasks, in its order
from ecdit_cli.errors import EcditError
from ecdit_cli.files import atomic_write_text, read_json
from ecdit_cli.study.labels import blank
from ecdit_cli.study.spec import ACCOUNTING_COLUMNS

RUNS_CSV = "runs.csv"
CURVES_CSV = "curves.csv"
# The manifest's accounting columns (not axes): what `ecdit sweep` derives for each point.
ACCOUNTING = ACCOUNTING_COLUMNS
CURVE_COLUMNS = ["run_id", "step", "images_seen", "flops", "metric", "value"]
# Record fields that index a curve rather than being a metric of it.
_INDEX_FIELDS = {"kind", "step", "images_seen", "flops", "val_t"}
# Where a manifest axis lives in config.yaml, for runs collected without a manifest row.
CONFIG_AXES: dict[str, tuple[str, ...]] = {
    "size": ("preset",),
    "routing": ("moe", "routing"),
    "num_experts": ("moe", "num_experts"),
    "capacity_factor": ("moe", "capacity_factor"),
    "top_k": ("moe", "top_k"),
    "steps": ("train", "steps"),
    "lr": ("train", "lr"),
    "seed": ("train", "seed"),
}


@dataclass
class CollectResult:
    """What `collect` found. `missing` lists manifest points without a run directory."""

    study_dir: Path
    runs: pd.DataFrame
    curves: pd.DataFrame
    axes: list[str]
    warnings: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    is_study: bool = True

    def status_counts(self) -> dict[str, int]:
        counts = {s: 0 for s in rundir.STATUSES}
        for s in self.runs["status"]:
            counts[s] = counts.get(s, 0) + 1
        return counts


def _num(v: Any) -> float:
    """A float from a JSON/CSV value; NaN for null, empty or non-numeric."""
    if v is None or isinstance(v, bool):
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _config_value(cfg: dict[str, Any], axis: str) -> Any:
    path = CONFIG_AXES.get(axis) or tuple(axis.split("."))
    node: Any = cfg
    for part in path:
        if not isinstance(node, dict) or part not in node:
            node = None
            break
        node = node[part]
    if node is None and len(path) == 1:
        # An axis named after a field of one section (e.g. `hidden_size`).
        hits = [sec[axis] for sec in cfg.values() if isinstance(sec, dict) and axis in sec]
        node = hits[0] if hits else None
    if axis == "size" and not node and isinstance(cfg.get("model"), dict):
        m = cfg["model"]
        node = f"d{m.get('hidden_size')}x{m.get('depth')}"
    return node


def _read_manifest(study: Path) -> tuple[list[dict[str, str]], list[str]]:
    if not rundir.is_study_dir(study):
        return [], list(CONFIG_AXES)
    rows, header = rundir.read_manifest(study)
    axes = [c for c in header if c != "run_id" and c not in ACCOUNTING]
    return rows, axes


def _load_config(run: Path, warnings: list[str]) -> dict[str, Any]:
    from ecdit_cli.config import load_yaml

    try:
        return load_yaml(run / rundir.CONFIG, what="run config")
    except EcditError as err:
        warnings.append(f"{run / rundir.CONFIG}: {err}")
        return {}


def _dedup(records: list[dict]) -> list[dict]:
    by_step: dict[Any, dict] = {}
    for rec in records:
        by_step[rec.get("step")] = rec
    return sorted(by_step.values(), key=lambda r: _num(r.get("step")))


def _curve_rows(run_id: str, records: Iterable[dict], flops_per_image: float, out: dict[str, list]) -> None:
    for rec in records:
        step, images = _num(rec.get("step")), _num(rec.get("images_seen"))
        flops = _num(rec.get("flops"))
        if math.isnan(flops) and not math.isnan(images):
            flops = 3.0 * flops_per_image * images  # forward + backward = 3x forward
        for key, v in rec.items():
            if key in _INDEX_FIELDS:
                continue
            values = [(f"{key}{i}", x) for i, x in enumerate(v)] if isinstance(v, list) else [(key, v)]
            for name, x in values:
                if isinstance(x, str):
                    continue
                out["run_id"].append(run_id)
                out["step"].append(step)
                out["images_seen"].append(images)
                out["flops"].append(flops)
                out["metric"].append(name)
                out["value"].append(_num(x))


def _read_eval(run: Path, warnings: list[str]) -> dict[str, float]:
    path = run / rundir.EVAL
    if not path.is_file():
        return {}
    try:
        ev = read_json(path, what="eval results")
    except EcditError as err:
        warnings.append(str(err))
        return {}
    if not isinstance(ev, dict):
        warnings.append(f"{path}: expected a JSON object, skipped")
        return {}
    out = {"eval_overall": _num(ev.get("overall"))}
    tasks = ev.get("tasks") if isinstance(ev.get("tasks"), dict) else {}
    for tag, score in tasks.items():
        out[f"eval_{tag}"] = _num(score)
    if "prompts_with_any_correct" in ev:
        out["eval_prompts_with_any_correct"] = _num(ev["prompts_with_any_correct"])
    for key in ("fd_scenes", "fd_scenes_floor"):
        if key in ev:
            out[f"eval_{key}"] = _num(ev[key])
    return out


def _final_eval_record(evals: list[dict], steps: float) -> dict[str, float]:
    """The eval_* columns from the run's in-training GenEval (`train.eval_every`) at its final step,
    for runs without an eval.json; {} when the run has not evaluated its final weights."""
    if not evals or _num(evals[-1].get("step")) != steps:
        return {}
    last = evals[-1]
    out = {"eval_overall": _num(last.get("geneval_overall"))}
    for tag in EVAL_TASKS:
        if f"geneval_{tag}" in last:
            out[f"eval_{tag}"] = _num(last[f"geneval_{tag}"])
    for key in ("fd_scenes", "fd_scenes_floor"):
        if key in last:
            out[f"eval_{key}"] = _num(last[key])
    return out


def _collect_run(
    run: Path, row: dict[str, Any], axes: list[str], warnings: list[str], curves: dict[str, list]
) -> dict[str, Any]:
    rid = row.get("run_id") or run.name
    cfg = _load_config(run, warnings)
    out: dict[str, Any] = {"run_id": rid}
    for a in axes:
        # A blank manifest cell means "not applicable" (num_experts of a dense run): keep it.
        out[a] = row[a] if a in row else _config_value(cfg, a)
    try:
        summary = rundir.read_summary(run) or {}
        status = rundir.run_status(run)
    except EcditError as err:
        warnings.append(f"{err}; status taken from the metrics")
        summary, status = {}, "pending"
    records = rundir.read_records(run, warnings=warnings)
    train, val, evals = (_dedup(records[k]) for k in ("train", "val", "eval"))
    if status == "pending" and (train or val):
        # Logged but no summary yet: the trainer died before its first summary write.
        status = "running" if rundir.lock_is_held(run) else "interrupted"
    for key in ACCOUNTING:
        s = _num(summary.get(key))
        out[key] = s if not math.isnan(s) else _num(row.get(key))

    # An upcycled run (train.init_from) starts from weights that cost init_flops to train:
    # total_train_flops is what a compute-matched comparison with a from-scratch run uses.
    out["init_from"] = summary.get("init_from") or ""
    init = _num(summary.get("init_flops"))
    out["init_flops"] = 0.0 if math.isnan(init) else init
    out["total_train_flops"] = out["train_flops"] + out["init_flops"]

    last_train = train[-1] if train else {}
    last_val = val[-1] if val else {}
    out["final_train_loss"] = _first(summary.get("final_train_loss"), last_train.get("train_loss"))
    out["final_val_loss"] = _first(summary.get("final_val_loss"), last_val.get("val_loss"))
    per_t = summary.get("final_val_loss_t")
    if not isinstance(per_t, list):
        per_t = [last_val[k] for k in sorted(last_val, key=_t_index) if _t_index(k) >= 0]
    val_t = summary.get("val_t") if isinstance(summary.get("val_t"), list) else last_val.get("val_t") or []
    out["_val_loss_t"] = [_num(v) for v in per_t]
    out["_val_t"] = [_num(v) for v in val_t]
    # A running trainer's summary can lag its metrics: take whichever got further.
    out["images_seen"] = _max_known(
        summary.get("images_seen"), last_train.get("images_seen"), last_val.get("images_seen")
    )
    out["step"] = _max_known(summary.get("step"), last_train.get("step"), last_val.get("step"))
    out["steps"] = _first(summary.get("steps"), row.get("steps"), _config_value(cfg, "steps"))
    out["wall_time_s"] = _first(summary.get("wall_time_s"), last_train.get("wall_time_s"))
    out["status"] = status
    out["error"] = summary.get("error") or ""
    out.update(_read_eval(run, warnings) or _final_eval_record(evals, out["steps"]))
    _curve_rows(rid, train + val + evals, out["flops_per_image"], curves)
    out["_logged"] = bool(train or val or summary)
    return out


def _t_index(key: str) -> int:
    tail = key[len("val_loss_t") :] if key.startswith("val_loss_t") else ""
    return int(tail) if tail.isdigit() else -1


def _first(*values: Any) -> float:
    for v in values:
        x = _num(v)
        if not math.isnan(x):
            return x
    return math.nan


def _max_known(*values: Any) -> float:
    known = [x for x in (_num(v) for v in values) if math.isfinite(x)]
    return max(known) if known else math.nan


def _runs_frame(rows: list[dict[str, Any]], axes: list[str]) -> pd.DataFrame:
    k = max((len(r["_val_loss_t"]) for r in rows), default=0)
    kt = max((len(r["_val_t"]) for r in rows), default=0)
    eval_cols = sorted({c for r in rows for c in r if c.startswith("eval_")}, key=_eval_order)
    upcycled = any(r.get("init_from") for r in rows)
    records = []
    for r in rows:
        rec = {c: r.get(c) for c in ["run_id", *axes, *ACCOUNTING, "final_train_loss", "final_val_loss"]}
        for i in range(k):
            rec[f"final_val_loss_t{i}"] = r["_val_loss_t"][i] if i < len(r["_val_loss_t"]) else math.nan
        for i in range(kt):
            rec[f"val_t{i}"] = r["_val_t"][i] if i < len(r["_val_t"]) else math.nan
        for c in ("images_seen", "step", "steps", "wall_time_s", "status", "error"):
            rec[c] = r[c]
        if upcycled:
            for c in ("init_from", "init_flops", "total_train_flops"):
                rec[c] = r.get(c, "" if c == "init_from" else math.nan)
        for c in eval_cols:
            rec[c] = r.get(c, math.nan)
        records.append(rec)
    df = pd.DataFrame.from_records(records)
    for a in axes:
        # Manifest cells are text: give numeric axes the dtype a CSV round trip would give them.
        col = df[a].map(lambda v: math.nan if blank(v) else v)
        num = pd.to_numeric(col, errors="coerce")
        df[a] = num if num.notna().sum() == col.notna().sum() else col
    return df


def _eval_order(col: str) -> tuple[int, str]:
    tag = col[len("eval_") :]
    order = ["overall", *EVAL_TASKS, "prompts_with_any_correct"]
    return (order.index(tag) if tag in order else len(order), tag)


def collect(path: str | Path, write: bool = True) -> CollectResult:
    """Read a study (or one run) directory; with `write`, save runs.csv and curves.csv into it."""
    root = rundir.require_dir(path, "study directory")
    warnings: list[str] = []
    missing: list[str] = []
    if rundir.is_study_dir(root) or (root / rundir.RUNS).is_dir():
        is_study = True
        manifest, axes = _read_manifest(root)
        dirs = {p.name: p for p in rundir.run_dirs(root)}
        points = [(row["run_id"], row) for row in manifest]
        listed = {rid for rid, _ in points}
        points += [(name, {"run_id": name}) for name in dirs if name not in listed]
        if not points:
            raise EcditError(
                f"study {root} has no runs: its manifest is empty and {root / rundir.RUNS} holds none"
            )
    elif rundir.is_run_dir(root):
        is_study, axes, dirs = False, list(CONFIG_AXES), {root.name: root}
        points = [(root.name, {"run_id": root.name})]
    else:
        raise EcditError(
            f"{root} is neither a study directory (no {rundir.MANIFEST}) nor a run directory (no {rundir.CONFIG})"
        )

    curves: dict[str, list] = {c: [] for c in CURVE_COLUMNS}
    rows = []
    for rid, row in points:
        run = dirs.get(rid)
        if run is None:
            missing.append(rid)
            warnings.append(f"{rid}: in the manifest but {root / rundir.RUNS / rid} does not exist")
            rows.append(_placeholder(rid, row, axes))
            continue
        rows.append(_collect_run(run, row, axes, warnings, curves))
    if not any(r["_logged"] for r in rows):
        raise EcditError(
            f"nothing has been trained yet in {root}: all {len(rows)} run(s) are pending "
            f"(start them with `ecdit train --sweep {root}`)"
        )
    runs = _runs_frame(rows, axes)
    curves_df = pd.DataFrame(curves, columns=CURVE_COLUMNS)
    result = CollectResult(root, runs, curves_df, axes, warnings, missing, is_study)
    if write:
        write_tables(result)
    return result


def _placeholder(rid: str, row: dict[str, Any], axes: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"run_id": rid, **{a: row.get(a) for a in axes}}
    out.update({k: _num(row.get(k)) for k in ACCOUNTING})
    out.update(final_train_loss=math.nan, final_val_loss=math.nan, _val_loss_t=[], _val_t=[])
    out.update(images_seen=math.nan, step=math.nan, steps=_num(row.get("steps")), wall_time_s=math.nan)
    out.update(status="pending", error="", _logged=False)
    return out


def write_tables(result: CollectResult) -> tuple[Path, Path]:
    runs_path, curves_path = result.study_dir / RUNS_CSV, result.study_dir / CURVES_CSV
    atomic_write_text(runs_path, result.runs.to_csv(index=False))
    atomic_write_text(curves_path, result.curves.to_csv(index=False))
    return runs_path, curves_path


# ----------------------------------------------------------------------------------------------
# Reading collected tables back, and deciding when they are stale.


def _inputs(root: Path) -> list[Path]:
    files = [root / rundir.MANIFEST]
    dirs = rundir.run_dirs(root) if (root / rundir.RUNS).is_dir() else [root]
    for d in dirs:
        files += [d / rundir.METRICS, d / rundir.SUMMARY, d / rundir.EVAL, d / rundir.CONFIG]
    return [f for f in files if f.is_file()]


def needs_collect(path: str | Path) -> bool:
    """True when runs.csv or curves.csv is missing or older than any input file."""
    root = rundir.require_dir(path, "study directory")
    outs = [root / RUNS_CSV, root / CURVES_CSV]
    if not all(p.is_file() for p in outs):
        return True
    written = min(p.stat().st_mtime for p in outs)
    return any(f.stat().st_mtime > written for f in _inputs(root))


def read_collected(path: str | Path) -> CollectResult:
    """runs.csv + curves.csv as written by `collect` (no warnings: those belong to collecting)."""
    root = rundir.require_dir(path, "study directory")
    tables = []
    for name in (RUNS_CSV, CURVES_CSV):
        p = root / name
        if not p.is_file():
            raise EcditError(f"{p} not found: run `ecdit collect {root}` first")
        try:
            tables.append(pd.read_csv(p, keep_default_na=True))
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
            raise EcditError(f"{p} is not a readable CSV ({err}); re-run `ecdit collect {root}`") from None
    runs, curves = tables
    for col in ("run_id", "status", "params_total"):
        if col not in runs.columns:
            raise EcditError(f"{root / RUNS_CSV} has no {col} column; re-run `ecdit collect {root}`")
    cols = list(runs.columns)
    # Axes sit between run_id and the first accounting column (dense_width_mult, params_total, ...).
    first = min(cols.index(c) for c in ACCOUNTING if c in cols)
    axes = cols[cols.index("run_id") + 1 : first]
    runs["error"] = runs["error"].fillna("").astype(str) if "error" in runs else ""
    is_study = (root / rundir.RUNS).is_dir()
    missing = [r for r in runs["run_id"] if is_study and not (root / rundir.RUNS / str(r)).is_dir()]
    return CollectResult(root, runs, curves, axes, [], missing, is_study)


def load(path: str | Path, recollect: bool | None = None) -> CollectResult:
    """Collect when asked (True), never (False), or when the tables are stale (None)."""
    if recollect or (recollect is None and needs_collect(path)):
        return collect(path)
    return read_collected(path)
