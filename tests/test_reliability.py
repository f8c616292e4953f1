"""Fault injection: signals, kill -9, corrupt files, NaNs, concurrent trainers, read-only and full disks."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from ecdit_cli import rundir
from ecdit_cli.config import resolve_config, save_config
from ecdit_cli.errors import EcditError
from ecdit_cli.files import read_jsonl
from ecdit_cli.lock import RunLock
from ecdit_cli.train.loop import TrainingFailed, train

TIMING = {"images_per_s", "wall_time_s"}
BASE = ["train.batch_size=8", "data.val_size=16", "train.warmup_steps=2", "train.log_every=3",
        "train.val_every=6", "train.ckpt_every=4", "train.val_timesteps=2", "train.threads=1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def cfg_for(steps=12, *extra, routing="expert_choice"):
    return resolve_config(preset="debug", overrides=[f"moe.routing={routing}", f"train.steps={steps}", *BASE, *extra])


def metrics(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(Path(run_dir) / rundir.METRICS)]


def start(config_file, run_dir):
    return subprocess.Popen([sys.executable, "-m", "ecdit_cli", "train", str(config_file), "-o", str(run_dir),
                             "--quiet"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_to_end(config_file, run_dir):
    proc = start(config_file, run_dir)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:] + err[-2000:]
    return out, err


def wait_for_step(run_dir, step, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        recs = list(read_jsonl(Path(run_dir) / rundir.METRICS, warnings=[]))
        if recs and max(r["step"] for r in recs) >= step:
            return
        if proc.poll() is not None:
            return
        time.sleep(0.05)
    raise AssertionError("the run did not get there in time")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run, in a subprocess like the runs it is compared with."""
    root = tmp_path_factory.mktemp("ref")
    cfg = cfg_for(12)
    save_config(cfg, root / "run.yaml")
    t0 = time.perf_counter()
    run_to_end(root / "run.yaml", root / "run")
    return root / "run.yaml", root / "run", time.perf_counter() - t0


