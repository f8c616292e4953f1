import json
import os
import time

import pandas as pd
import pytest
from fixtures_study import STEPS, VAL_T, make_study
from typer.testing import CliRunner

from ecdit_cli import cli
from ecdit_cli.errors import EcditError
from ecdit_cli.lock import RunLock
from ecdit_cli.study.collect import CURVE_COLUMNS, collect, needs_collect, read_collected
from ecdit_cli.study.fit import fit_power_law


@pytest.fixture
def study(tmp_path):
    return make_study(tmp_path / "study")


def test_collect_keeps_running_failed_and_pending_runs_and_marks_them(study):
    with RunLock(study.root / "runs" / study.running / ".lock"):
        result = collect(study.root)
    runs = result.runs.set_index("run_id")
    assert len(runs) == len(study.run_ids)
    assert runs.loc[study.running, "status"] == "running"
    assert runs.loc[study.running, "step"] == 100
    assert runs.loc[study.failed, "status"] == "failed"
    assert "non-finite loss" in runs.loc[study.failed, "error"]
    assert runs.loc[study.pending, "status"] == "pending"
    assert (runs.loc[study.done, "status"] == "done").all()
    assert result.status_counts() == {"pending": 1, "running": 1, "done": 10, "failed": 1, "interrupted": 0}


def test_truncated_metrics_line_is_skipped_with_a_warning_naming_file_and_line(study):
    result = collect(study.root)
    metrics = study.root / "runs" / study.truncated / "metrics.jsonl"
    n_lines = len(metrics.read_text().splitlines())
    assert any(str(metrics) in w and f"line {n_lines}" in w for w in result.warnings)
    curve = result.curves[result.curves["run_id"] == study.truncated]
    assert curve["step"].max() == 100


def test_a_running_run_whose_trainer_died_reads_as_interrupted(study):
    runs = collect(study.root).runs.set_index("run_id")
    assert runs.loc[study.running, "status"] == "interrupted"


def test_runs_csv_has_axes_accounting_finals_per_timestep_and_eval_columns(study):
    collect(study.root)
    runs = pd.read_csv(study.root / "runs.csv")
    cols = list(runs.columns)
    assert cols[:9] == [
        "run_id",
        "size",
        "routing",
        "num_experts",
        "capacity_factor",
        "top_k",
        "steps",
        "lr",
        "seed",
    ]
    for c in ["params_total", "params_active", "flops_per_image", "train_flops", "final_train_loss",
              "final_val_loss", "images_seen", "step", "wall_time_s", "status", "error", "eval_overall",
              "eval_counting", "eval_color_attr"]:  # fmt: skip
        assert c in cols
    assert [f"final_val_loss_t{i}" for i in range(len(VAL_T))] == [
        c for c in cols if c.startswith("final_val_loss_t")
    ]
    done = runs[runs["status"] == "done"]
    assert done["eval_overall"].notna().all()
    summary = json.loads((study.root / "runs" / study.done[0] / "summary.json").read_text())
    row = runs.set_index("run_id").loc[study.done[0]]
    assert row["final_val_loss"] == pytest.approx(summary["final_val_loss"])
    assert row["final_val_loss_t3"] == pytest.approx(summary["final_val_loss_t"][3])
    assert row["params_active"] == summary["params_active"]


def test_curves_csv_is_long_format_and_round_trips_through_pandas(study):
    result = collect(study.root)
    curves = pd.read_csv(study.root / "curves.csv")
    assert list(curves.columns) == CURVE_COLUMNS
    pd.testing.assert_frame_equal(curves, result.curves, check_dtype=False)
    one = curves[curves["run_id"] == study.done[0]]
    assert {"train_loss", "loss", "val_loss", "val_loss_t0", "lr", "grad_norm"} <= set(one["metric"])
    assert len(one[one["metric"] == "train_loss"]) == STEPS // 10
    ec = curves[curves["run_id"] == study.run_ids[("S", "expert_choice")]]
    assert {"ec_experts_per_token_mean", "ec_unrouted_frac"} <= set(ec["metric"])
    assert not one.duplicated(["step", "metric"]).any()


def test_collect_accepts_a_single_run_directory(study):
    run = study.root / "runs" / study.done[0]
    result = collect(run)
    assert not result.is_study
    assert result.runs["run_id"].tolist() == [study.done[0]]
    assert result.runs.loc[0, "routing"] == "dense"
    assert result.runs.loc[0, "size"] == "S"
    assert (run / "runs.csv").is_file() and (run / "curves.csv").is_file()


def test_a_resumed_run_keeps_the_last_record_of_a_repeated_step(study):
    metrics = study.root / "runs" / study.done[0] / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write(
            json.dumps({"kind": "train", "step": 200, "images_seen": 6400, "flops": 1.0, "train_loss": 0.123})
            + "\n"
        )
    curves = collect(study.root).curves
    last = curves[
        (curves["run_id"] == study.done[0]) & (curves["metric"] == "train_loss") & (curves["step"] == 200)
    ]
    assert last["value"].tolist() == [0.123]


def test_a_manifest_point_without_run_directory_is_listed_as_missing(study):
    import shutil

    shutil.rmtree(study.root / "runs" / study.pending)
    result = collect(study.root)
    assert result.missing == [study.pending]
    assert result.runs.set_index("run_id").loc[study.pending, "status"] == "pending"


