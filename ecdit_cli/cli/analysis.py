"""`ecdit collect`, `ecdit fit`, `ecdit plot`: thin commands over collect.py, fit.py, report.py."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

StudyDir = Annotated[
    Path, typer.Argument(help="Study directory (with manifest.csv) or a single run directory.")
]
NBoot = Annotated[
    int, typer.Option("--n-boot", min=0, help="Bootstrap refits for the 95% confidence intervals.")
]
Seed = Annotated[int, typer.Option("--seed", help="Seed of the bootstrap resampling.")]


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def _print_warnings(warnings: list[str], limit: int = 20) -> None:
    from rich.markup import escape

    err = _console(stderr=True)
    for w in warnings[:limit]:
        err.print(f"[yellow]warning:[/] {escape(w)}")
    if len(warnings) > limit:
        err.print(f"[yellow]warning:[/] ... and {len(warnings) - limit} more")


def collect(study: StudyDir) -> None:
    """Gather runs.csv (one row per run) and curves.csv (long format) into the study directory."""
    from rich.markup import escape
    from rich.table import Table

    from ecdit_cli.study.collect import CURVES_CSV, RUNS_CSV
    from ecdit_cli.study.collect import collect as collect_study

    result = collect_study(study)
    table = Table(title=f"runs in {result.study_dir}")
    table.add_column("status")
    table.add_column("runs", justify="right")
    for status, n in result.status_counts().items():
        if n:
            table.add_row(status, str(n))
    table.add_row("[bold]total[/]", f"[bold]{len(result.runs)}[/]")
    out = _console()
    out.print(table)
    failed = result.runs[result.runs["status"] == "failed"]
    for _, r in failed.iterrows():
        out.print(f"[red]failed[/] {escape(str(r['run_id']))}: {escape(r['error'] or 'no error recorded')}")
    _print_warnings(result.warnings)
    out.print(
        f"wrote {result.study_dir / RUNS_CSV} ({len(result.runs)} rows) and "
        f"{result.study_dir / CURVES_CSV} ({len(result.curves)} rows)"
    )


def fit(
    table: Annotated[Path, typer.Argument(help="A CSV file, e.g. a study's runs.csv or your own table.")],
    x: Annotated[str, typer.Option("--x", help="Column of the scaling variable X (e.g. params_active).")],
    y: Annotated[str, typer.Option("--y", help="Column of the loss L (e.g. final_val_loss).")],
    group: Annotated[
        str | None, typer.Option("--group", help="Fit each value of this column separately.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the fits as JSON on stdout.")] = False,
    all_rows: Annotated[
        bool, typer.Option("--all-rows", help="Keep runs that are not done and rows without x or y.")
    ] = False,
    n_boot: NBoot = 200,
    seed: Seed = 0,
) -> None:
    """Fit the saturating power law L = E + A X^-alpha, with 95% bootstrap CIs, per group."""
    from ecdit_cli.errors import EcditError
    from ecdit_cli.files import to_json
    from ecdit_cli.study.findings import fit_csv
    from ecdit_cli.study.fit import python_value

    results, notes = fit_csv(table, x, y, group, n_boot=n_boot, seed=seed, all_rows=all_rows)
    _print_warnings(notes)
    if all(isinstance(f, str) for _, f in results):
        raise EcditError("no group could be fitted: " + "; ".join(f"{k}: {f}" for k, f in results))
    if as_json:
        rows = [{"group": python_value(k), "error": f} if isinstance(f, str) else f.to_dict() for k, f in results]
        typer.echo(
            to_json(
                {"x": x, "y": y, "group_by": group, "n_boot": n_boot, "seed": seed, "fits": rows}, indent=2
            )
        )
        return
    _fit_table(results, x, y, group)


def _fit_table(results, x: str, y: str, group: str | None) -> None:
    from rich.markup import escape
    from rich.table import Table

    from ecdit_cli.numbers import sig as _g

    t = Table(title=f"{y} = E + A * {x}^-alpha  (95% bootstrap CIs)")
    for col in ([group] if group else []) + ["n", "E", "A", "alpha", "RMSE (log)", "R² (log)", "boot ok"]:
        t.add_column(col, justify="left" if col == group else "right", overflow="fold")
    warnings = []
    for key, f in results:
        lead = [escape(str(key))] if group else []
        if isinstance(f, str):
            t.add_row(*lead, "—", "[red]no fit[/]", "", "", "", "", "")
            warnings.append(f"{key}: {f}")
            continue
        cells = [
            f"{_g(getattr(f, k))}\n[dim]\\[{_g(f.ci[k][0])}, {_g(f.ci[k][1])}][/]"
            for k in ("E", "A", "alpha")
        ]
        t.add_row(*lead, str(f.n), *cells, _g(f.rmse_log, 3), _g(f.r2_log, 5), f"{f.n_boot_ok}/{f.n_boot}")
        warnings += [(f"{key}: {w}" if group else w) for w in f.warnings]
    _console().print(t)
    _print_warnings(warnings)


def plot(
    study: StudyDir,
    no_collect: Annotated[
        bool,
        typer.Option("--no-collect", help="Use the existing runs.csv/curves.csv even if they are stale."),
    ] = False,
    n_boot: NBoot = 200,
    seed: Seed = 0,
) -> None:
    """Write the figures (plots/*.png, *.svg) and report.md + report.html.

    Collects first when runs.csv is missing or older than any run's files.
    """
    from rich.markup import escape

    from ecdit_cli.study.collect import needs_collect
    from ecdit_cli.study.report import write_report

    recollected = not no_collect and needs_collect(study)
    files = write_report(study, recollect=False if no_collect else None, n_boot=n_boot, seed=seed)
    runs = files.data.runs
    out = _console()
    if recollected:
        out.print(f"collected {len(runs)} runs into {files.data.study_dir / 'runs.csv'}")
    _print_warnings(files.data.warnings)
    out.print(escape(f"wrote {len(files.figures)} figure files into {files.data.study_dir / 'plots'}"))
    out.print(escape(f"report: {files.markdown}"))
    out.print(escape(f"        {files.html}"))
    not_done = runs[runs["status"] != "done"]
    if len(not_done):
        parts = [f"{r['run_id']} ({r['status']})" for _, r in not_done.iterrows()]
        out.print(escape(f"not done ({len(not_done)} of {len(runs)}): " + ", ".join(parts)))
    for series, why in _unfitted(files.analysis.fits):
        out.print(f"[yellow]no fit[/] {escape(series)}: {escape(why)}")


def _unfitted(fits) -> list[tuple[str, str]]:
    seen = {}
    for per_series in fits.values():
        for s, f in per_series.items():
            if isinstance(f, str):
                seen.setdefault(s, f)
    return list(seen.items())
