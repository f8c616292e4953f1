"""`python -m ecdit_cli.bench.gpu_section DOC REPORT.md...`: put GPU benchmark reports into DOC.

`make bench-gpu` runs `ecdit bench moe` and `ecdit bench step` with `--device cuda` and then
this, which replaces the text between DOC's `<!-- bench-gpu:begin -->` and `<!-- bench-gpu:end -->`
lines (BENCHMARKS.md's GPU section) with the reports, under a line naming what wrote them.
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

from ecdit_cli.bench.report import fill_section


def gpu_section(reports: list[str]) -> str:
    day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    head = (f"Measured by `make bench-gpu` on {day} (bf16; `ecdit bench moe --device cuda` and `ecdit bench "
            "step --device cuda`, their markdown as written). Headings are one level down from the CPU ones.")
    demoted = ["\n".join(("#" + line) if line.startswith("#") else line for line in r.strip().splitlines())
               for r in reports]
    return "\n\n".join([head, *demoted])


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m ecdit_cli.bench.gpu_section DOC REPORT.md [REPORT.md ...]", file=sys.stderr)
        return 2
    doc, reports = Path(argv[0]), [Path(p).read_text() for p in argv[1:]]
    doc.write_text(fill_section(doc.read_text(), gpu_section(reports)))
    print(f"wrote the GPU section of {doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
