"""Compute allocation in a study: `ecdit analyze` results of its expert-choice runs, side by side.

A study report reads every `STUDY/analyze/RUN_ID/analyze.json` (written by
`ecdit analyze STUDY/runs/RUN_ID -o STUDY/analyze/RUN_ID`) and tabulates, per MoE layer, the
mean experts per object token and per background token on rendered ground-truth scenes (averaged
over the analysed timesteps), their ratio, and the coefficient of variation of experts per token
(how unevenly a layer spends its slots). Runs that differ only by seed are pooled: the table then
gives the mean and standard deviation over seeds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from ecdit_cli.study.gaps import sample_sd
from ecdit_cli.study.labels import REPLICATE_AXES

ANALYZE_DIR = "analyze"
ANALYZE_JSON = "analyze.json"
COLUMNS = ["run_id", "block", "layer_index", "layers", "object_mean", "background_mean", "ratio", "cv",
           "object_tokens", "background_tokens"]  # fmt: skip


def analyze_files(study_dir: Path) -> list[Path]:
    return sorted((study_dir / ANALYZE_DIR).glob(f"*/{ANALYZE_JSON}"))


def _mean(values) -> float:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    return float(v.mean()) if v.size else math.nan


def layer_table(study_dir: Path) -> tuple[pd.DataFrame, list[str]]:
    """One row per (analysed run, MoE layer); plus a warning per unreadable or non-EC file."""
    rows, warnings = [], []
    for path in analyze_files(study_dir):
        try:
            doc = json.loads(path.read_text())
            gt = doc["ground_truth"]
        except (OSError, ValueError, KeyError) as err:
            warnings.append(f"{path}: not an `ecdit analyze` result ({err})")
            continue
        if doc.get("routing") != "expert_choice":
            continue  # token choice's allocation is fixed at top-k: nothing to compare
        layers = gt["layers"]
        for i, layer in enumerate(layers):
            obj, bg = _mean(layer["object_mean"]), _mean(layer["background_mean"])
            rows.append([doc["run_id"], layer["block"], i, len(layers), obj, bg,
                         obj / bg if bg > 0 else math.nan, _mean(layer["cv"]),
                         gt.get("object_tokens"), gt.get("background_tokens")])  # fmt: skip
    return pd.DataFrame(rows, columns=COLUMNS), warnings


def pooled(layers: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Layer rows pooled over runs that differ only by seed: mean and sd per (group, block)."""
    if layers.empty:
        return pd.DataFrame(columns=["group", "block", "layers", "n", "runs", "object_mean", "background_mean",
                                     "ratio_mean", "ratio_sd", "cv_mean", "cv_sd"])  # fmt: skip
    seed = next((c for c in REPLICATE_AXES if c in runs.columns), None)
    group_of = {}
    for r in runs.itertuples():
        rid = str(r.run_id)
        s = getattr(r, seed) if seed else None
        group_of[rid] = rid.removesuffix(f"-s{int(s)}") if s is not None and not pd.isna(s) else rid
    tagged = layers.assign(group=layers["run_id"].map(lambda r: group_of.get(r, r)))
    rows = []
    for (group, block), g in tagged.groupby(["group", "block"], sort=False):
        rows.append([group, block, int(g["layers"].iloc[0]), len(g), ", ".join(g["run_id"]),
                     float(g["object_mean"].mean()), float(g["background_mean"].mean()),
                     float(g["ratio"].mean()), sample_sd(g["ratio"]), float(g["cv"].mean()), sample_sd(g["cv"])])  # fmt: skip
    return pd.DataFrame(rows, columns=["group", "block", "layers", "n", "runs", "object_mean", "background_mean",
                                       "ratio_mean", "ratio_sd", "cv_mean", "cv_sd"])  # fmt: skip
