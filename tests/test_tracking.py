"""Live tracking: TensorBoard, wandb and CSV mirror metrics.jsonl, also across a resume."""

import csv
import json
import math
import sys

import numpy as np
import pytest

from ecdit_cli import rundir
from ecdit_cli.config import resolve_config
from ecdit_cli.errors import ConfigError, EcditError
from ecdit_cli.files import read_jsonl
from ecdit_cli.train.loop import Callbacks, train
from ecdit_cli.train.trackers import scalars

BASE = ["train.batch_size=8", "data.val_size=8", "train.warmup_steps=2", "train.log_every=2", "train.val_every=4",
        "train.ckpt_every=5", "train.val_timesteps=2", "train.threads=1"]


def tiny(steps, *extra):
    return resolve_config(preset="debug", overrides=["moe.routing=expert_choice", f"train.steps={steps}", *BASE, *extra])


def crash_then_resume(cfg, run_dir, at_step):
    class Crash(Exception):
        pass

    def crash(step, info):
        if step == at_step:
            raise Crash

    with pytest.raises(Crash):
        train(cfg, run_dir, Callbacks(on_step=crash))
    return train(cfg, run_dir)


def tb_scalars(log_dir):
    """{tag: [(step, value)]} as TensorBoard reads the directory (restart purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def jsonl_scalars(run_dir):
    out = {}
    for rec in read_jsonl(run_dir / rundir.METRICS):
        for tag, v in scalars(rec).items():
            out.setdefault(tag, []).append((rec["step"], v))
    return out


def raw_tb_events(log_dir):
    """Scalar events in the event files, before any purge (what a reader without restarts would see)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    n = 0
    for f in sorted(log_dir.glob("events.out.tfevents.*")):
        n += sum(len(e.summary.value) for e in EventFileLoader(str(f)).Load() if e.HasField("summary"))
    return n


