"""`ecdit info`: parameters and FLOPs of a preset or config, or of every preset."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from ecdit_cli.numbers import aligned_count as _num


def _console():
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, 130)  # tables in logs and READMEs should not wrap
    return console


def info(
    config: Annotated[Optional[str], typer.Argument(help="Preset name or run config file; omit for every preset.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a config key (repeatable).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    paper: Annotated[bool, typer.Option("--paper", help="Compare the paper presets with the published parameter counts.")] = False,
) -> None:
    """Total and activated parameters and forward FLOPs per image of a model config."""
    overrides = list(set_ or [])
    if paper:
        _paper(as_json)
    elif config is None and not any(o.startswith("preset=") for o in overrides):
        _presets(overrides, as_json)
    else:
        _one(config, overrides, as_json)


def _paper(as_json: bool) -> None:
    from rich.table import Table

    from ecdit_cli.model.accounting import paper_comparison

    rows = paper_comparison()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="Paper presets: ours vs published (EC-DiT Table 1)")
    for col in ("model", "ours dense", "paper dense", "ours MoE", "paper MoE", "ours diff", "paper diff",
                "diff error", "ours active (MoE)"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for r in rows:
        table.add_row(r["model"], _num(r["dense_total"]), _num(r["paper_dense"]), _num(r["moe_total"]),
                      _num(r["paper_moe"]), _num(r["moe_minus_dense"]), _num(r["paper_moe_minus_dense"]),
                      f"{100 * r['diff_rel_error']:+.2f}%", _num(r["moe_active"]))
    _console().print(table)


def _presets(overrides: list[str], as_json: bool) -> None:
    from rich.table import Table

    from ecdit_cli.config import PRESETS, resolve_config
    from ecdit_cli.model.accounting import summary

    results = {name: summary(resolve_config(preset=name, overrides=overrides)) for name in PRESETS}
    if as_json:
        typer.echo(json.dumps(results, indent=2))
        return
    routing = next(iter(results.values()))["routing"]
    table = Table(title=f"Presets (routing {routing}; change with --set moe.routing=...)")
    for col in ("preset", "hidden", "depth", "heads/kv", "tokens", "params total", "params active",
                "text enc.", "GFLOP/image"):
        table.add_column(col, justify="left" if col == "preset" else "right")
    for name, r in results.items():
        table.add_row(name, str(r["hidden_size"]), str(r["depth"]), f"{r['num_heads']}/{r['num_kv_heads']}",
                      str(r["tokens_per_image"]), _num(r["params_total"]), _num(r["params_active"]),
                      _num(r["params_text"]), f"{r['flops_per_image'] / 1e9:.3g}")
    _console().print(table)


def _one(config: Optional[str], overrides: list[str], as_json: bool) -> None:
    from rich.table import Table

    from ecdit_cli.config import resolve_named_config
    from ecdit_cli.model.accounting import count, summary, vocab_size

    cfg = resolve_named_config(config, overrides)
    acc = count(cfg, vocab_size(cfg))
    result = summary(cfg, acc)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    table = Table(title=f"{cfg.preset or config}: {cfg.moe.routing}", show_header=True)
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for key in ("params_total", "params_active", "params_text", "flops_per_image", "tokens_per_image",
                "num_moe_layers", "slots_per_token"):
        v = result[key]
        table.add_row(key, _num(v) if isinstance(v, (int, float)) and v >= 1000 else f"{v:g}")
    for key, v in acc.breakdown_params.items():
        table.add_row(f"  params: {key}", _num(v))
    for key, v in acc.breakdown_flops.items():
        table.add_row(f"  FLOPs: {key}", _num(v))
    _console().print(table)
