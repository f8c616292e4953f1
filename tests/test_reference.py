"""The committed studies (docs/reference/, docs/routing-variants/) are reproducible from their own tables."""

import shutil
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
REFERENCE = DOCS / "reference"
STUDIES = [REFERENCE, DOCS / "routing-variants"]
TABLES = ("study.yaml", "manifest.csv", "runs.csv", "curves.csv")


def _tables(report: str) -> list[str]:
    return [line for line in report.splitlines() if line.startswith("|")]


@pytest.mark.parametrize("committed", STUDIES, ids=lambda p: p.name)
def test_plot_on_the_committed_tables_regenerates_the_committed_report_tables(committed, tmp_path, capsys):
    from ecdit_cli.cli import main

    if not (committed / "report.md").is_file():
        pytest.skip(f"no committed study in {committed}")
    study = tmp_path / committed.name
    study.mkdir()
    for name in TABLES:
        shutil.copy(committed / name, study / name)
    if (committed / "analyze").is_dir():
        shutil.copytree(committed / "analyze", study / "analyze")
    try:
        main(["plot", str(study), "--no-collect"])
    except SystemExit as e:
        assert not e.code, capsys.readouterr().err
    want, regenerated = _tables((committed / "report.md").read_text()), _tables((study / "report.md").read_text())
    assert len(want) > 100  # fits, held-out checks, gaps, findings, per-run numbers
    assert regenerated == want


@pytest.mark.parametrize("committed", STUDIES, ids=lambda p: p.name)
def test_the_committed_records_are_the_studys_points_and_carry_no_weights(committed):
    import pandas as pd

    if not (committed / "runs.csv").is_file():
        pytest.skip(f"no committed study in {committed}")
    runs = pd.read_csv(committed / "runs.csv")
    assert (runs["status"] == "done").all() and len(runs) == len(pd.read_csv(committed / "manifest.csv"))
    kept = {p.name for p in (committed / "runs").iterdir()}
    assert kept == set(runs["run_id"])
    files = {f.name for f in (committed / "runs").rglob("*") if f.is_file()}
    assert files <= {"config.yaml", "metrics.jsonl", "summary.json", "eval.json"}
