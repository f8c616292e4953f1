"""Cluster sweeps: `ecdit train --sweep DIR --slurm` through submitit (its local executor here,
and Slurm's own commands replaced by small scripts that answer as sbatch and sacct do)."""

import json
import os
import stat

import pytest
import torch
import yaml

from ecdit_cli import rundir
from ecdit_cli.cli import main
from ecdit_cli.files import read_jsonl
from ecdit_cli.lock import RunLock

pytest.importorskip("submitit")

TIMING = {"images_per_s", "wall_time_s"}
SPEC = {"name": "sl", "base": {"train": {"batch_size": 8, "warmup_steps": 2, "log_every": 2, "val_every": 4,
                                         "ckpt_every": 4, "val_timesteps": 2, "threads": 1, "steps": 4},
                               "data": {"val_size": 8}},
        "grid": {"size": ["debug"], "routing": ["dense", "expert_choice"], "num_experts": [4]}}
IDS = ["debug-dense-s0", "debug-ec-e4-s0"]


def cli(*args):
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return e.code
    return 0


def make_study(root):
    (root / "s.yaml").parent.mkdir(parents=True, exist_ok=True)
    (root / "s.yaml").write_text(yaml.safe_dump(SPEC))
    assert cli("sweep", root / "s.yaml", "-o", root / "st") == 0
    return root / "st"


def metrics(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(run_dir / rundir.METRICS)]


def fake_command(bin_dir, name, script):
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_the_slurm_path_through_the_local_executor_ends_with_the_same_run_directories_as_train_sweep(
        tmp_path, threads, capsys):
    ref, jobs = make_study(tmp_path / "ref"), make_study(tmp_path / "jobs")
    assert cli("train", "--sweep", ref, "--quiet") == 0
    assert cli("train", "--sweep", jobs, "--slurm", "--cluster", "local", "--time", "10", "--max-parallel", "2") == 0
    out = capsys.readouterr().out
    recorded = json.loads((jobs / "slurm" / "jobs.json").read_text())
    assert sorted(recorded) == IDS and all(recorded[r]["cluster"] == "local" for r in IDS)
    for run_id in IDS:
        assert f"{run_id}: job {recorded[run_id]['job_id']}" in out
        a, b = ref / rundir.RUNS / run_id, jobs / rundir.RUNS / run_id
        assert rundir.run_status(b) == "done"
        assert metrics(b) == metrics(a)
        files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())  # noqa: E731
        assert files(b) == files(a)
        wa = torch.load(a / rundir.FINAL_WEIGHTS, weights_only=True)
        wb = torch.load(b / rundir.FINAL_WEIGHTS, weights_only=True)
        assert all(torch.equal(wa["ema"][k], wb["ema"][k]) for k in wa["ema"])

    # `ecdit status` shows each point's job and its state next to the run state.
    assert cli("status", jobs, "--json") == 0
    rows = {r["run_id"]: r for r in json.loads(capsys.readouterr().out)}
    for run_id in IDS:
        assert rows[run_id]["status"] == "done" and rows[run_id]["job_state"] == "FINISHED"
        assert rows[run_id]["job_id"] == recorded[run_id]["job_id"]
    # Submitting again submits nothing: every point is done.
    assert cli("train", "--sweep", jobs, "--slurm", "--cluster", "local") == 0
    assert "2 done, 0 held, 0 to submit" in capsys.readouterr().out


def test_a_point_another_trainer_holds_is_not_submitted_and_a_job_that_finds_it_held_skips_it(tmp_path):
    from ecdit_cli.train.slurm import SlurmOptions, run_point, submit

    study = make_study(tmp_path)
    held = study / rundir.RUNS / IDS[0]
    (held / rundir.SUMMARY).write_text(json.dumps({"status": "running", "step": 2}))
    lock = RunLock(held / rundir.LOCK)
    lock.acquire()
    try:
        plan = submit(study, SlurmOptions(cluster="local"), dry_run=True)
        assert plan.held == {IDS[0]: "trained by another process"} and list(plan.submitted) == [IDS[1]]
        # A job submitted earlier that starts while another trainer holds its point passes it over.
        assert run_point(str(held), 1, "deepspeed", 1)["status"] == "skipped"
    finally:
        lock.release()
    assert json.loads((held / rundir.SUMMARY).read_text()) == {"status": "running", "step": 2}


