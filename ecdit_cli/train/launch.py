"""Multi-process and multi-node launch: the command lines, and running one to completion.

`ecdit train --nproc N` writes the run's config.yaml first, then starts N copies of
`python -m ecdit_cli _worker RUN_DIR` (the program itself, see __main__.py) through the DeepSpeed launcher (default; `--hostfile`
for several nodes, passwordless ssh/pdsh as DeepSpeed requires) or torchrun (one node). Each
worker reads the config from the run directory, so any node that sees the directory can run it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from ecdit_cli.errors import EcditError

LAUNCHERS = ("deepspeed", "torchrun")
WORKER = ["ecdit_cli", "_worker"]  # module and first argument: this program as one rank of a run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(run_dir: str | Path, nproc: int, hostfile: str | None = None, launcher: str = "deepspeed",
                   python: str | None = None, master_port: int | None = None,
                   worker_args: list[str] | None = None) -> list[str]:
    """The command that trains `run_dir` with `nproc` processes per node."""
    if launcher not in LAUNCHERS:
        raise EcditError(f"launcher {launcher!r} is invalid: allowed: {', '.join(LAUNCHERS)}")
    if nproc < 1:
        raise EcditError(f"--nproc {nproc} is invalid: must be >= 1")
    py = python or sys.executable
    port = [] if master_port is None else ["--master_port", str(master_port)]
    tail = [*WORKER, str(run_dir), *(worker_args or [])]
    if launcher == "torchrun":
        if hostfile:
            raise EcditError("--hostfile needs the deepspeed launcher (torchrun here runs one node)")
        return [py, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *port, "-m", *tail]
    cmd = [py, "-m", "deepspeed.launcher.runner"] if python is None else ["deepspeed"]
    if hostfile:
        if not Path(hostfile).is_file():
            raise EcditError(f"hostfile not found: {hostfile}")
        cmd += ["--hostfile", str(hostfile)]
    return [*cmd, "--num_gpus", str(nproc), *port, "--module", *tail]


def run_launched(cmd: list[str], env: dict[str, str] | None = None) -> int:
    """Run a launcher command in the foreground; forward SIGINT/SIGTERM to it; return its exit code."""
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})})

    def forward(signum, frame):
        proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
