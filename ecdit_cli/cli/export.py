"""`ecdit export`: a finished run as model.safetensors + config.json + vocab.json."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def export(
    run_dir: Annotated[Path, typer.Argument(help="Run directory of a finished run (holds final/model.pt).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Export directory [default: RUN_DIR/export].")] = None,
) -> None:
    """Export a run's sampling weights as safetensors with its config and vocabulary (no pickle to load)."""
    from rich.console import Console

    from ecdit_cli.model.export import export_run
    from ecdit_cli.numbers import si

    res = export_run(run_dir, out)
    console = Console(highlight=False)
    weights = "EMA weights" if res.weights == "ema" else "weights (the run kept no EMA)"
    console.print(f"wrote {res.out_dir}: {', '.join(p.name for p in res.files)} ({weights}, {res.num_tensors} "
                  f"tensors, {si(res.num_params, count=True)} parameters)", markup=False)
    console.print(f'sample from it with: ecdit sample {res.out_dir} --prompt "a red circle"', markup=False)