def test_slurm_submission_is_one_job_array_with_the_asked_resources_and_status_shows_sacct_states(
        tmp_path, monkeypatch, capsys):
    study = make_study(tmp_path)
    bin_dir = tmp_path / "bin"
    fake_command(bin_dir, "sbatch", f'cp "$1" {tmp_path}/submitted.sh\necho "Submitted batch job 4242"\n')
    fake_command(bin_dir, "srun", "exit 0\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert cli("train", "--sweep", study, "--slurm", "--partition", "gpu", "--gpus-per-node", "8", "--nodes", "2",
               "--time", "30", "--cpus-per-task", "16", "--max-parallel", "1") == 0
    script = (tmp_path / "submitted.sh").read_text()
    for line in ("#SBATCH --array=0-1%1", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=8", "#SBATCH --nodes=2",
                 "#SBATCH --time=30", "#SBATCH --cpus-per-task=16", "#SBATCH --ntasks-per-node=1"):
        assert line in script, line
    recorded = json.loads((study / "slurm" / "jobs.json").read_text())
    assert {r: j["job_id"] for r, j in recorded.items()} == {IDS[0]: "4242_0", IDS[1]: "4242_1"}
    capsys.readouterr()

    # Without sacct the states are unknown, and status says why.
    assert cli("status", study) == 0
    out = capsys.readouterr().out
    assert "4242_0" in out and "UNKNOWN" in out and "sacct" in out
    # sacct answers: one array task runs, the other waits; a re-submission holds both.
    fake_command(bin_dir, "sacct", 'printf "JobID|State|NodeList\\n4242_0|RUNNING|node1\\n4242_1|PENDING|\\n"\n')
    assert cli("status", study, "--json") == 0
    rows = {r["run_id"]: (r["job_id"], r["job_state"]) for r in json.loads(capsys.readouterr().out)}
    assert rows == {IDS[0]: ("4242_0", "RUNNING"), IDS[1]: ("4242_1", "PENDING")}
    (tmp_path / "submitted.sh").unlink()
    assert cli("train", "--sweep", study, "--slurm") == 0
    out = capsys.readouterr().out
    assert "0 to submit" in out and f"{IDS[0]}: held (job 4242_0 is RUNNING)" in out
    assert not (tmp_path / "submitted.sh").exists()


def test_a_multi_node_job_runs_one_torchrun_per_node_with_a_rendezvous_every_node_agrees_on(tmp_path):
    from ecdit_cli.train.slurm import multinode_command

    cmds = [multinode_command(tmp_path, 8, 2, rank, "node1", "4242_1") for rank in (0, 1)]
    for rank, cmd in enumerate(cmds):
        args = dict(zip(cmd[3:13:2], cmd[4:13:2]))
        assert cmd[1:3] == ["-m", "torch.distributed.run"] and cmd[-4:] == ["ecdit_cli", "_worker", str(tmp_path),
                                                                             "--quiet"]
        assert args == {"--nnodes": "2", "--node_rank": str(rank), "--nproc_per_node": "8",
                        "--master_addr": "node1", "--master_port": cmds[0][12]}
    assert multinode_command(tmp_path, 8, 2, 0, "node1", "4243_0")[12] != cmds[0][12]  # another job, another port


def test_submitting_without_slurm_is_one_line_naming_the_missing_command(tmp_path, monkeypatch, capsys):
    study = make_study(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty_bin"))
    assert cli("train", "--sweep", study, "--slurm") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sbatch not found: submit from a Slurm login node" in err[0]
    assert not (study / "slurm").exists()


def test_without_submitit_slurm_is_one_line_naming_the_extra_and_status_still_shows_the_jobs(
        tmp_path, monkeypatch, capsys):
    from submitit.core.utils import JobPaths

    study = make_study(tmp_path)
    (study / "slurm").mkdir()
    (study / "slurm" / "jobs.json").write_text(json.dumps({IDS[0]: {"job_id": "77", "cluster": "slurm"}}))
    # The result file a local job leaves, by the name submitit gives it (status reads it without submitit).
    assert JobPaths(study / "slurm" / "logs", "77", 0).result_pickle == study / "slurm" / "logs" / "77_0_result.pkl"
    fake_command(tmp_path / "bin", "sacct", 'printf "JobID|State|NodeList\n77|RUNNING|node1\n"\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    for name in ("submitit", "submitit.slurm", "submitit.slurm.slurm"):  # as if not installed
        monkeypatch.setitem(__import__("sys").modules, name, None)
    assert cli("train", "--sweep", study, "--slurm", "--dry-run") == 2
    assert "--slurm needs the submitit package: pip install -e '.[slurm]'" in capsys.readouterr().err
    assert cli("status", study, "--json") == 0
    rows = {r["run_id"]: (r["job_id"], r["job_state"]) for r in json.loads(capsys.readouterr().out)}
    assert rows == {IDS[0]: ("77", "UNKNOWN"), IDS[1]: (None, None)}


def test_the_local_executor_runs_waves_of_max_parallel_jobs_one_after_the_other(tmp_path, monkeypatch):
    from ecdit_cli.train import slurm

    study = make_study(tmp_path)
    events = []

    class FakeJob:
        def __init__(self, job_id):
            self.job_id = job_id

        def wait(self):
            events.append(("wait", self.job_id))

    def fake_submit(submitit, executor, points, opts):
        events.append(("submit", [p.run_id for p in points]))
        return [FakeJob(str(100 + len(events) + i)) for i in range(len(points))]

    monkeypatch.setattr(slurm, "_submit_array", fake_submit)
    sub = slurm.submit(study, slurm.SlurmOptions(cluster="local"))  # default: one job at a time
    assert events == [("submit", [IDS[0]]), ("wait", "101"), ("submit", [IDS[1]])]
    assert sub.submitted == {IDS[0]: "101", IDS[1]: "103"}
    assert {r: j["job_id"] for r, j in slurm.read_jobs(study).items()} == sub.submitted