def wandb_history(run_file):
    """{step: {key: value}} from an offline run's .wandb file: a LevelDB-style log (7-byte file
    header, 32 KiB blocks, chunks with a 7-byte crc/length/type header) of wandb Record protobufs."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf, out = run_file.read_bytes(), 7, 32768, b"", {}
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                assert rec.history.step.num not in out
                out[rec.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    return out


def assert_same_scalars(tb, jl):
    assert sorted(tb) == sorted(jl)
    for tag, points in jl.items():
        assert [s for s, _ in tb[tag]] == [s for s, _ in points], tag
        # TensorBoard stores float32.
        assert [v for _, v in tb[tag]] == [float(np.float32(v)) for _, v in points], tag


def read_csv(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def assert_csv_mirrors_jsonl(run_dir):
    rows, recs = read_csv(run_dir), list(read_jsonl(run_dir / rundir.METRICS))
    assert [(r["kind"], int(r["step"])) for r in rows] == [(r["kind"], r["step"]) for r in recs]
    for row, rec in zip(rows, recs):
        for k, v in rec.items():
            if isinstance(v, float) and math.isfinite(v):
                assert float(row[k]) == v, k  # repr round-trips a float exactly
            elif isinstance(v, list):
                assert json.loads(row[k]) == v, k
        assert all(row[k] == "" for k in row if k not in rec)


def test_a_tensorboard_event_file_holds_the_same_scalars_as_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    train(tiny(8, "train.tracker=[jsonl,tensorboard,csv]"), tmp_path)
    tb = tb_scalars(tmp_path / "tb")
    assert {"train/train_loss", "train/grad_norm", "val/val_loss", "val/val_loss_t1", "train/flops"} <= set(tb)
    assert_same_scalars(tb, jsonl_scalars(tmp_path))
    assert_csv_mirrors_jsonl(tmp_path)


def test_a_resumed_run_adds_no_duplicate_steps_to_tensorboard_and_csv(tmp_path):
    pytest.importorskip("tensorboard")
    # Checkpoints at 5 and 10; the crash at step 13 leaves the records of step 12 logged past the last one.
    crash_then_resume(tiny(14, "train.tracker=[tensorboard,csv]"), tmp_path / "cut", at_step=13)
    cut = tmp_path / "cut"
    jl = jsonl_scalars(cut)
    assert [s for s, _ in jl["train/train_loss"]] == [2, 4, 6, 8, 10, 12, 14]
    tb = tb_scalars(cut / "tb")
    assert_same_scalars(tb, jl)
    # The event files do hold step 12 twice: the restart marker is what keeps it out.
    assert raw_tb_events(cut / "tb") > sum(len(v) for v in jl.values())
    assert_csv_mirrors_jsonl(cut)


def test_a_tracker_added_at_a_restart_is_filled_from_the_kept_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    train(tiny(6), tmp_path)
    assert not (tmp_path / "tb").exists()
    train(tiny(8, "train.tracker=[tensorboard,csv]"), tmp_path)  # more steps, now mirrored
    assert_same_scalars(tb_scalars(tmp_path / "tb"), jsonl_scalars(tmp_path))
    assert_csv_mirrors_jsonl(tmp_path)


def test_a_wandb_offline_run_directory_is_created_and_a_resumed_run_reuses_its_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run_dir = tmp_path / "run"
    crash_then_resume(tiny(12, "train.tracker=[wandb]"), run_dir, at_step=7)
    state = json.loads((run_dir / "wandb.json").read_text())
    assert state["mode"] == "offline" and state["name"] == run_dir.name and state["project"] == "ecdit"
    assert state["last_step"] == 12 and state["last_kinds"] == ["train", "val"]
    import wandb

    wandb.teardown()  # wandb's service writes a finished run's file in the background; this waits for it
    runs = sorted((tmp_path / "wandb_dir" / "wandb").glob("offline-run-*"))
    # Two sessions, one wandb run: both offline directories carry the same id.
    assert len(runs) == 2 and all(p.name.endswith("-" + state["id"]) for p in runs)
    # What the two sessions sent: every step of metrics.jsonl once (steps logged after the
    # checkpoint and before the crash came from the first session), with its values.
    sent = [wandb_history(next(p.glob("*.wandb"))) for p in runs]
    assert not set(sent[0]) & set(sent[1])
    expected = {}
    for rec in read_jsonl(run_dir / rundir.METRICS):
        expected.setdefault(rec["step"], {}).update(scalars(rec))
    timing = {"train/images_per_s", "train/wall_time_s"}  # the only values a rerun of a step changes
    untimed = lambda h: {s: {k: v for k, v in d.items() if k not in timing} for s, d in h.items()}  # noqa: E731
    assert untimed({**sent[0], **sent[1]}) == untimed(expected)
    assert max(sent[0]) > 5  # the first session did log past the checkpoint the second resumed from


def test_a_wandb_run_that_starts_over_gets_a_new_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    cfg = tiny(4, "train.tracker=[wandb]", "train.ckpt_every=10")
    with pytest.raises(RuntimeError):
        train(cfg, tmp_path / "run", Callbacks(on_step=lambda s, i: (_ for _ in ()).throw(RuntimeError("boom"))))
    first = json.loads((tmp_path / "run" / "wandb.json").read_text())["id"]
    train(cfg, tmp_path / "run")  # no checkpoint was sealed: the run starts over
    assert json.loads((tmp_path / "run" / "wandb.json").read_text())["id"] != first


def test_an_unknown_tracker_name_lists_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"train.tracker=\['jsonl', 'mlflow'\] is invalid: allowed: a list of "
                                          r"jsonl, tensorboard, wandb, csv"):
        tiny(2, "train.tracker=[jsonl,mlflow]")


def test_jsonl_is_always_tracked_first_and_a_comma_list_is_accepted():
    assert tiny(2, "train.tracker=csv,tensorboard,csv").train.tracker == ["jsonl", "csv", "tensorboard"]


def test_a_missing_tracker_library_names_the_extra_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with pytest.raises(EcditError, match=r"needs the tensorboard package: pip install -e '.\[track\]'"):
        train(tiny(2, "train.tracker=[tensorboard]"), tmp_path)
    assert not (tmp_path / rundir.SUMMARY).exists()


def test_the_study_report_links_each_runs_tensorboard_log_directory(tmp_path):
    from fixtures_study import make_study

    from ecdit_cli.study.report import write_report

    fx = make_study(tmp_path / "st", sizes=("S",), extras=False)
    with_tb, without = fx.run_ids[("S", "expert_choice")], fx.run_ids[("S", "dense")]
    (fx.root / "runs" / with_tb / "tb").mkdir()
    files = write_report(fx.root, n_boot=5)
    md, page = files.markdown.read_text(), files.html.read_text()
    section = md.split("## Live tracking")[1].split("\n## ")[0]
    assert f"- [{with_tb}](runs/{with_tb}/tb/)" in section and without not in section
    assert f"tensorboard --logdir {fx.root / 'runs'}" in section
    assert f'<a href="runs/{with_tb}/tb/">{with_tb}</a>' in page
