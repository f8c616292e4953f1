"""The committed reference study (docs/reference/) is reproducible from its own tables."""

import shutil
from pathlib import Path

import pytest

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "reference"
TABLES = ("study.yaml", "manifest.csv", "runs.csv", "curves.csv")


def _tables(report: str) -> list[str]:
    return [line for line in report.splitlines() if line.startswith("|")]


@pytest.mark.skipif(not (REFERENCE / "report.md").is_file(), reason="no committed reference study")
def test_plot_on_the_committed_tables_regenerates_the_committed_report_tables(tmp_path, capsys):
    from ecdit_cli.cli import main

    study = tmp_path / "reference"
    study.mkdir()
    for name in TABLES:
        shutil.copy(REFERENCE / name, study / name)
    shutil.copytree(REFERENCE / "analyze", study / "analyze")
    try:
        main(["plot", str(study), "--no-collect"])
    except SystemExit as e:
        assert not e.code, capsys.readouterr().err
    committed, regenerated = _tables((REFERENCE / "report.md").read_text()), _tables((study / "report.md").read_text())
    assert len(committed) > 100  # fits, held-out checks, gaps, findings, per-run numbers
    assert regenerated == committed


def test_the_committed_records_are_the_studys_points_and_carry_no_weights():
    import pandas as pd

    runs = pd.read_csv(REFERENCE / "runs.csv")
    assert (runs["status"] == "done").all() and len(runs) == len(pd.read_csv(REFERENCE / "manifest.csv"))
    kept = {p.name for p in (REFERENCE / "runs").iterdir()}
    assert kept == set(runs["run_id"])
    files = {f.name for f in (REFERENCE / "runs").rglob("*") if f.is_file()}
    assert files <= {"config.yaml", "metrics.jsonl", "summary.json", "eval.json"}
