"""`ecdit info`: parameters and FLOPs of a preset or config, or of every preset."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

# Published totals (PAPER.md, Table 1): dense, and MoE (32 experts; 64 for M at depth 38).
PUBLISHED = {"xl": (1.47e9, 6.08e9), "xxl": (2.35e9, 13.47e9), "3xl": (4.50e9, 32.15e9), "m": (8.03e9, 97.21e9)}


def _num(x: float) -> str:
    """Counts with fixed decimals (0.726B, 2.76M) so a column of them lines up."""
    from ecdit_cli.numbers import si

    return si(x, count=True, decimals=3 if abs(x) >= 1e9 else 2 if abs(x) >= 1e3 else 0)


def info(
    config: Annotated[Optional[str], typer.Argument(help="Preset name or run config file; omit for every preset.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a config key (repeatable).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    paper: Annotated[bool, typer.Option("--paper", help="Compare the paper presets with the published parameter counts.")] = False,
) -> None:
    """Total and activated parameters and forward FLOPs per image of a model config."""
    from rich.console import Console
    from rich.table import Table

    from ecdit_cli.accounting import count
    from ecdit_cli.config import PRESETS, resolve_named_config
    from ecdit_cli.data.scenes import vocabulary

    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, 130)  # tables in logs and READMEs should not wrap
    overrides = list(set_ or [])
    vocab = len(vocabulary()) + 2  # the scenes' words + <pad>, <unk>
    if paper:
        rows = paper_table()
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
        console.print(table)
        return
    if config is None and not any(o.startswith("preset=") for o in overrides):
        from ecdit_cli.config import resolve_config

        results = {}
        for name in PRESETS:
            cfg = resolve_config(preset=name, overrides=overrides)
            results[name] = _summary(cfg, count(cfg, vocab))
        if as_json:
            typer.echo(json.dumps(results, indent=2))
            return
        table = Table(title=f"Presets (routing {cfg.moe.routing}; change with --set moe.routing=...)")
        for col in ("preset", "hidden", "depth", "heads/kv", "tokens", "params total", "params active",
                    "text enc.", "GFLOP/image"):
            table.add_column(col, justify="left" if col == "preset" else "right")
        for name, r in results.items():
            table.add_row(name, str(r["hidden_size"]), str(r["depth"]), f"{r['num_heads']}/{r['num_kv_heads']}",
                          str(r["tokens_per_image"]), _num(r["params_total"]), _num(r["params_active"]),
                          _num(r["params_text"]), f"{r['flops_per_image'] / 1e9:.3g}")
        console.print(table)
        return
    cfg = resolve_named_config(config, overrides)
    acc = count(cfg, vocab if cfg.data.source == "scenes" else None)
    result = _summary(cfg, acc)
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
    console.print(table)


def _summary(cfg, acc) -> dict:
    m = cfg.model
    return {
        "preset": cfg.preset, "routing": cfg.moe.routing, "hidden_size": m.hidden_size, "depth": m.depth,
        "num_heads": m.num_heads, "num_kv_heads": m.num_kv_heads, "tokens_per_image": acc.tokens_per_image,
        "num_experts": cfg.moe.num_experts if cfg.moe.is_moe else 0, "num_moe_layers": acc.num_moe_layers,
        "slots_per_token": acc.slots_per_token, "params_total": acc.params_total,
        "params_active": acc.params_active, "params_text": acc.params_text, "flops_per_image": acc.flops_per_image,
    }


def paper_table() -> list[dict]:
    """Our counts of the paper presets beside Table 1 (MoE: 32 experts; M: 64 experts at depth 38)."""
    from ecdit_cli.accounting import count
    from ecdit_cli.config import resolve_config

    rows = []
    for name, (p_dense, p_moe) in PUBLISHED.items():
        dense = count(resolve_config(preset=name))
        moe_preset = "m-moe" if name == "m" else name
        moe = count(resolve_config(preset=moe_preset, overrides=["moe.routing=expert_choice"]))
        diff = moe.params_total - dense.params_total
        rows.append({
            "model": name.upper() + ("-64E" if name == "m" else "-32E"), "dense_total": dense.params_total,
            "paper_dense": p_dense, "moe_total": moe.params_total, "paper_moe": p_moe,
            "moe_minus_dense": diff, "paper_moe_minus_dense": p_moe - p_dense,
            "diff_rel_error": diff / (p_moe - p_dense) - 1, "moe_active": moe.params_active,
        })
    return rows
