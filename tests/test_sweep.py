"""Study specs -> points, compute matching, the study directory, and running a study resumably."""

import csv
import json

import pytest
import yaml

from ecdit_cli import rundir
from ecdit_cli.config import load_run_config
from ecdit_cli.errors import ConfigError
from ecdit_cli.model.accounting import count
from ecdit_cli.study.spec import load_spec, make_sweep, parse_spec, write_study

SPEC = {
    "name": "t",
    "base": {"train": {"batch_size": 8, "warmup_steps": 2, "log_every": 2, "val_every": 4, "ckpt_every": 2,
                       "val_timesteps": 2},
             "data": {"val_size": 8}},
    "match": "activated_flops",
    "grid": {"size": ["debug", "tiny"], "routing": ["dense", "token_choice", "expert_choice"],
             "num_experts": [4, 8], "capacity_factor": [2.0], "top_k": [1, 2], "steps": [4], "seed": [0]},
}


def _spec(**changes):
    data = json.loads(json.dumps(SPEC))
    for key, value in changes.items():
        node = data
        parts = key.split("__")
        for p in parts[:-1]:
            node = node[p]
        if value is None:
            node.pop(parts[-1], None)
        else:
            node[parts[-1]] = value
    return data


def test_axes_that_do_not_apply_to_a_routing_are_collapsed_not_multiplied():
    points = make_sweep(parse_spec(_spec()))
    ids = [p.run_id for p in points]
    # Per size: 1 dense + TC (2 experts x 2 top_k) + EC (2 experts) = 7.
    assert len(points) == 14
    assert ids[:7] == ["debug-dense-s0", "debug-tc-e4-k1-s0", "debug-tc-e4-k2-s0", "debug-tc-e8-k1-s0",
                       "debug-tc-e8-k2-s0", "debug-ec-e4-f2-s0", "debug-ec-e8-f2-s0"]
    dense = points[0]
    assert dense.axes["num_experts"] is None and dense.axes["top_k"] is None
    assert all(p.axes["top_k"] is None for p in points if p.config.moe.routing == "expert_choice")


def test_the_same_spec_gives_the_same_points_and_ids():
    a = make_sweep(parse_spec(_spec()))
    b = make_sweep(parse_spec(_spec()))
    assert [p.run_id for p in a] == [p.run_id for p in b]
    assert [p.config for p in a] == [p.config for p in b]
    assert all(p.config.name == p.run_id for p in a)


def test_activated_flops_matching_gives_dense_the_flops_of_the_reference_expert_choice_point():
    points = {p.run_id: p for p in make_sweep(parse_spec(_spec()))}
    for size in ("debug", "tiny"):
        dense = count(points[f"{size}-dense-s0"].config).flops_per_image
        ref = count(points[f"{size}-ec-e4-f2-s0"].config).flops_per_image  # first num_experts, EC
        assert dense == pytest.approx(ref, rel=2e-3)
        assert points[f"{size}-dense-s0"].config.moe.dense_width_mult > 1.3


def test_backbone_matching_keeps_the_dense_backbone():
    points = make_sweep(parse_spec(_spec(match="backbone")))
    assert points[0].config.moe.dense_width_mult == 1.0


def test_an_images_budget_becomes_steps_and_varying_axes_enter_the_id():
    spec = _spec(grid__steps=None, grid__images=[64, 96], grid__lr=[1e-3, 3e-3])
    points = make_sweep(parse_spec(spec))
    p = next(p for p in points if p.run_id == "debug-ec-e4-f2-i96-lr0.003-s0")
    assert p.config.train.steps == 12 and p.config.train.lr == 3e-3


@pytest.mark.parametrize("changes,message", [
    ({"grid__sizes": ["debug"]}, "unknown axis 'grid.sizes' (did you mean 'size'?)"),
    ({"grid__size": ["huge"]}, "unknown preset 'huge'"),
    ({"grid__steps": ["many"]}, "train.steps='many' is invalid: expected an integer"),
    ({"grid__routing": []}, "axis 'grid.routing' is empty"),
    ({"grid": {}}, "'grid' must be a non-empty mapping"),
    ({"grid__routing": ["expert"]}, "grid.routing value 'expert' is invalid"),
    ({"grid__top_k": [9]}, "point size=debug, routing=token_choice, num_experts=4, capacity_factor=2.0, top_k=9"),
    ({"match": "flops"}, "match='flops' is invalid: allowed: activated_flops, backbone"),
    ({"mach": "flops"}, "unknown key 'mach' (did you mean 'match'?)"),
    ({"base__train__lrr": 1}, "unknown config key 'train.lrr'"),
    ({"name": "a b"}, "'name' must be a path-safe string"),
])
def test_spec_errors_get_one_line_naming_the_key(changes, message):
    with pytest.raises(ConfigError) as err:
        make_sweep(parse_spec(_spec(**changes)))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_study_directory_round_trips_through_its_manifest_and_configs(tmp_path):
    spec = parse_spec(_spec())
    points = make_sweep(spec)
    assert write_study(spec, points, tmp_path) == []
    with open(tmp_path / rundir.MANIFEST) as f:
        rows = list(csv.DictReader(f))
    assert [r["run_id"] for r in rows] == [p.run_id for p in points]
    assert set(rows[0]) >= {"run_id", "size", "routing", "num_experts", "capacity_factor", "top_k", "steps",
                            "seed", "params_total", "params_active", "flops_per_image", "train_flops"}
    for r, p in zip(rows, points):
        assert load_run_config(tmp_path / rundir.RUNS / r["run_id"]) == p.config
        assert int(r["params_total"]) == count(p.config).params_total
    assert yaml.safe_load((tmp_path / rundir.STUDY_SPEC).read_text()) == spec.raw


