"""Markdown tables of benchmark results (pure functions of the result dicts)."""

from __future__ import annotations

from typing import Any


def _table(header: list[str], rows: list[list[str]]) -> str:
    align = ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _f(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def _mb(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"


def machine_line(m: dict[str, Any], load_end: float | None = None) -> str:
    parts = [f"{m['cpu']}, {m['cores']} cores, {m['threads']} threads", f"torch {m['torch']}",
             f"deepspeed {m.get('deepspeed')}", f"{m['device']} {m['dtype']}"]
    if m.get("gpu"):
        parts.insert(0, m["gpu"])
    if m.get("load_avg_1m") is not None:
        parts.append(f"load average {m['load_avg_1m']} at start" + (f", {load_end} at end" if load_end is not None else ""))
    return "Machine: " + "; ".join(parts) + "."


def moe_markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    out = ["## MoE layer: one FFN layer vs a dense FFN with the same activated FLOPs", "",
           machine_line(res["machine"], res.get("load_avg_1m_end")),
           f"Medians of {s['reps']} interleaved repetitions (IQR in brackets), after {s['warmup']} warm-up calls; "
           "ratios are medians of the per-round ratios to dense (the two ran back to back); "
           f"capacity factor f={s['capacity_factor']:g} (dense hidden width f x 4D); pooled groups of "
           f"{s['pool_tokens']} tokens; forward without autograd; fwd+bwd with a fixed upstream gradient "
           f"(+ {s['aux_loss_weight']:g} x aux loss where the layer has one); peak = memory allocated at the "
           "peak of one fwd+bwd call above what existed before it. A row whose label names another reference "
           "(the capacity schedule: two stacked layers) has its ratios to that row.", ""]
    shapes: dict[tuple, list[dict]] = {}
    for r in res["rows"]:
        shapes.setdefault((r["images"], r["tokens_per_image"], r["width"], r["experts"]), []).append(r)
    for (b, t, d, e), rows in shapes.items():
        out += [f"### {b} images x {t} tokens, width {d}, {e} experts", ""]
        out.append(_table(
            ["variant", "fwd ms", "fwd ratio", "fwd+bwd ms", "fwd+bwd ratio", "peak MiB", "peak ratio"],
            [[r["label"], f"{r['fwd_ms']:.1f} ({r['fwd_iqr_ms']:.1f})", f"{r['fwd_ratio']:.3f}",
              f"{r['fwd_bwd_ms']:.1f} ({r['fwd_bwd_iqr_ms']:.1f})", f"{r['fwd_bwd_ratio']:.3f}",
              _mb(r["peak_mem_bytes"]), _f(r["mem_ratio"], ".2f")] for r in rows]))
        out.append("")
    if res.get("memory_sweep"):
        out += ["### Peak memory of one fwd+bwd vs the number of tokens", "",
                "Linear growth = a constant marginal cost per added token (no tokens x experts x capacity "
                "tensor anywhere).", ""]
        out.append(_table(
            ["variant", "images", "tokens", "peak MiB", "bytes/token", "marginal bytes/token"],
            [[r["variant"], str(r["images"]), str(r["tokens"]), _mb(r["peak_mem_bytes"]),
              f"{r['bytes_per_token']:.0f}", _f(r["marginal_bytes_per_token"], ".0f")] for r in res["memory_sweep"]]))
        out.append("")
    return "\n".join(out)


def step_markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    mfu = s.get("peak_tflops") is not None
    out = ["## Whole model: training step and sampling step", "", machine_line(res["machine"], res.get("load_avg_1m_end")),
           f"Preset `{s['preset']}`" + (f" with {', '.join(s['overrides'])}" if s["overrides"] else "")
           + f": width {s['hidden_size']}, depth {s['depth']}, {s['tokens_per_image']} tokens/image, "
           f"{s['num_experts']} experts, f={s['capacity_factor']:g}, batch {s['batch']}, optimizer "
           f"{s['optimizer']}; medians of {s['reps']} interleaved repetitions (IQR in brackets; sampling: "
           f"{s.get('sample_reps', s['reps'])}); ratios and overheads are medians of per-round paired ratios. "
           f"The FLOP-matched dense FFN width is rounded to a multiple of {s.get('width_multiple', 1)}. "
           "Step = forward + loss + backward + optimizer step on the DeepSpeed engine; sampling step = one "
           "forward at the same batch without autograd. Ratios are to the FLOP-matched dense model; the "
           "inference overhead is against the backbone-matched dense model, next to its theoretical value "
           "from activated FLOPs.", ""]
    header = ["model", "dense width", "GFLOP/image", "step ms", "images/s", "step ratio", "sample ms",
              "sample ratio", "overhead vs dense backbone", "theoretical overhead", "train TFLOP/s"]
    if mfu:
        header += ["train MFU", "sample MFU"]
    rows = []
    for r in res["rows"]:
        row = [r["label"], f"{r['dense_width_mult']:.3f}" if r["routing"] == "dense" else "-",
               f"{r['flops_per_image'] / 1e9:.3f}", f"{r['step_ms']:.1f} ({r['step_iqr_ms']:.1f})",
               f"{r['images_per_s']:.1f}", f"{r['step_ratio']:.3f}", f"{r['sample_ms']:.1f} ({r['sample_iqr_ms']:.1f})",
               f"{r['sample_ratio']:.3f}", _pct(r["sample_overhead"]), _pct(r["theory_overhead"]),
               f"{r['train_tflops']:.4f}"]
        if mfu:
            row += [f"{100 * r['train_mfu']:.1f}%", f"{100 * r['sample_mfu']:.1f}%"]
        rows.append(row)
    out += [_table(header, rows), ""]
    if s.get("peak_note"):
        out += [s["peak_note"] + (" MFU = accounting FLOPs per second (training step: 3 x forward) / peak."
                                  if mfu else ""), ""]
    if res.get("ep"):
        out.append(ep_markdown(res["ep"]))
    return "\n".join(out)


def ep_markdown(ep: dict[str, Any]) -> str:
    out = [f"### Expert parallelism: expert-choice training step, 1 process vs {ep['ep']} processes", "",
           f"Preset `{ep['preset']}`, global batch {ep['batch']}, medians of {ep['reps']} steps; the processes "
           "split the cores. All-to-all = time inside DeepSpeed's `_AllToAll` (forward and backward, every MoE "
           "layer, including waiting for the other rank).", ""]
    out.append(_table(
        ["run", "threads/process", "step ms", "images/s", "step ratio", "all-to-all ms", "all-to-all share"],
        [[r["run"], str(r["threads_per_process"]), f"{r['step_ms']:.1f}", f"{r['images_per_s']:.1f}",
          f"{r['step_ratio']:.3f}", f"{r['a2a_ms']:.1f}", f"{100 * r['a2a_share']:.1f}%"] for r in ep["rows"]]))
    out.append("")
    return "\n".join(out)


def data_markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    rows = [[r["name"], _f(r["batch_ms"], ".2f"), _f(r["iqr_ms"], ".2f"), _f(r["per_image_ms"], ".3f"),
             _f(r["images_per_s"], ".0f")] for r in res["rows"]]
    return "\n\n".join([
        f"### Data path: batches of {s['batch']} images of {s['image_size']} px ({s['reps']} interleaved reps, medians)",
        machine_line(res["machine"], res.get("load_avg_end")),
        _table(["piece", "ms / batch", "IQR ms", "ms / image", "images/s"], rows),
    ])


def _ratio_cell(r: dict[str, float] | float | None) -> str:
    if r is None:
        return "-"
    if isinstance(r, dict):
        return f"{r['median']:.2f} ({r['iqr']:.2f})"
    return f"{r:.2f}"


def train_markdown(res: dict[str, Any]) -> str:
    from ecdit_cli.bench.train import target_status

    s = res["settings"]
    rows = []
    for r in res["rows"]:
        st = r.get("startup", {})
        rows.append([f"{r['preset']} {r['routing']}", _f(r["full loop ms"]), _f(r["engine step ms"]),
                     _f(r["plain loop ms"]), _f(r["plain DiT ms"]), _f(r["full loop images/s"], ".0f"),
                     _f(r["engine GFLOP/s"], ".0f"), _f(r["sgemm GFLOP/s"], ".0f"),
                     _ratio_cell(r["full loop / engine step"]), _ratio_cell(r["engine step / plain loop"]),
                     _ratio_cell(r["plain loop / plain DiT"]), _f(st.get("one_step_process_s")),
                     _f(st.get("import_deepspeed_s")),
                     _f(r.get("whole process", {}).get("ecdit_train_process_s")),
                     _f(r.get("whole process", {}).get("plain_script_process_s")),
                     _ratio_cell(r.get("ecdit train process / plain script"))])
    targets = []
    for r in res["rows"]:
        for name, (v, met) in target_status(r).items():
            if v is not None:
                targets.append([f"{r['preset']} {r['routing']}", name, f"<= {res['targets'][name]:g}", f"{v:.2f}",
                                "met" if met else "**not met**"])
    compiled = [[f"{r['preset']} {r['routing']}", _f(r["engine step ms"]), _f(r["compiled engine step ms"]),
                 _ratio_cell(r["compiled / engine step"])] for r in res["rows"] if "compiled / engine step" in r]
    compile_table = [
        "torch.compile (`train.compile=true`, DeepSpeed's `engine.compile()`): the engine step of an identically "
        "initialised compiled engine, interleaved with the uncompiled one; compile time excluded (warm-up).",
        _table(["preset / routing", "engine step", "compiled engine step", "compiled / engine"], compiled),
    ] if compiled else []
    return "\n\n".join([
        f"### Training loop: {s['steps']}-step runs x {s['rounds']} rounds, batch {s['batch']}, fp32 "
        f"({s['reps']} interleaved steps per round; ms per step, medians; ratios: median (IQR) of per-round ratios)",
        machine_line(res["machine"], res.get("load_avg_end")),
        _table(["preset / routing", "full loop", "engine step", "plain loop", "plain DiT", "full loop img/s",
                "engine GFLOP/s", "sgemm GFLOP/s", "full / engine", "engine / plain", "plain / plain DiT",
                "1-step process s", "import deepspeed s", "ecdit train process s", "plain script s",
                "process / script"], rows),
        _table(["preset / routing", "target", "goal", "measured", ""], targets),
        *compile_table,
    ])


GPU_BEGIN, GPU_END = "<!-- bench-gpu:begin -->", "<!-- bench-gpu:end -->"


def fill_section(doc: str, body: str, begin: str = GPU_BEGIN, end: str = GPU_END) -> str:
    """`doc` with what lies between the `begin` and `end` marker lines replaced by `body`
    (the markers and the body appended at the end when `doc` has no such pair)."""
    i, j = doc.find(begin), doc.find(end)
    block = f"{begin}\n{body.strip()}\n{end}"
    if i < 0 or j < i:
        return doc.rstrip("\n") + "\n\n" + block + "\n"
    return doc[:i] + block + doc[j + len(end):]
