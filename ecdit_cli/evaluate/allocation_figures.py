"""The figures of `ecdit analyze` (see analyze.py for what is measured and analyze.json's layout).

Each function takes the analysis document (and the generated images for the heatmaps) and
returns a matplotlib Figure; `write_figures` saves every figure that applies as PNG and SVG.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from ecdit_cli.evaluate import sample as sampling

UNIT = "experts per token"


def _title(fig, text: str) -> None:
    """A suptitle wrapped to the figure's width (about 15 characters per inch at 9 pt)."""
    fig.suptitle("\n".join(textwrap.wrap(text, max(30, int(15 * fig.get_figwidth())))), fontsize=9)


def _no_grid(ax) -> None:
    ax.grid(False)

def heatmap_figure(doc: dict[str, Any], images: np.ndarray):
    """Rows: prompt x MoE layer; columns: the generated image, then experts per patch at a few t."""
    from matplotlib.figure import Figure

    h = doc["sampling"]["heatmaps"]
    maps = np.asarray(h["maps"])  # (L, K, P, g, g)
    L, K, P = maps.shape[:3]
    vmax = max(1.0, float(maps.max()))
    fig = Figure(figsize=(1.6 * (K + 1) + 1.6, 1.55 * L * P + 0.9), layout="constrained")
    axes = fig.subplots(L * P, K + 1, squeeze=False)
    im = None
    for p in range(P):
        for li in range(L):
            row = p * L + li
            sampling.show_image(axes[row][0], images[p, 0])
            # The prompt heads its group of rows (a side label of a long prompt did not fit a row).
            axes[row][0].set_ylabel(f"block {doc['moe_blocks'][li]}", fontsize=7, labelpad=3)
            if li == 0:
                prompt = "\n".join(textwrap.wrap(f'"{h["prompts"][p]}"', 26))
                axes[row][0].set_title(("generated\n" if p == 0 else "") + prompt, fontsize=7)
            for k in range(K):
                ax = axes[row][k + 1]
                im = ax.imshow(maps[li, k, p], cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
                _no_grid(ax)
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(f"t = {h['t'][k]:.2f}", fontsize=8)
    cb = fig.colorbar(im, ax=axes, shrink=0.6, label=UNIT)
    cb.ax.tick_params(labelsize=7)
    _title(fig, f"{doc['run_id']}: {UNIT} over the image patches while sampling ({doc['routing']}, "
                f"E={doc['num_experts']}, {doc['slots_per_token']:g} on average)")
    return fig


def histogram_figure(doc: dict[str, Any]):
    """Per MoE layer: share of image tokens by experts per token, one line per t bin."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    hs = doc["sampling"]["histogram"]
    share = np.asarray(hs["share"])
    L, nb = share.shape[:2]
    fig = Figure(figsize=(max(5.0, 3.4 * L + 0.6), 3.0), layout="constrained")
    axes = fig.subplots(1, L, squeeze=False)[0]
    cmap = colormaps["viridis"]
    for li, ax in enumerate(axes):
        for k in range(nb):
            lo, hi = hs["t_bins"][k]
            ax.plot(hs["experts"], share[li, k], marker="o", ms=3, color=cmap(k / max(1, nb - 1)),
                    label=f"t in [{lo:.1f}, {hi:.1f}{']' if k == nb - 1 else ')'}")
        ax.set_title(f"block {doc['moe_blocks'][li]}", fontsize=9)
        ax.set_xlabel(UNIT)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share of image tokens")
    axes[-1].legend(fontsize=7, title="sampling step", title_fontsize=7)
    _title(fig, f"{doc['run_id']}: distribution of {UNIT} while sampling (conditional pass)")
    return fig


def object_figure(doc: dict[str, Any]):
    """Per layer: experts per object vs background token against t; last panel: spread (CV) per layer."""
    from matplotlib.figure import Figure

    gt, gen = doc["ground_truth"], doc["sampling"]["generated_objects"]
    L = len(doc["moe_blocks"])
    fig = Figure(figsize=(max(8.0, 3.3 * (L + 1) + 0.4), 3.2), layout="constrained")
    axes = fig.subplots(1, L + 1, squeeze=False)[0]
    for li in range(L):
        ax, g = axes[li], gt["layers"][li]
        ax.plot(gt["t"], g["object_mean"], "o-", color="#e0541b", label="object (rendered scenes)")
        ax.plot(gt["t"], g["background_mean"], "o-", color="#1f6fb4", label="background (rendered scenes)")
        ax.plot(gt["t"], g["all_mean"], ":", color="#555555", label="all tokens")
        if gen is not None:
            centres = [(lo + hi) / 2 for lo, hi in gen["t_bins"]]
            ax.plot(centres, gen["layers"][li]["object_mean"], "s--", ms=3, color="#e0541b", alpha=0.6,
                    label="object (generated)")
            ax.plot(centres, gen["layers"][li]["background_mean"], "s--", ms=3, color="#1f6fb4", alpha=0.6,
                    label="background (generated)")
        ax.set_title(f"block {doc['moe_blocks'][li]}", fontsize=9)
        ax.set_xlabel("t (1 = noise)")
        ax.set_ylabel(f"mean {UNIT}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6.5)
    ax = axes[L]
    for li in range(L):
        ax.plot(gt["t"], gt["layers"][li]["cv"], "o-", label=f"block {doc['moe_blocks'][li]}")
    ax.set_xlabel("t (1 = noise)")
    ax.set_ylabel(f"CV of {UNIT} (std / mean)")
    ax.set_title("spread per layer (higher: more concentrated)", fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _title(fig, f"{doc['run_id']}: compute on objects vs background ({gt['num_scenes']} rendered scenes per t; "
                f"object token: object share of the patch >= {gt['object_share_threshold']:g})")
    return fig


def complexity_figure(doc: dict[str, Any]):
    """Object compute ratio per tag (mean +- std) and expert slots per image by number of objects."""
    from matplotlib.figure import Figure

    comp = doc["complexity"]
    fig = Figure(figsize=(9.5, 3.4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    L = len(comp["layers"])
    width = 0.8 / L
    tags = list(comp["layers"][0]["by_tag"])
    for li, layer in enumerate(comp["layers"]):
        xs = np.arange(len(tags)) + (li - (L - 1) / 2) * width
        m = [layer["by_tag"][t]["object_compute_ratio"]["mean"] or np.nan for t in tags]
        s = [layer["by_tag"][t]["object_compute_ratio"]["std"] or 0 for t in tags]
        ax1.bar(xs, m, width, yerr=s, capsize=2, label=f"block {layer['block']}")
        ks = list(layer["by_num_objects"])
        m2 = [layer["by_num_objects"][k]["slots_per_image"]["mean"] for k in ks]
        s2 = [layer["by_num_objects"][k]["slots_per_image"]["std"] for k in ks]
        ax2.errorbar([int(k) + (li - (L - 1) / 2) * 0.08 for k in ks], m2, yerr=s2, marker="o", capsize=3,
                     label=f"block {layer['block']}")
    ax1.axhline(1.0, color="#555555", lw=0.8, ls=":")
    ax1.set_xticks(np.arange(len(tags)), [t.replace("_", "\n") for t in tags], fontsize=7)
    ax1.set_ylabel("object compute share / object area share")
    ax1.set_title("compute on objects per task (mean ± std over scenes and t)", fontsize=9)
    ax1.legend(fontsize=7)
    ax2.set_ylim(bottom=0)
    ax2.set_xticks(sorted({int(k) for layer in comp["layers"] for k in layer["by_num_objects"]}))
    ax2.set_xlabel("objects in the scene")
    ax2.set_ylabel("expert slots per image")
    pooled = "pooled groups" if comp["pooled_groups"] else "per-image groups: fixed by capacity"
    ax2.set_title(f"compute per image ({pooled})", fontsize=9)
    ax2.legend(fontsize=7)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    _title(fig, f"{doc['run_id']}: text-image complexity (rendered scenes)")
    return fig


def specialisation_figure(doc: dict[str, Any]):
    """Per layer: expert x colour and expert x shape shares (plus background) as annotated heatmaps."""
    from matplotlib.figure import Figure

    sp = doc["specialisation"]
    L, E = len(sp["layers"]), doc["num_experts"]
    fig = Figure(figsize=(10.0, 0.32 * E * L + 1.2 * L + 0.6), layout="constrained")
    axes = fig.subplots(L, 2, squeeze=False, width_ratios=[len(sp["colours"]) + 1, len(sp["shapes"]) + 1])
    tables = [np.column_stack([np.asarray(layer[key]), np.asarray(layer["background_share"])])
              for layer in sp["layers"] for key in ("colour_share", "shape_share")]
    vmax = max(1e-6, max(float(t.max()) for t in tables))
    im = None
    for li, layer in enumerate(sp["layers"]):
        for c, names in enumerate((sp["colours"], sp["shapes"])):
            ax = axes[li][c]
            table = tables[2 * li + c]
            im = ax.imshow(table, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
            _no_grid(ax)
            ax.set_xticks(range(len(names) + 1), list(names) + ["bg"], fontsize=7)
            ax.set_yticks(range(E), [f"e{e}" for e in range(E)], fontsize=6)
            for (r, k), v in np.ndenumerate(table):
                ax.text(k, r, f"{v:.2f}", ha="center", va="center", fontsize=5.5,
                        color="white" if v < 0.6 * vmax else "black")
            ax.set_title(f"block {layer['block']}: expert x {'colour' if c == 0 else 'shape'}", fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.7, label="share of the object's tokens the expert processes")
    _title(fig, f"{doc['run_id']}: expert specialisation on rendered scenes (averaged over t)")
    return fig


def token_choice_figure(doc: dict[str, Any]):
    """Per layer: load share of each expert over the sampling steps, and the dropped share."""
    from matplotlib.figure import Figure

    tc = doc["token_choice"]
    L = len(tc["layers"])
    t = np.asarray(tc["t"])
    fig = Figure(figsize=(9.0, 2.6 * L + 0.6), layout="constrained")
    axes = fig.subplots(L, 2, squeeze=False)
    for li, layer in enumerate(tc["layers"]):
        req = np.asarray(layer["tokens_per_expert"], dtype=np.float64)
        share = req / np.maximum(req.sum(1, keepdims=True), 1)
        ax = axes[li][0]
        im = ax.imshow(share.T, aspect="auto", cmap="viridis", extent=(t[0], t[-1], share.shape[1] - 0.5, -0.5))
        _no_grid(ax)
        ax.set_xlabel("t at the sampling step")
        ax.set_ylabel("expert")
        ax.set_title(f"block {layer['block']}: share of routes asked of each expert", fontsize=8)
        fig.colorbar(im, ax=ax, label="share of routes")
        ax = axes[li][1]
        ax.plot(t, layer["dropped_share"], "o-", ms=3)
        ax.set_xlabel("t at the sampling step")
        ax.set_ylabel("dropped share of routes")
        ax.set_title(f"block {layer['block']}: over capacity", fontsize=8)
        ax.grid(alpha=0.3)
    _title(fig, f"{doc['run_id']}: token-choice load while sampling")
    return fig


def write_figures(doc: dict[str, Any], result: sampling.SampleResult, out: str | Path) -> dict[str, Path]:
    """Every figure that applies, as PNG and SVG; returns {name: png path}."""
    from ecdit_cli.figures import save_figure

    figs = {"heatmaps": heatmap_figure(doc, result.images), "experts_histogram": histogram_figure(doc)}
    if doc.get("ground_truth"):
        figs["object_vs_background"] = object_figure(doc)
        figs["complexity"] = complexity_figure(doc)
        figs["specialisation"] = specialisation_figure(doc)
    if doc.get("token_choice"):
        figs["token_choice_load"] = token_choice_figure(doc)
    return {name: save_figure(fig, out, name)["png"] for name, fig in figs.items()}