def test_a_changed_spec_does_not_overwrite_runs_that_have_results(tmp_path):
    spec = parse_spec(_spec())
    write_study(spec, make_sweep(spec), tmp_path)
    (tmp_path / rundir.RUNS / "debug-ec-e4-f2-s0" / rundir.METRICS).write_text("{}\n")
    changed = parse_spec(_spec(base__train__batch_size=16))
    warnings = write_study(changed, make_sweep(changed), tmp_path)
    assert any("different spec" in w for w in warnings)
    assert any("debug-ec-e4-f2-s0 has results from a different config" in w for w in warnings)
    assert load_run_config(tmp_path / rundir.RUNS / "debug-ec-e4-f2-s0").train.batch_size == 8
    assert load_run_config(tmp_path / rundir.RUNS / "debug-ec-e8-f2-s0").train.batch_size == 16


def test_shipped_study_specs_generate(tmp_path):
    from pathlib import Path

    root = Path(__file__).parent.parent / "sweeps"
    names = sorted(p.name for p in root.glob("*.yaml"))
    assert {"demo.yaml", "cpu-scaling.yaml", "capacity.yaml", "paper.yaml"} <= set(names)
    for name in names:
        points = make_sweep(load_spec(root / name))
        assert points, name
    demo = make_sweep(load_spec(root / "demo.yaml"))
    assert {p.config.moe.routing for p in demo} == {"dense", "token_choice", "expert_choice"}
    assert len({p.axes["size"] for p in demo}) >= 3
    scaling = make_sweep(load_spec(root / "cpu-scaling.yaml"))
    assert len({p.axes["size"] for p in scaling}) >= 4 and len({p.axes.get("num_experts") for p in scaling} - {None}) >= 2
    capacity = make_sweep(load_spec(root / "capacity.yaml"))
    assert {p.config.moe.capacity_factor for p in capacity} >= {0.5, 1.0, 2.0, 4.0}


def _main(args, capsys):
    from ecdit_cli.cli import main

    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def test_training_a_study_skips_done_points_resumes_partial_ones_and_continues_past_failures(tmp_path, capsys):
    spec_file = tmp_path / "s.yaml"
    data = _spec(grid__size=["debug"], grid__num_experts=[4], grid__top_k=[2])
    data["grid"]["data.min_objects"] = [1]
    spec_file.write_text(yaml.safe_dump(data))
    study = tmp_path / "study"
    code, out, err = _main(["sweep", str(spec_file), "-o", str(study)], capsys)
    assert code == 0, err
    ids = [r["run_id"] for r in csv.DictReader(open(study / rundir.MANIFEST))]
    assert ids == ["debug-dense-s0", "debug-tc-e4-k2-s0", "debug-ec-e4-f2-s0"]
    # Break one point's config (a data folder that does not exist) so that it fails.
    bad = study / rundir.RUNS / "debug-tc-e4-k2-s0" / rundir.CONFIG
    bad.write_text(bad.read_text().replace("source: scenes", "source: folder").replace("path: ''", "path: /nonexistent"))
    code, out, err = _main(["train", "--sweep", str(study), "--quiet"], capsys)
    assert code == 1
    assert "1 point(s) failed: debug-tc-e4-k2-s0" in err
    states = {i: rundir.run_status(study / rundir.RUNS / i) for i in ids}
    assert states == {"debug-dense-s0": "done", "debug-tc-e4-k2-s0": "failed", "debug-ec-e4-f2-s0": "done"}
    failed = json.loads((study / rundir.RUNS / "debug-tc-e4-k2-s0" / rundir.SUMMARY).read_text())
    assert "/nonexistent" in failed["error"]

    # Repair it; make the EC point partial (roll it back to its step-2 checkpoint).
    bad.write_text(bad.read_text().replace("source: folder", "source: scenes").replace("path: /nonexistent", "path: ''"))
    ec = study / rundir.RUNS / "debug-ec-e4-f2-s0"
    done_summary = (study / rundir.RUNS / "debug-dense-s0" / rundir.SUMMARY).read_text()
    import shutil

    shutil.rmtree(ec / rundir.CHECKPOINTS / "step00000004")
    summary = json.loads((ec / rundir.SUMMARY).read_text())
    summary["status"] = "interrupted"
    (ec / rundir.SUMMARY).write_text(json.dumps(summary))
    code, out, err = _main(["train", "--sweep", str(study), "--quiet"], capsys)
    assert code == 0, err
    assert "3 point(s), 1 done, 2 to train" in out
    assert (study / rundir.RUNS / "debug-dense-s0" / rundir.SUMMARY).read_text() == done_summary  # skipped
    log = (ec / rundir.LOG).read_text()
    assert "resumed from step 2" in log
    records = [json.loads(line) for line in (ec / rundir.METRICS).read_text().splitlines()]
    keys = [(r["kind"], r["step"]) for r in records]
    assert len(keys) == len(set(keys))  # no step logged twice after the resume
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4]
    code, out, err = _main(["status", str(study)], capsys)
    assert code == 0 and out.count("done") >= 3


