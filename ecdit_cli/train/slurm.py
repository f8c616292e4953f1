"""Cluster sweeps: one Slurm job per pending point of a study, submitted through submitit.

`ecdit train --sweep DIR --slurm` submits the points that are not done (and not held by a live
trainer or a live job of an earlier submission) as one job array (`executor.map_array`: one
sbatch call). Each job runs `run_point`, which trains its point exactly as `ecdit train --sweep`
does: in its own process on one CPU/GPU, through the DeepSpeed (or torchrun) launcher for several
GPUs on one node (`train_one`, launch.py), or with one torchrun per node for several nodes (a
static rendezvous on the job's first node). A point is re-checked when its job starts, so
jobs, re-submissions and `ecdit train --sweep` on other machines share a study as two local
trainers do: a done point or one another live trainer holds (its run lock) is skipped.

Job ids go to STUDY/slurm/jobs.json; `ecdit status` reads them and asks Slurm for their states
(`sacct`, through submitit; without sacct the state is unknown). submitit's local executor
(`--cluster local`) runs the same jobs as processes on this machine: the tests use it, and it is
a way to try a study's job layout without Slurm.
"""

from __future__ import annotations

import os
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ecdit_cli import rundir
from ecdit_cli.errors import EcditError
from ecdit_cli.files import atomic_write_json, read_json

CLUSTERS = ("slurm", "local")
SLURM_DIR = "slurm"
JOBS_FILE = "slurm/jobs.json"
LOGS_DIR = "slurm/logs"
# Slurm states of a job that has not ended: its point is held, not submitted again.
LIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED",
               "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}
MASTER_PORT_BASE = 20000  # multi-node rendezvous port: base + a hash of the job id (same on every node)


@dataclass
class SlurmOptions:
    """What each job asks for. Processes per node: gpus_per_node when > 0, else nproc (CPU)."""

    cluster: str = "slurm"
    partition: str | None = None
    gpus_per_node: int = 0
    nodes: int = 1
    time_min: int = 240  # the job's time limit; a run that reaches it checkpoints (SIGTERM)
    cpus_per_task: int | None = None
    nproc: int = 1
    launcher: str = "deepspeed"
    # Jobs at once: Slurm's array throttle (%N); the local executor (which has none) submits waves of
    # this many and waits for each. None: submitit's default on Slurm, one at a time locally.
    max_parallel: int | None = None

    def check(self) -> None:
        from ecdit_cli.train.launch import LAUNCHERS

        if self.cluster not in CLUSTERS:
            raise EcditError(f"--cluster {self.cluster!r} is invalid: allowed: {', '.join(CLUSTERS)}")
        for name, v, low in (("--nodes", self.nodes, 1), ("--gpus-per-node", self.gpus_per_node, 0),
                             ("--time", self.time_min, 1), ("--nproc", self.nproc, 1)):
            if v < low:
                raise EcditError(f"{name} {v} is invalid: must be >= {low}")
        if self.max_parallel is not None and self.max_parallel < 1:
            raise EcditError(f"--max-parallel {self.max_parallel} is invalid: must be >= 1")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise EcditError(f"--cpus-per-task {self.cpus_per_task} is invalid: must be >= 1")
        if self.launcher not in LAUNCHERS:
            raise EcditError(f"launcher {self.launcher!r} is invalid: allowed: {', '.join(LAUNCHERS)}")
        if self.cluster == "local" and self.nodes > 1:
            raise EcditError(f"--nodes {self.nodes} is invalid with --cluster local: it runs on this machine only")

    @property
    def procs_per_node(self) -> int:
        return self.gpus_per_node or self.nproc

    def executor_parameters(self, name: str) -> dict[str, Any]:
        """submitit's AutoExecutor parameters (generic ones apply to both clusters)."""
        params: dict[str, Any] = {"timeout_min": self.time_min, "nodes": self.nodes, "tasks_per_node": 1,
                                  "name": name}
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        if self.cpus_per_task:
            params["cpus_per_task"] = self.cpus_per_task
        if self.partition:
            params["slurm_partition"] = self.partition
        if self.max_parallel and self.cluster == "slurm":
            params["slurm_array_parallelism"] = self.max_parallel
        return params


