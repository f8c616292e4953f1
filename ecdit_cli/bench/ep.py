"""Expert parallelism on one node: the EC training step on 1 process vs `ep` processes.

`bench_ep` launches `ecdit_cli.bench.ep_worker` three times: one process with the local fast
path, one process through DeepSpeed's MOELayer (the code path expert parallelism takes, without
communication), and `ep` processes under torch.distributed.run with `moe.ep_size = ep` (each
process holds E / ep experts and B / ep images; tokens travel by all-to-all). On a CPU the
processes split the cores (engine.setup_distributed), so the comparison is at equal hardware.

The all-to-all share is the time spent inside DeepSpeed's `_AllToAll` (forward and backward,
all MoE layers) over the step time. It includes waiting for the slower rank to arrive, so it
is the cost expert parallelism adds at this size, not the wire time alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from ecdit_cli.errors import EcditError

WORKER_MODULE = "ecdit_cli.bench.ep_worker"


def worker_args(out: Path, preset: str, overrides: list[str], batch: int, reps: int, warmup: int,
                ep: int, deepspeed_layer: bool = False) -> list[str]:
    args = [str(out), "--preset", preset, "--batch", str(batch), "--reps", str(reps), "--warmup", str(warmup),
            "--ep", str(ep)]
    for o in overrides:
        args += ["--set", o]
    if deepspeed_layer:
        args.append("--deepspeed-layer")
    return args


def ep_commands(tmp: Path, preset: str, overrides: list[str], batch: int, reps: int, warmup: int, ep: int,
                python: str | None = None, master_port: int | None = None) -> dict[str, list[str]]:
    """The three command lines, keyed by run name; each writes tmp/<name>.json."""
    from ecdit_cli.train.launch import free_port

    py = python or sys.executable
    port = master_port or free_port()
    runs = {
        "1 process, fast path": [py, "-m", WORKER_MODULE,
                                 *worker_args(tmp / "p1.json", preset, overrides, batch, reps, warmup, 1)],
        "1 process, MOELayer": [py, "-m", WORKER_MODULE,
                                *worker_args(tmp / "p1ds.json", preset, overrides, batch, reps, warmup, 1, True)],
        f"{ep} processes, ep={ep}": [py, "-m", "torch.distributed.run", "--nproc_per_node", str(ep),
                                     "--master_port", str(port), "-m", WORKER_MODULE,
                                     *worker_args(tmp / f"p{ep}.json", preset, overrides, batch, reps, warmup, ep)],
    }
    return runs


def _run(cmd: list[str], timeout: float) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise EcditError(f"expert-parallel benchmark timed out after {timeout:.0f} s: {' '.join(cmd)}") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
        raise EcditError(f"expert-parallel benchmark failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                         + "\n".join(tail))


def bench_ep(preset: str = "medium", overrides: list[str] | None = None, batch: int = 32, reps: int = 5,
             warmup: int = 1, ep: int = 2, timeout: float = 1800.0,
             on_progress: Callable[[str], None] = lambda msg: None,
             runner: Callable[[list[str], float], None] | None = None) -> dict:
    """Rows of step time, images/s and all-to-all share for 1 process and `ep` processes.

    `runner(cmd, timeout)` runs one command line to completion (default: a subprocess).
    """
    runner = runner or _run
    if ep < 2:
        raise EcditError(f"--ep {ep} is invalid: expert parallelism needs >= 2 processes")
    if batch % ep:
        raise EcditError(f"--batch {batch} is invalid with --ep {ep}: the batch is split over the processes")
    overrides = list(overrides or [])
    rows = []
    with tempfile.TemporaryDirectory(prefix="ecdit-bench-ep-") as d:
        tmp = Path(d)
        for name, cmd in ep_commands(tmp, preset, overrides, batch, reps, warmup, ep).items():
            on_progress(f"expert parallelism: {name}")
            runner(cmd, timeout)
            out = Path(cmd[cmd.index(WORKER_MODULE) + 1])
            res = json.loads(out.read_text())
            rows.append({"run": name, **res})
    base = rows[0]["step_ms"]
    for r in rows:
        r["step_ratio"] = r["step_ms"] / base
    return {"ep": ep, "batch": batch, "preset": preset, "overrides": overrides, "reps": reps, "rows": rows}
