"""One training process of a launched run: `python -m ecdit_cli _worker RUN_DIR [--quiet]`.

Started by the DeepSpeed launcher or torchrun (which set RANK / WORLD_SIZE / LOCAL_RANK); reads
the run's config.yaml. Rank 0 shows progress and writes the run directory's files.
Exit codes: 0 done, 1 failed, 2 bad input, 130 interrupted (resumable).
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ecdit-worker")
    parser.add_argument("run_dir")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the DeepSpeed launcher")
    args = parser.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))

    from rich.markup import escape

    from ecdit_cli.cli.progress import TrainDisplay, err_console
    from ecdit_cli.config import load_run_config
    from ecdit_cli.errors import EcditError
    from ecdit_cli.train.loop import TrainingFailed, TrainingInterrupted, train

    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = load_run_config(args.run_dir)
        with TrainDisplay(quiet=args.quiet or rank != 0) as display:
            train(cfg, args.run_dir, display.callbacks() if rank == 0 else None)
        return 0
    except TrainingInterrupted as err:
        if rank == 0:
            err_console.print(f"[yellow]{escape(str(err))}[/]", markup=True)
        return 130
    except EcditError as err:
        if rank == 0:
            err_console.print(f"[bold red]error:[/] {escape(str(err))}", markup=True)
        return 1 if isinstance(err, TrainingFailed) else 2


if __name__ == "__main__":
    sys.exit(main())