def test_tables_become_stale_when_a_metrics_file_changes(study):
    collect(study.root)
    assert not needs_collect(study.root)
    metrics = study.root / "runs" / study.done[0] / "metrics.jsonl"
    later = time.time() + 5
    os.utime(metrics, (later, later))
    assert needs_collect(study.root)
    assert read_collected(study.root).axes[:2] == ["size", "routing"]


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(EcditError, match="not found"):
        collect(tmp_path / "nope")


def test_a_directory_that_is_neither_study_nor_run_is_a_clear_error(tmp_path):
    with pytest.raises(EcditError, match="neither a study directory"):
        collect(tmp_path)


def test_a_study_where_nothing_has_been_trained_is_a_clear_error(tmp_path):
    fx = make_study(tmp_path / "s", sizes=("S",), extras=False)
    for rid in fx.done:
        for name in ("metrics.jsonl", "summary.json", "eval.json"):
            (fx.root / "runs" / rid / name).unlink()
    with pytest.raises(EcditError, match="nothing has been trained yet"):
        collect(fx.root)
    assert not (fx.root / "runs.csv").exists()


def test_an_empty_manifest_is_a_clear_error(tmp_path):
    (tmp_path / "manifest.csv").write_text("run_id,size,routing\n")
    with pytest.raises(EcditError, match="has no runs"):
        collect(tmp_path)


# ---------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def runner():
    cli._register()
    return CliRunner()


def test_cli_collect_writes_tables_and_prints_runs_by_status(runner, study):
    res = runner.invoke(cli.app, ["collect", str(study.root)])
    assert res.exit_code == 0, res.output
    assert (study.root / "runs.csv").is_file() and (study.root / "curves.csv").is_file()
    for word in ("done", "failed", "pending", "interrupted", "truncated line"):
        assert word in res.output


def test_cli_collect_of_a_missing_directory_exits_2_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["collect", str(tmp_path / "nope")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not found" in err


def test_cli_fit_prints_json_per_group_matching_the_fitter(runner, study):
    collect(study.root)
    args = ["fit", str(study.root / "runs.csv"), "--x", "params_active", "--y", "final_val_loss",
            "--group", "routing", "--json", "--n-boot", "30", "--seed", "3"]  # fmt: skip
    res = runner.invoke(cli.app, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    fits = {f["group"]: f for f in out["fits"]}
    assert set(fits) == {"dense", "token_choice", "expert_choice"}
    runs = pd.read_csv(study.root / "runs.csv")
    dense = runs[(runs["routing"] == "dense") & (runs["status"] == "done")]
    direct = fit_power_law(dense["params_active"], dense["final_val_loss"], n_boot=30, seed=3)
    assert fits["dense"]["alpha"] == pytest.approx(direct.alpha)
    assert fits["dense"]["E_lo"] == pytest.approx(direct.ci["E"][0])


def test_cli_fit_prints_a_table_on_any_csv(runner, tmp_path):
    import numpy as np

    x = np.geomspace(1e6, 1e9, 6)
    pd.DataFrame({"n": x, "loss": 1.5 + 40 * x**-0.25}).to_csv(tmp_path / "t.csv", index=False)
    res = runner.invoke(
        cli.app, ["fit", str(tmp_path / "t.csv"), "--x", "n", "--y", "loss", "--n-boot", "20"]
    )
    assert res.exit_code == 0, res.output
    assert "0.25" in res.stdout and "1.5" in res.stdout


def test_cli_fit_with_an_unknown_column_exits_2_with_one_line(study, capsys):
    collect(study.root)
    with pytest.raises(SystemExit) as exc:
        cli.main(["fit", str(study.root / "runs.csv"), "--x", "params_activ", "--y", "final_val_loss"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "params_active" in err


def test_tables_read_back_have_the_axes_they_were_collected_with(study):
    # The accounting columns (dense_width_mult first) are not axes: an axis would split series.
    collected = collect(study.root)
    assert read_collected(study.root).axes == collected.axes
    assert "dense_width_mult" not in collected.axes


def test_a_run_without_eval_json_takes_its_scores_from_its_own_final_step_eval(study):
    # train.eval_every logs GenEval (and FD-scenes with train.eval_fd) as records of kind "eval";
    # only the one at the final step stands for the run, and an eval.json still wins.
    rid, other = study.done[0], study.done[1]
    for r in (rid, other):
        (study.root / "runs" / r / "eval.json").unlink(missing_ok=True)
        metrics = study.root / "runs" / r / "metrics.jsonl"
        kept = [ln for ln in metrics.read_text().splitlines() if json.loads(ln)["kind"] != "eval"]
        metrics.write_text("\n".join(kept) + "\n")
        with open(metrics, "a") as f:
            for step, score in ((STEPS // 2, 0.1), (STEPS if r == rid else STEPS - 1, 0.25)):
                f.write(json.dumps({"kind": "eval", "step": step, "geneval_overall": score,
                                    "geneval_counting": score / 2, "fd_scenes": 40.0 + step,
                                    "fd_scenes_floor": 3.0}) + "\n")
    runs = collect(study.root).runs.set_index("run_id")
    assert runs.loc[rid, "eval_overall"] == 0.25 and runs.loc[rid, "eval_counting"] == 0.125
    assert runs.loc[rid, "eval_fd_scenes"] == 40.0 + STEPS and runs.loc[rid, "eval_fd_scenes_floor"] == 3.0
    assert pd.isna(runs.loc[other, "eval_overall"])  # its last eval was not at the final step
    with_json = [r for r in study.done if (study.root / "runs" / r / "eval.json").exists()]
    assert with_json and runs.loc[with_json, "eval_overall"].notna().all()
