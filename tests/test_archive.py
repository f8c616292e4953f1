"""The record archive: a study's finished points kept as small files, taken back by a fresh study."""

import json
import shutil

import yaml

from ecdit_cli import rundir
from ecdit_cli.config import load_run_config, save_config
from ecdit_cli.lock import RunLock
from ecdit_cli.study import archive as records

SPEC = {
    "name": "a",
    "base": {"train": {"batch_size": 8, "warmup_steps": 2, "log_every": 2, "val_every": 4, "ckpt_every": 2,
                       "val_timesteps": 2, "threads": 1},
             "data": {"val_size": 8}},
    "grid": {"size": ["debug"], "routing": ["dense", "expert_choice"], "num_experts": [4], "steps": [4]},
}
DENSE, EC = "debug-dense-s0", "debug-ec-e4-s0"


def _main(args, capsys):
    from ecdit_cli.cli import main

    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def _study(tmp_path, name, capsys):
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC))
    code, _, err = _main(["sweep", str(spec_file), "-o", str(tmp_path / name)], capsys)
    assert code == 0, err
    return tmp_path / name


def _fake_done(run_dir, loss=0.5):
    """What a finished run leaves, without training it (plus a checkpoint that must not travel)."""
    (run_dir / rundir.METRICS).write_text(json.dumps({"kind": "val", "step": 4, "val_loss": loss}) + "\n")
    (run_dir / rundir.CHECKPOINTS).mkdir()
    (run_dir / rundir.CHECKPOINTS / "latest").write_text("step4")
    (run_dir / rundir.SUMMARY).write_text(json.dumps({"status": "done", "step": 4, "final_val_loss": loss}))


def test_a_fresh_study_takes_archived_points_and_trains_only_the_rest(tmp_path, capsys):
    first, archive = _study(tmp_path, "first", capsys), tmp_path / "archive"
    code, out, err = _main(["train", "--sweep", str(first), "--quiet", "--archive", str(archive)], capsys)
    assert code == 0, err
    assert records.archived_ids(archive) == [DENSE, EC]
    for run_id in (DENSE, EC):  # records only: no checkpoints, weights or logs
        assert sorted(p.name for p in (archive / run_id).iterdir()) == sorted(
            [rundir.CONFIG, rundir.METRICS, rundir.SUMMARY])
        for name in (rundir.CONFIG, rundir.METRICS, rundir.SUMMARY):
            assert (archive / run_id / name).read_bytes() == (first / rundir.RUNS / run_id / name).read_bytes()

    # The archived EC point was trained with another learning rate than the study now asks for.
    cfg = load_run_config(archive / EC)
    lr = cfg.train.lr
    cfg.train.lr = lr * 2
    save_config(cfg, archive / EC / rundir.CONFIG)
    second = _study(tmp_path, "second", capsys)
    code, out, err = _main(["train", "--sweep", str(second), "--quiet", "--archive", str(archive)], capsys)
    assert code == 0, err
    assert "1 point(s) taken from it" in out and "2 point(s), 1 done, 1 to train" in out
    assert f"{EC}: archived record not used (config differs (train.lr: {lr * 2!r} archived, {lr!r} in the study)" in err
    dense = second / rundir.RUNS / DENSE
    assert rundir.run_status(dense) == "done" and not (dense / rundir.LOG).exists()  # taken, not trained
    assert (dense / rundir.METRICS).read_bytes() == (first / rundir.RUNS / DENSE / rundir.METRICS).read_bytes()
    assert (second / rundir.RUNS / EC / rundir.LOG).exists()  # trained here
    # ... and the archive now holds the point as this study trained it.
    assert (archive / EC / rundir.CONFIG).read_bytes() == (second / rundir.RUNS / EC / rundir.CONFIG).read_bytes()

    # The collected study reads the imported point like a trained one.
    code, out, err = _main(["collect", str(second)], capsys)
    assert code == 0, err
    import pandas as pd

    runs = pd.read_csv(second / "runs.csv").set_index("run_id")
    first_runs = pd.read_csv(first / "runs.csv").set_index("run_id") if (first / "runs.csv").exists() else None
    assert runs.loc[DENSE, "status"] == "done"
    if first_runs is not None:
        assert runs.loc[DENSE, "final_val_loss"] == first_runs.loc[DENSE, "final_val_loss"]


def test_local_progress_and_held_points_are_never_overwritten(tmp_path, capsys):
    study, archive = _study(tmp_path, "study", capsys), tmp_path / "archive"
    source = _study(tmp_path, "source", capsys)
    for run_id in (DENSE, EC):
        _fake_done(source / rundir.RUNS / run_id)
    result = records.sync(source, archive)
    assert sorted(result.exported) == [DENSE, EC] and not (archive / DENSE / rundir.CHECKPOINTS).exists()
    assert records.sync(source, archive).unchanged == [DENSE, EC]  # nothing rewritten the second time

    interrupted = {"status": "interrupted", "step": 2}
    (study / rundir.RUNS / DENSE / rundir.SUMMARY).write_text(json.dumps(interrupted))
    lock = RunLock(study / rundir.RUNS / EC / rundir.LOCK)
    lock.acquire()  # another trainer is about to start this point
    try:
        result = records.import_archived(study, archive)
    finally:
        lock.release()
    assert result.imported == [] and dict(result.kept_local) == {DENSE: "interrupted", EC: "running"}
    assert json.loads((study / rundir.RUNS / DENSE / rundir.SUMMARY).read_text()) == interrupted
    assert not (study / rundir.RUNS / EC / rundir.SUMMARY).exists()
    assert records.import_archived(study, archive).imported == [EC]  # free now
    assert rundir.run_status(study / rundir.RUNS / EC) == "done"


def test_an_incomplete_or_unfinished_archive_entry_is_not_taken(tmp_path, capsys):
    study, archive = _study(tmp_path, "study", capsys), tmp_path / "archive"
    source = _study(tmp_path, "source", capsys)
    _fake_done(source / rundir.RUNS / DENSE)
    _fake_done(source / rundir.RUNS / EC)
    records.export_done(source, archive)
    (archive / DENSE / rundir.METRICS).unlink()  # a half-copied entry
    summary = json.loads((archive / EC / rundir.SUMMARY).read_text())
    (archive / EC / rundir.SUMMARY).write_text(json.dumps({**summary, "status": "failed"}))
    result = records.import_archived(study, archive)
    assert result.imported == [] and [r for r, _ in result.stale] == [EC]
    assert "not done" in result.stale[0][1]
    shutil.rmtree(archive / EC)
    code, out, err = _main(["archive", str(tmp_path / "nope"), str(archive)], capsys)
    assert code == 2 and "study directory not found" in err and "Traceback" not in err
