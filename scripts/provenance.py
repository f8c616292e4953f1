"""Write STUDY/PROVENANCE.md: what produced a committed study (command, commit, machine, timing).

The study's training time is read from its runs' own summaries (each records its wall time and
when it last wrote): the sum is worker time, the span runs from the earliest start to the latest
finish. Used by scripts/reference.sh; usable on any study directory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> str:
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        return f"{kb / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        return "unknown"


def _timing(study: Path) -> list[str]:
    starts, ends, total, n = [], [], 0.0, 0
    for summary in sorted((study / "runs").glob("*/summary.json")):
        doc = json.loads(summary.read_text())
        if doc.get("status") != "done" or not doc.get("updated_at"):
            continue
        end = datetime.fromisoformat(doc["updated_at"])
        wall = float(doc.get("wall_time_s") or 0.0)
        starts.append(end - timedelta(seconds=wall))
        ends.append(end)
        total, n = total + wall, n + 1
    if not n:
        return ["- no done run with timing in runs/"]
    # Wall time with at least one point training: the union of the points' intervals (a study
    # trained in several sittings does not count the pauses between them).
    stretches: list[list[datetime]] = []
    for s, e in sorted(zip(starts, ends, strict=True)):
        if stretches and s <= stretches[-1][1]:
            stretches[-1][1] = max(stretches[-1][1], e)
        else:
            stretches.append([s, e])
    busy = sum((e - s).total_seconds() for s, e in stretches)
    spans = "; ".join(f"{s:%Y-%m-%d %H:%M}-{e:%H:%M} UTC" for s, e in stretches)
    return [
        f"- {n} done points; training wall time summed over points (worker time): {total / 60:.1f} min",
        f"- wall time with at least one point training: {busy / 60:.1f} min in {len(stretches)} sitting(s) "
        f"({spans}); each run's final evaluation is included, the report is not",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("study", type=Path)
    ap.add_argument("--command", required=True)
    ap.add_argument("--this-run-seconds", type=float, default=None)
    args = ap.parse_args()
    import deepspeed
    import torch

    import ecdit_cli

    dirty = " (with uncommitted changes)" if _git("status", "--porcelain", "--untracked-files=no") else ""
    lines = [
        "# Provenance",
        "",
        f"Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by scripts/provenance.py.",
        "",
        f"- command: `{args.command}`",
        f"- commit: {_git('rev-parse', 'HEAD')}{dirty}",
        f"- machine: {os.cpu_count()} CPU cores ({_cpu()}), {_memory_gib()} memory, no GPU used",
        f"- software: Python {platform.python_version()}, torch {torch.__version__}, "
        f"deepspeed {deepspeed.__version__}, ecdit {ecdit_cli.__version__}, {platform.system()} {platform.release()}",
        "",
        "## Timing",
        "",
        *_timing(args.study),
    ]
    if args.this_run_seconds is not None:
        lines.append(f"- this invocation (sweep + training of the points not yet recorded): "
                     f"{args.this_run_seconds / 60:.1f} min")
    (args.study / "PROVENANCE.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.study / 'PROVENANCE.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