def test_only_selects_points_by_glob(tmp_path, capsys):
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(yaml.safe_dump(_spec(grid__size=["debug"], grid__num_experts=[4], grid__top_k=[2])))
    study = tmp_path / "study"
    _main(["sweep", str(spec_file), "-o", str(study)], capsys)
    code, out, err = _main(["train", "--sweep", str(study), "--only", "*-ec-*", "--quiet"], capsys)
    assert code == 0, err
    assert rundir.run_status(study / rundir.RUNS / "debug-ec-e4-f2-s0") == "done"
    assert rundir.run_status(study / rundir.RUNS / "debug-dense-s0") == "pending"
    code, out, err = _main(["train", "--sweep", str(study), "--only", "nothing*"], capsys)
    assert code == 2 and "matches no run id" in err


def test_a_cluster_launch_script_has_one_deepspeed_command_per_point(tmp_path, capsys):
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(yaml.safe_dump(_spec()))
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node1 slots=8\nnode2 slots=8\n")
    code, out, err = _main(["sweep", str(spec_file), "-o", str(tmp_path / "st"), "--hostfile", str(hostfile),
                            "--nproc", "8", "--dry-run"], capsys)
    assert code == 0, err
    assert out.count("deepspeed --hostfile") == 14 and not (tmp_path / "st").exists()
    code, out, err = _main(["sweep", str(spec_file), "-o", str(tmp_path / "st"), "--hostfile", str(hostfile),
                            "--nproc", "8"], capsys)
    script = (tmp_path / "st" / rundir.LAUNCH_SCRIPT).read_text()
    assert "--module ecdit_cli _worker runs/debug-ec-e8-f2-s0" in script
    assert 'cd "$(dirname "$0")"' in script


def test_status_of_a_running_point_reads_its_progress_from_the_log(tmp_path):
    from ecdit_cli.lock import RunLock

    run = tmp_path / "run"
    run.mkdir()
    (run / rundir.CONFIG).write_text("{}")
    (run / rundir.SUMMARY).write_text(json.dumps({"status": "running", "step": 0, "steps": 100}))
    lines = [json.dumps({"kind": "train", "step": s, "wall_time_s": s / 10}) for s in (10, 20, 30)]
    (run / rundir.METRICS).write_text("\n".join(lines) + '\n{"kind": "train", "st')  # a line being written
    lock = RunLock(run / rundir.LOCK)
    lock.acquire()
    try:
        (row,) = rundir.status_rows(run)
    finally:
        lock.release()
    assert (row["status"], row["step"], row["steps"], row["wall_time_s"]) == ("running", 30, 100, 3.0)
    (row,) = rundir.status_rows(run)  # the trainer is gone: interrupted, and the summary's numbers stand
    assert (row["status"], row["step"]) == ("interrupted", 0)


def test_the_quality_recipe_is_the_committed_run_it_reports():
    # docs/quality.md reports the GenEval of docs/quality-run/: the spec `make quality` trains must
    # produce that run's config, so the documented numbers stay the recipe's (train.threads is how
    # it ran, not what it trained).
    from pathlib import Path

    from ecdit_cli.config.load import config_changes

    root = Path(__file__).resolve().parents[1]
    (point,) = make_sweep(load_spec(root / "sweeps" / "quality.yaml"))
    committed = load_run_config(root / "docs" / "quality-run" / "config.yaml")
    assert config_changes(committed, point.config, ignore={"train.threads"}) == []
    assert point.config.text.encoder == "minilm" and point.config.text.width == 384
    summary = json.loads((root / "docs" / "quality-run" / "summary.json").read_text())
    assert summary["status"] == "done" and summary["step"] == point.config.train.steps