@dataclass
class Submission:
    submitted: dict[str, str] = field(default_factory=dict)  # run id -> job id
    held: dict[str, str] = field(default_factory=dict)  # run id -> why it was not submitted
    done: list[str] = field(default_factory=list)
    jobs: list[Any] = field(default_factory=list)  # submitit jobs, in the order of `submitted`
    parameters: dict[str, Any] = field(default_factory=dict)


def import_submitit():
    try:
        import submitit
    except ImportError:
        raise EcditError("--slurm needs the submitit package: pip install -e '.[slurm]'") from None
    return submitit


def pending_points(study: Path, only: str | None = None) -> tuple[list, Submission]:
    """The points to submit; the others are done, or held by a live trainer or a live job."""
    from ecdit_cli.train.driver import study_points

    points = study_points(study, only)
    plan, todo = Submission(), []
    states = job_states(study)
    for p in points:
        if p.status == "done":
            plan.done.append(p.run_id)
        elif p.status == "running" and rundir.lock_is_held(p.run_dir):
            plan.held[p.run_id] = "trained by another process"
        elif p.run_id in states and states[p.run_id]["state"] in LIVE_STATES:
            job = states[p.run_id]
            plan.held[p.run_id] = f"job {job['job_id']} is {job['state']}"
        else:
            todo.append(p)
    return todo, plan


def submit(study: Path, opts: SlurmOptions, only: str | None = None, dry_run: bool = False,
           on_submit: Callable[[dict[str, str]], None] = lambda submitted: None) -> Submission:
    """Submit one job per pending point (one job array); record the job ids in STUDY/slurm/jobs.json.
    `on_submit` gets each submission's {run id: job id} (local waves: one call per wave)."""
    opts.check()
    submitit = import_submitit()
    missing = [c for c in ("sbatch", "srun") if shutil.which(c) is None]
    if opts.cluster == "slurm" and not dry_run and missing:
        raise EcditError(f"{missing[0]} not found: submit from a Slurm login node (--cluster local runs the jobs "
                         "on this machine instead)")
    todo, plan = pending_points(study, only)
    plan.parameters = opts.executor_parameters(f"ecdit-{study.resolve().name}")
    if dry_run or not todo:
        plan.submitted = {p.run_id: "" for p in todo}
        return plan
    executor = submitit.AutoExecutor(folder=study / LOGS_DIR, cluster=opts.cluster)
    executor.update_parameters(**plan.parameters)
    wave = len(todo) if opts.cluster == "slurm" else (opts.max_parallel or 1)
    for i in range(0, len(todo), wave):
        if plan.jobs:  # local waves: the previous one ends first
            for job in plan.jobs[-wave:]:
                job.wait()
        points = todo[i:i + wave]
        jobs = _submit_array(submitit, executor, points, opts)
        plan.jobs += jobs
        submitted = {p.run_id: str(j.job_id) for p, j in zip(points, jobs)}
        plan.submitted.update(submitted)
        _record_jobs(study, opts.cluster, submitted)
        on_submit(submitted)
    return plan


def _submit_array(submitit, executor, points: list, opts: SlurmOptions) -> list:
    n = len(points)
    try:
        # Absolute paths: a job may start in another working directory.
        return executor.map_array(run_point, [str(p.run_dir.resolve()) for p in points], [opts.procs_per_node] * n,
                                  [opts.launcher] * n, [opts.nodes] * n)
    except (submitit.core.utils.FailedSubmissionError, submitit.core.utils.FailedJobError, OSError) as err:
        # sbatch's own refusal (an unknown partition, a time above the partition's limit, ...).
        raise EcditError(f"submission failed: {str(err).strip().splitlines()[-1] if str(err).strip() else err!r}"
                         ) from None


def _record_jobs(study: Path, cluster: str, submitted: dict[str, str]) -> None:
    path = study / JOBS_FILE
    record = read_json(path, "job record") if path.is_file() else {}
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for run_id, job_id in submitted.items():
        record[run_id] = {"job_id": job_id, "cluster": cluster, "submitted_at": now}
    atomic_write_json(path, record)


def read_jobs(study: Path) -> dict[str, dict[str, str]]:
    """STUDY/slurm/jobs.json: run id -> {job_id, cluster, submitted_at} of its latest submission."""
    path = Path(study) / JOBS_FILE
    return read_json(path, "job record") if path.is_file() else {}