def test_sigterm_checkpoints_at_the_next_step_marks_the_run_interrupted_and_a_rerun_matches_an_uninterrupted_run(
        reference, tmp_path):
    config_file, ref, _ = reference
    run_dir = tmp_path / "run"
    proc = start(config_file, run_dir)
    wait_for_step(run_dir, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    # The signal lands within milliseconds of step 3; the 9 steps left take far longer.
    assert proc.returncode == 130, err
    assert "Re-run the same command to resume" in err
    summary = json.loads((run_dir / rundir.SUMMARY).read_text())
    assert summary["status"] == "interrupted"
    assert (run_dir / rundir.CHECKPOINTS / f"step{summary['step']:08d}" / "ecdit_complete.json").exists()
    run_to_end(config_file, run_dir)
    assert metrics(run_dir) == metrics(ref)


def test_kill_9_at_random_moments_then_rerunning_reproduces_the_metrics_of_an_uninterrupted_run(reference, tmp_path):
    config_file, ref, _ = reference
    run_dir = tmp_path / "run"
    rng = random.Random(0)
    kills = 0
    # Kill moments are tied to the run's own progress, not to wall time (a warm machine runs the
    # whole thing faster than a cold reference did): once during set-up (imports and building
    # take seconds), then just after the metrics show steps 2, 5 and 9 (between saves, during
    # saves, after a resume).
    for target in (None, 2, 5, 9):
        proc = start(config_file, run_dir)
        if target is None:
            time.sleep(rng.uniform(0.2, 1.0))
        else:
            wait_for_step(run_dir, target, proc)
            time.sleep(rng.uniform(0.0, 0.05))
        if proc.poll() is not None:
            continue
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        if (run_dir / rundir.SUMMARY).exists():
            # A killed trainer cannot update its summary; the lock it held is gone with it.
            assert rundir.run_status(run_dir) in ("interrupted", "done")
    run_to_end(config_file, run_dir)
    assert kills >= 2  # the set-up kill, and at least one among the steps
    assert metrics(run_dir) == metrics(ref)
    assert json.loads((run_dir / rundir.SUMMARY).read_text())["status"] == "done"


def test_an_interrupted_sweep_resumes_to_the_state_of_an_uninterrupted_sweep(tmp_path):
    spec = {"name": "r", "base": yaml.safe_load(yaml.safe_dump(_nested(BASE + ["train.steps=8"]))),
            "grid": {"size": ["debug"], "routing": ["dense", "expert_choice"], "num_experts": [4]}}
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    for name in ("ref", "cut"):
        subprocess.run([sys.executable, "-m", "ecdit_cli", "sweep", str(spec_file), "-o", str(tmp_path / name)],
                       env=ENV, check=True, capture_output=True)
    cmd = [sys.executable, "-m", "ecdit_cli", "train", "--quiet", "--sweep"]
    subprocess.run([*cmd, str(tmp_path / "ref")], env=ENV, check=True, capture_output=True, timeout=300)
    proc = subprocess.Popen([*cmd, str(tmp_path / "cut")], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    # Into the second point, after its first logged step and before its first checkpoint (step 4).
    wait_for_step(tmp_path / "cut" / rundir.RUNS / "debug-ec-e4-s0", 3, proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the sweep finished before the kill"
    assert rundir.run_status(tmp_path / "cut" / rundir.RUNS / "debug-dense-s0") == "done"
    subprocess.run([*cmd, str(tmp_path / "cut")], env=ENV, check=True, capture_output=True, timeout=300)
    for run_id in ("debug-dense-s0", "debug-ec-e4-s0"):
        assert rundir.run_status(tmp_path / "cut" / rundir.RUNS / run_id) == "done"
        assert metrics(tmp_path / "cut" / rundir.RUNS / run_id) == metrics(tmp_path / "ref" / rundir.RUNS / run_id)


def test_two_trainers_share_a_study_a_held_point_is_passed_over_untouched(tmp_path):
    from ecdit_cli.study.spec import load_spec, make_sweep, write_study
    from ecdit_cli.train.driver import RunOutcome, study_exit_code, study_points, train_points

    spec = {"name": "r", "base": _nested(BASE + ["train.steps=4"]),
            "grid": {"size": ["debug"], "routing": ["dense", "expert_choice"], "num_experts": [4]}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    write_study(load_spec(tmp_path / "s.yaml"), make_sweep(load_spec(tmp_path / "s.yaml")), tmp_path / "st")
    held_dir = tmp_path / "st" / rundir.RUNS / "debug-dense-s0"
    (held_dir / rundir.SUMMARY).write_text(json.dumps({"status": "running", "step": 2}))
    lock = RunLock(held_dir / rundir.LOCK)  # the other trainer, still alive
    lock.acquire()
    trained = []

    def train_point(point, cfg):
        trained.append(point.run_id)
        return RunOutcome("done") if train(cfg, point.run_dir)["status"] == "done" else RunOutcome("failed")

    try:
        points = study_points(tmp_path / "st")
        # Both start pending from this trainer's view; the first is taken by the other one meanwhile.
        points[0].status = "pending"
        outcomes = dict((p.run_id, o) for p, o in train_points(points, train_point))
    finally:
        lock.release()
    assert outcomes["debug-dense-s0"].status == "skipped" and outcomes["debug-ec-e4-s0"].status == "done"
    assert trained == ["debug-ec-e4-s0"]
    assert json.loads((held_dir / rundir.SUMMARY).read_text()) == {"status": "running", "step": 2}
    assert study_exit_code(list(outcomes.values())) == 0

    # Losing the race for the lock itself (both saw the point free) is a skip too, never "failed".
    lock.acquire()
    try:
        (held_dir / rundir.SUMMARY).unlink()  # pending: nothing tells this trainer the point is taken
        [(_, o)] = list(train_points(study_points(tmp_path / "st")[:1], train_point))
    finally:
        lock.release()
    assert o.status == "skipped" and "already being trained" in o.message
    assert not (held_dir / rundir.SUMMARY).exists()


def _nested(overrides):
    from ecdit_cli.config import overrides_to_dict

    return overrides_to_dict(overrides)


@pytest.mark.parametrize("damage", ["truncate", "corrupt", "unsealed"])
def test_a_damaged_latest_checkpoint_is_detected_and_the_run_falls_back_to_the_previous_one(damage, tmp_path):
    train(cfg_for(8), tmp_path / "run")  # checkpoints at steps 4 and 8
    latest = tmp_path / "run" / rundir.CHECKPOINTS / "step00000008"
    target = latest / "mp_rank_00_model_states.pt"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    elif damage == "corrupt":
        data = bytearray(target.read_bytes())
        data[: len(data) // 2] = os.urandom(len(data) // 2)
        target.write_bytes(bytes(data))
    else:
        (latest / "ecdit_complete.json").unlink()  # as if killed while saving
    messages = []
    from ecdit_cli.train.loop import Callbacks

    summary = train(cfg_for(12), tmp_path / "run", Callbacks(on_message=messages.append))
    log = "\n".join(messages)
    if damage != "unsealed":
        assert "falling back to an older one" in log and "step00000008" in log
    assert "resumed from step 4" in log
    assert summary["status"] == "done" and summary["step"] == 12
    train(cfg_for(12), tmp_path / "ref")
    assert metrics(tmp_path / "run") == metrics(tmp_path / "ref")


def test_a_truncated_last_metrics_line_is_dropped_on_resume(tmp_path):
    train(cfg_for(8), tmp_path / "run")
    with open(tmp_path / "run" / rundir.METRICS, "a") as f:
        f.write('{"kind": "train", "step": 9, "train_lo')
    train(cfg_for(12), tmp_path / "run")
    steps = [r["step"] for r in read_jsonl(tmp_path / "run" / rundir.METRICS)]
    assert steps == sorted(steps)
    lines = (tmp_path / "run" / rundir.METRICS).read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # the partial line is gone


def test_a_run_killed_before_its_first_checkpoint_starts_over_without_duplicate_lines(tmp_path):
    train(cfg_for(4), tmp_path / "ref")
    ref_lines = (tmp_path / "ref" / rundir.METRICS).read_text().splitlines()
    # What a kill between the step-0 validation and the first checkpoint leaves behind.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / rundir.METRICS).write_text("\n".join(ref_lines[:2]) + "\n")
    train(cfg_for(4), tmp_path / "run")
    assert metrics(tmp_path / "run") == metrics(tmp_path / "ref")


def _nan_after(monkeypatch, calls):
    """Poison the v target of the n-th training micro-batch (validation has its own import)."""
    import ecdit_cli.train.step as loop

    real = loop.interpolate
    count = {"n": 0}

    def poisoned(x0, noise, t):
        count["n"] += 1
        x_t, v = real(x0, noise, t)
        if count["n"] == calls:
            v = v * float("nan")
        return x_t, v

    monkeypatch.setattr(loop, "interpolate", poisoned)


def test_a_non_finite_loss_stops_the_run_before_the_optimizer_step_and_keeps_the_last_good_checkpoint(
        tmp_path, monkeypatch):
    # One training micro-batch per step: call 6 is step 6's loss.
    _nan_after(monkeypatch, 6)
    with pytest.raises(TrainingFailed, match="non-finite loss .* at step 6"):
        train(cfg_for(12), tmp_path / "run")
    summary = json.loads((tmp_path / "run" / rundir.SUMMARY).read_text())
    assert summary["status"] == "failed" and "step 6" in summary["error"]
    assert summary["last_metrics"]["step"] == 3
    tags = sorted(p.name for p in (tmp_path / "run" / rundir.CHECKPOINTS).glob("step*"))
    assert tags == ["step00000004"]
    assert not (tmp_path / "run" / rundir.FINAL_WEIGHTS).exists()


def test_max_bad_steps_skips_a_bounded_number_of_non_finite_steps_without_touching_the_weights(
        tmp_path, monkeypatch):
    _nan_after(monkeypatch, 6)
    messages = []
    from ecdit_cli.train import loop
    from ecdit_cli.train.records import Callbacks

    changed = []  # per optimizer step: did any weight move?
    real_step = loop.optimizer_step

    def watched(engine, lr):
        before = [p.detach().clone() for p in engine.module.parameters()]
        real_step(engine, lr)
        changed.append(any(not torch.equal(b, p) for b, p in zip(before, engine.module.parameters())))

    monkeypatch.setattr(loop, "optimizer_step", watched)
    summary = train(cfg_for(8, "train.max_bad_steps=1"), tmp_path / "run", Callbacks(on_message=messages.append))
    assert summary["status"] == "done"
    assert any("step skipped (1/1 allowed)" in m for m in messages)
    assert changed == [True] * 5 + [False] + [True] * 2  # step 6 is the poisoned one
    assert all(v is None or v == v for r in read_jsonl(tmp_path / "run" / rundir.METRICS)
               for k, v in r.items() if isinstance(v, float))


def test_a_second_trainer_on_the_same_run_directory_is_refused(tmp_path):
    lock = RunLock(tmp_path / "run" / rundir.LOCK)
    lock.acquire()
    try:
        with pytest.raises(EcditError, match="already being trained by another process .*pid="):
            train(cfg_for(4), tmp_path / "run")
    finally:
        lock.release()
    assert train(cfg_for(4), tmp_path / "run")["status"] == "done"  # free again


def _mount(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_read_only_run_directory_is_a_clear_error_naming_the_path(tmp_path):
    ro = tmp_path / "ro"
    if not _mount(ro, "ro,size=1m"):
        ro.mkdir(exist_ok=True)
        ro.chmod(0o555)
        if os.access(ro, os.W_OK):
            pytest.skip("cannot make a read-only directory here")
    try:
        with pytest.raises(EcditError, match=f"cannot .*{ro}.*(read-only file system|permission denied)"):
            train(cfg_for(4), ro / "run")
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)


def test_a_full_disk_during_checkpointing_fails_clearly_and_leaves_no_sealed_partial_checkpoint(tmp_path):
    small = tmp_path / "small"
    if not _mount(small, "size=160k"):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        with pytest.raises(EcditError, match="no space left on device"):
            train(cfg_for(8), small / "run")
        ckpts = small / "run" / rundir.CHECKPOINTS
        for tag in ckpts.glob("step*"):
            if (tag / "ecdit_complete.json").exists():
                from ecdit_cli.train.checkpoint import verify

                assert verify(ckpts, tag.name) is None  # anything sealed is whole
        if (small / "run" / rundir.SUMMARY).exists():
            assert json.loads((small / "run" / rundir.SUMMARY).read_text())["status"] in ("failed", "running")
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)
