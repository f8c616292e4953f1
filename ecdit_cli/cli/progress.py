"""Rich progress for training (a bar with ETA, step, loss, images/s), or plain lines.

Plain lines are used when stdout is not a terminal or with --quiet, so logs stay readable.
"""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ecdit_cli.numbers import si
from ecdit_cli.train.records import Callbacks

# soft_wrap: long lines (paths, messages) stay whole in logs instead of wrapping at 80 columns.
console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def start_lines(info: dict[str, Any]) -> list[str]:
    return [
        f"run {info['run_id']} -> {info['run_dir']}",
        f"  routing {info['routing']}, {info['steps']} steps"
        + (f" (resuming at {info['start_step']})" if info["start_step"] else "")
        + f", {info['world_size']} process(es), {info['device']}, {info['precision']}, ZeRO-{info['zero_stage']}"
        + (f", ep_size {info['ep_size']}" if info["ep_size"] > 1 else ""),
        f"  {info['images_per_step']} images/step ({info['micro_batch_size']} per process x "
        f"{info['grad_accum']} accumulation), {si(info['tokens_per_step'])} tokens/step",
        f"  params total {si(info['params_total'])}, active {si(info['params_active'])} "
        f"(+ text encoder {si(info['params_text'])}); forward {si(info['flops_per_image'])}FLOP/image, "
        f"{si(info['flops_per_step'])}FLOP/step (train)",
    ]


class TrainDisplay:
    """Builds the Callbacks of one run; shares a Progress with a sweep's overall bar if given."""

    def __init__(self, quiet: bool = False, progress: Progress | None = None) -> None:
        self.plain = quiet or not sys.stdout.isatty()
        self.quiet = quiet
        self.progress = progress
        self.own_progress = False
        self.task: TaskID | None = None

    def __enter__(self) -> TrainDisplay:
        if not self.plain and self.progress is None:
            self.progress = make_progress()
            self.progress.start()
            self.own_progress = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None
        if self.own_progress and self.progress is not None:
            self.progress.stop()

    def print(self, msg: str) -> None:
        if self.progress is not None and not self.plain:
            self.progress.console.print(msg, markup=False)
        elif not self.quiet:
            print(msg, flush=True)

    def callbacks(self) -> Callbacks:
        def on_start(info: dict[str, Any]) -> None:
            for line in start_lines(info):
                self.print(line)
            if self.progress is not None and not self.plain:
                self.task = self.progress.add_task(
                    info["run_id"], total=info["steps"], completed=info["start_step"], loss="-", ips="-"
                )

        def on_step(step: int, values: dict[str, Any]) -> None:
            if self.task is not None:
                loss = values["loss"]  # the latest step read back (at log steps), None before
                self.progress.update(self.task, completed=step, loss="-" if loss is None else f"{loss:.4f}",
                                     ips=f"{values['images_per_s']:.0f}")

        def on_record(rec: dict[str, Any]) -> None:
            if self.plain and not self.quiet:
                if rec["kind"] == "val":
                    print(f"step {rec['step']:>6}  val_loss {rec['val_loss']:.4f}", flush=True)
                elif rec["kind"] == "eval":
                    print(f"step {rec['step']:>6}  {_eval_line(rec)}", flush=True)
                else:
                    print(f"step {rec['step']:>6}  loss {rec['train_loss']:.4f}  lr {rec['lr']:.2e}  "
                          f"{rec['images_per_s']:.0f} img/s", flush=True)
            elif rec["kind"] == "val" and self.progress is not None:
                self.progress.console.print(f"  step {rec['step']}: val_loss {rec['val_loss']:.4f}", highlight=False)
            elif rec["kind"] == "eval" and self.progress is not None:
                self.progress.console.print(f"  step {rec['step']}: {_eval_line(rec)}", highlight=False)

        def on_message(msg: str) -> None:
            if not msg.startswith("start:"):  # the start block is printed by on_start
                self.print(f"  {msg}")

        return Callbacks(on_start=on_start, on_step=on_step, on_record=on_record, on_message=on_message)


def _eval_line(rec: dict[str, Any]) -> str:
    """One line for an in-training GenEval record (train.eval_every): overall, then each task."""
    tasks = "  ".join(f"{k.removeprefix('geneval_')} {v:.0%}" for k, v in rec.items()
                      if k.startswith("geneval_") and k != "geneval_overall")
    return f"GenEval {rec['geneval_overall']:.1%} ({rec['eval_images']} images)  {tasks}"


def count_progress(out: Console, unit: str = "") -> Progress:
    """A bar over a count of items (description, bar, done/total, unit, elapsed, eta); transient,
    and silent when `out` is not a terminal."""
    unit_column = [TextColumn(unit)] if unit else []
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), *unit_column,
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=out, transient=True,
                    disable=not out.is_terminal)


def make_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[ips]} img/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