def job_states(study: Path) -> dict[str, dict[str, str]]:
    """run id -> {job_id, cluster, state} for the points with a recorded job. Slurm states come
    from one sacct call (through submitit); without sacct they are UNKNOWN. A local job is
    RUNNING while its process lives, then FINISHED (its result file) or GONE."""
    jobs = read_jobs(study)
    if not jobs:
        return {}
    out = {rid: {"job_id": j["job_id"], "cluster": j.get("cluster", "slurm"), "state": "UNKNOWN"}
           for rid, j in jobs.items()}
    slurm_ids = [j["job_id"] for j in out.values() if j["cluster"] == "slurm"]
    watcher = None
    if slurm_ids and shutil.which("sacct") is not None:
        try:
            from submitit.slurm.slurm import SlurmJob

            watcher = SlurmJob.watcher
        except ImportError:  # `ecdit status` still shows the run states and job ids
            pass
    if watcher is not None:
        for jid in slurm_ids:
            watcher.register_job(jid)
        watcher.update()  # one sacct call for every job
        for j in out.values():
            if j["cluster"] == "slurm":
                j["state"] = watcher.get_state(j["job_id"], mode="cache").split()[0]  # "CANCELLED by 0" -> CANCELLED
    for j in out.values():
        if j["cluster"] == "local":
            j["state"] = _local_state(Path(study) / LOGS_DIR, j["job_id"])
    return out


def _local_state(folder: Path, job_id: str) -> str:
    if (folder / f"{job_id}_0_result.pkl").exists():  # submitit's JobPaths(folder, job_id, 0).result_pickle
        return "FINISHED"
    try:
        os.kill(int(job_id), 0)  # a local job's id is its process id
    except (ProcessLookupError, ValueError):
        return "GONE"
    except PermissionError:
        pass
    return "RUNNING"


# ----------------------------------------------------------------------------------------------
# Inside a job


def run_point(run_dir: str, procs: int, launcher: str, nodes: int) -> dict[str, str]:
    """Train one study point as `ecdit train --sweep` would; runs inside a submitted job.
    A failed or interrupted run raises, so that Slurm records the job as failed."""
    from ecdit_cli.train.driver import StudyPoint, train_one, train_points

    path = Path(run_dir)
    if nodes > 1:
        return _run_multinode(path, procs, nodes)
    point = StudyPoint(path.name, path, rundir.run_status(path))
    outcomes = list(train_points([point], lambda p, cfg: train_one(cfg, p.run_dir, procs, None, launcher,
                                                                    quiet=True)))
    if not outcomes:
        return {"run_id": path.name, "status": "done", "message": "already done"}
    _, outcome = outcomes[0]
    if outcome.status in ("failed", "interrupted"):
        raise EcditError(f"{path.name} {outcome.status}: {outcome.message}")
    return {"run_id": path.name, "status": outcome.status, "message": outcome.message}


def multinode_command(run_dir: Path, procs: int, nodes: int, node_rank: int, master_addr: str, job_id: str
                      ) -> list[str]:
    """One node's torchrun of a multi-node run: a static rendezvous on the job's first node, at a
    port derived from the job id so that every node of the job computes the same one."""
    import sys

    from ecdit_cli.train.launch import WORKER

    port = MASTER_PORT_BASE + zlib.crc32(job_id.encode()) % 20000
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--node_rank", str(node_rank),
            "--nproc_per_node", str(procs), "--master_addr", master_addr, "--master_port", str(port),
            "-m", *WORKER, str(run_dir), "--quiet"]


def _run_multinode(run_dir: Path, procs: int, nodes: int) -> dict[str, str]:
    # Every node must join the rendezvous, so none of them skips on its own: a multi-node point
    # is started on all its nodes unless it is done (do not train it from two places at once).
    import submitit

    from ecdit_cli.config import load_run_config
    from ecdit_cli.train.driver import launched_outcome
    from ecdit_cli.train.launch import run_launched

    if rundir.run_status(run_dir) == "done":
        return {"run_id": run_dir.name, "status": "done", "message": "already done"}
    env = submitit.JobEnvironment()
    cmd = multinode_command(run_dir, procs, nodes, env.node, env.hostnames[0], str(env.job_id))
    outcome = launched_outcome(load_run_config(run_dir), run_dir, run_launched(cmd), mark_failed=env.node == 0)
    if outcome.status in ("failed", "interrupted"):
        raise EcditError(f"{run_dir.name} {outcome.status}: {outcome.message}")
    return {"run_id": run_dir.name, "status": outcome.status, "message": outcome.message}
