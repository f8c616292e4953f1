"""Where routing spends compute: EC-DiT's compute-allocation analysis (arXiv 2410.02098, Sec. 5).

Expert choice gives tokens different amounts of compute: a patch is processed by as many experts
as chose it (0..E). The paper reports that detailed regions get more experts than background
(up to 44% of the experts) and that allocation is more uniform in early layers and more
concentrated in later ones. This module measures that on a trained run, two ways:

1. Generated images. The prompts are sampled (`sample.sample_images`, guidance as usual) while
   every MoE layer's routing of the conditional pass is recorded per Euler step: heatmaps of
   experts per patch, their distribution per layer and timestep bin, and (scenes runs) experts
   per object vs background patch, where "object" is read off the *final* image with the
   detector's pixel classifier (palette coverage >= 0.5).
2. Rendered ground-truth scenes. Scenes for the evaluation prompts (`scene_for_metadata`) are
   noised to fixed t (x_t = (1 - t) x_0 + t noise) and routed in one conditional forward pass.
   The renderer knows every object's exact coverage, so each patch has an object share (its
   mean pixel coverage, anti-aliasing included). A patch is an *object token* when its share is
   >= 0.5 and a *background token* otherwise (the two counts add up to all tokens); the
   share-weighted means, which use every partial patch, are reported too.

From (2) also: per layer and t, the coefficient of variation (std / mean) of experts per token
over all tokens, the spread statistic for 'uniform early, concentrated late'; per-image text-
image complexity (pooled routing groups: expert slots an image receives; per-image groups: the
share of its compute on object tokens divided by its object area share, 1 = no preference), per
tag and number of objects, as mean, std and n; and expert specialisation: for every object, the
share of its tokens (coverage-weighted) that each expert processes, averaged per colour and
per shape (a token may have several experts, so an expert's shares do not sum to 1 across
experts: summed over experts they give experts per token). Token-choice runs also get the
per-layer expert load and dropped share over the sampling steps. Dense runs have no routing.

Every number a figure shows is in analyze.json (see `analyze_model` for its layout).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ecdit_cli import __version__, rundir
from ecdit_cli.errors import EcditError
from ecdit_cli.evaluate import sample as sampling
from ecdit_cli.evaluate.allocation_figures import UNIT, write_figures
from ecdit_cli.files import atomic_write_bytes, atomic_write_json, npz_bytes

ANALYZE_DIR = "analyze"
ANALYZE_JSON = "analyze.json"
ROUTING_NPZ = "routing.npz"
OBJECT_SHARE_THRESHOLD = 0.5  # a patch is an object token when >= half its pixel area is object
GT_T_VALUES = (0.1, 0.3, 0.5, 0.7, 0.9)  # the centres of T_BIN_EDGES' bins
T_BIN_EDGES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
HEATMAP_T = (0.9, 0.5, 0.1)
DEFAULT_SCENES_PER_TAG = 8
DEFAULT_IMAGES_PER_PROMPT = 4
DEFAULT_PROMPT_TAGS = ("colors", "counting", "position")  # one default prompt of each
HEATMAP_MAX_PROMPTS = 4
_GT_NOISE_SALT = 0xA7A1


def _spread(values: Any) -> dict[str, float | int | None]:
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "n": int(v.size)}


def _safe_div(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def check_moe_run(cfg) -> None:
    if not cfg.moe.is_moe:
        name = f"run {cfg.name}" if cfg.name else "this run"
        raise EcditError(f"{name} is dense (moe.routing=dense): there is no routing to analyse; "
                         "analyze needs an expert_choice, token_choice or race run")


def default_prompts(cfg) -> list[str]:
    """One evaluation prompt per tag of DEFAULT_PROMPT_TAGS (scenes runs only)."""
    from ecdit_cli.evaluate import geneval

    if cfg.data.source != "scenes":
        raise EcditError(f"this run was trained on data.source={cfg.data.source}: give prompts with --prompt")
    records = geneval.make_prompt_set(0, {t: 1 for t in DEFAULT_PROMPT_TAGS})
    return [r["prompt"] for r in records]


# ----------------------------------------------------------------------------------------------
# Object masks and the routing of one forward pass.
# ----------------------------------------------------------------------------------------------

def object_coverage(metadata: dict[str, Any], size: int) -> np.ndarray:
    """(K, H, W) exact coverage of each object of a rendered scene, drawn as the renderer drew it."""
    from ecdit_cli.data.scenes import shape_coverage

    out = np.zeros((len(metadata["objects"]), size, size), dtype=np.float32)
    for k, obj in enumerate(metadata["objects"]):
        x0, y0, x1, y1 = obj["bbox"]
        out[k] = shape_coverage(obj["class"], (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, size, size)
    return out


def patch_shares(pixels: np.ndarray, patch: int) -> np.ndarray:
    """(..., H, W) per-pixel shares -> (..., H/p, W/p) mean share per patch (row-major token order)."""
    *lead, H, W = pixels.shape
    return pixels.reshape(*lead, H // patch, patch, W // patch, patch).mean(axis=(-3, -1))


def expert_membership(r, num_tokens: int) -> torch.Tensor:
    """(S, E) float: 1 where expert e processed token s, from a RoutingResult's slot table."""
    E, C = r.token_idx_EC.shape
    member = torch.zeros(num_tokens + 1, E, device=r.token_idx_EC.device)
    experts = torch.arange(E, device=r.token_idx_EC.device).view(E, 1).expand(E, C)
    member.index_put_((r.token_idx_EC.reshape(-1), experts.reshape(-1)),
                      torch.ones(E * C, device=member.device), accumulate=True)
    return member[:num_tokens]


def ground_truth_records(scenes_per_tag: int, seed: int) -> list[dict[str, Any]]:
    """The evaluation prompts whose scenes are routed: `scenes_per_tag` per tag, shuffled once so
    pooled routing groups mix tags (a group of one tag would hide differences between tags)."""
    from ecdit_cli.evaluate import geneval

    records = geneval.make_prompt_set(0, scenes_per_tag)
    order = np.random.default_rng([_GT_NOISE_SALT, seed]).permutation(len(records))
    return [records[int(i)] for i in order]


def ground_truth_inputs(cfg, records: Sequence[dict[str, Any]], t: float, t_index: int, seed: int
                        ) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Rendered scenes for `records` (scene i drawn with index i) noised to t.

    Returns x_t (B, 3, H, W) float32 in model range, the object share of every patch (B, g, g)
    (mean exact coverage of the union of the objects) and the scenes' metadata.
    """
    from ecdit_cli.data.scenes import SceneSpec, scene_for_metadata

    size, p = cfg.model.input_size, cfg.model.patch_size
    spec = SceneSpec(size)
    xs, unions, metas = [], [], []
    for i, rec in enumerate(records):
        scene = scene_for_metadata(spec, rec, seed, i)
        x0 = scene.image.transpose(2, 0, 1) * 2 - 1
        noise = np.random.default_rng([_GT_NOISE_SALT, seed, t_index, i]).standard_normal(x0.shape, dtype=np.float32)
        xs.append(((1 - t) * x0 + t * noise).astype(np.float32))
        unions.append(patch_shares(np.clip(object_coverage(scene.metadata, size).sum(0), 0, 1), p))
        metas.append(scene.metadata)
    return np.stack(xs), np.stack(unions), metas


@torch.no_grad()
def route_batch(model, cfg, x: np.ndarray, t: float, prompts: Sequence[str], batch_size: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Conditional forward passes; (experts per token (L, B, T) int, membership (L, B, T, E) float32)."""
    device = next(model.parameters()).device
    T = cfg.model.tokens_per_image
    per_group = max(1, (cfg.moe.group_size or T) // T)
    step = max(per_group, batch_size // per_group * per_group)  # whole routing groups per forward
    text_all, mask_all = sampling.tokenize_prompts(model, prompts)
    ept_parts, member_parts = [], []
    for s in range(0, len(x), step):
        xb = torch.from_numpy(x[s:s + step]).to(device)
        B = xb.shape[0]
        out = model(xb, torch.full((B,), float(t), device=device), text_all[s:s + step].to(device),
                    mask_all[s:s + step].to(device))
        ept_parts.append(np.stack([r.experts_per_token_S.view(B, T).cpu().numpy() for r in out.routing]))
        member_parts.append(np.stack([expert_membership(r, B * T).view(B, T, -1).cpu().numpy()
                                      for r in out.routing]))
    return np.concatenate(ept_parts, axis=1), np.concatenate(member_parts, axis=1)


# ----------------------------------------------------------------------------------------------
# Statistics.
# ----------------------------------------------------------------------------------------------

def token_stats(ept: np.ndarray, share: np.ndarray, num_experts: int) -> dict[str, float | int]:
    """Experts per token over all, object and background tokens; ept and share (B, T)."""
    e, w = ept.astype(np.float64).ravel(), share.astype(np.float64).ravel()
    obj = w >= OBJECT_SHARE_THRESHOLD
    mean = e.mean()
    return {
        "all_mean": float(mean), "all_std": float(e.std()), "cv": _safe_div(e.std(), mean),
        "max": float(e.max()), "max_share": float(e.max() / num_experts), "unrouted_share": float((e == 0).mean()),
        "object_mean": float(e[obj].mean()) if obj.any() else float("nan"),
        "background_mean": float(e[~obj].mean()) if (~obj).any() else float("nan"),
        "object_weighted_mean": _safe_div((w * e).sum(), w.sum()),
        "background_weighted_mean": _safe_div(((1 - w) * e).sum(), (1 - w).sum()),
        "object_tokens": int(obj.sum()), "background_tokens": int((~obj).sum()),
    }


def per_image_complexity(ept: np.ndarray, share: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image (B,): expert slots received, and (compute share on objects) / (object area share)."""
    e, w = ept.astype(np.float64), share.astype(np.float64)
    slots = e.sum(axis=1)
    compute_share = (e * w).sum(axis=1) / np.where(slots > 0, slots, np.nan)
    area = w.mean(axis=1)
    return slots, compute_share / np.where(area > 0, area, np.nan)


def ground_truth_analysis(model, cfg, scenes_per_tag: int, seed: int, batch_size: int,
                          t_values: Sequence[float] = GT_T_VALUES) -> tuple[dict[str, Any], dict[str, Any],
                                                                            dict[str, Any], dict[str, np.ndarray]]:
    """(ground_truth, complexity, specialisation) sections of analyze.json, and raw arrays."""
    from ecdit_cli.data.scenes import COLORS, SHAPES, TAGS

    E, p = cfg.moe.num_experts, cfg.model.patch_size
    blocks = [i for i in range(cfg.model.depth) if cfg.moe.is_moe_block(i)]
    records = ground_truth_records(scenes_per_tag, seed)
    prompts = [r["prompt"] for r in records]
    L, B = len(blocks), len(records)
    gt_layers = [{"block": b, **{k: [] for k in ("all_mean", "all_std", "cv", "max", "max_share", "unrouted_share",
                                                  "object_mean", "background_mean", "object_weighted_mean",
                                                  "background_weighted_mean", "object_to_background")}}
                 for b in blocks]
    slots_all = np.zeros((L, len(t_values), B))
    ratio_all = np.zeros((L, len(t_values), B))
    colour_num = np.zeros((L, E, len(COLORS)))
    shape_num = np.zeros((L, E, len(SHAPES)))
    bg_num, bg_den = np.zeros((L, E)), 0.0
    colour_n, shape_n = np.zeros(len(COLORS)), np.zeros(len(SHAPES))
    counts: dict[str, int] = {}
    raw_ept = np.zeros((L, len(t_values), B, cfg.model.tokens_per_image), dtype=np.int16)
    for ti, t in enumerate(t_values):
        x, union, metas = ground_truth_inputs(cfg, records, t, ti, seed)
        ept, member = route_batch(model, cfg, x, t, prompts, batch_size)
        share = union.reshape(B, -1)
        raw_ept[:, ti] = ept
        for li in range(L):
            st = token_stats(ept[li], share, E)
            counts = {"tokens": st["object_tokens"] + st["background_tokens"], "object_tokens": st["object_tokens"],
                      "background_tokens": st["background_tokens"]}
            for k in gt_layers[li]:
                if k in st:
                    gt_layers[li][k].append(st[k])
            gt_layers[li]["object_to_background"].append(_safe_div(st["object_mean"], st["background_mean"]))
            slots_all[li, ti], ratio_all[li, ti] = per_image_complexity(ept[li], share)
        # Specialisation: coverage-weighted share of each object's tokens that each expert processes.
        for i, meta in enumerate(metas):
            cov = patch_shares(object_coverage(meta, cfg.model.input_size), p).reshape(len(meta["objects"]), -1)
            for k, obj in enumerate(meta["objects"]):
                w = cov[k]
                if w.sum() <= 0:
                    continue
                routed = (w[None, :, None] * member[:, i]).sum(axis=1) / w.sum()  # (L, E)
                colour_num[:, :, COLORS.index(obj["color"])] += routed
                shape_num[:, :, SHAPES.index(obj["class"])] += routed
                colour_n[COLORS.index(obj["color"])] += 1
                shape_n[SHAPES.index(obj["class"])] += 1
            bw = 1 - share[i]
            bg_num += (bw[None, :, None] * member[:, i]).sum(axis=1)
            bg_den += bw.sum()
    ground_truth = {"t": [float(t) for t in t_values], "num_scenes": B, "scenes_per_tag": scenes_per_tag,
                    "object_share_threshold": OBJECT_SHARE_THRESHOLD, **counts, "layers": gt_layers}

    tags = [r["tag"] for r in records]
    nobj = [len(m["objects"]) for m in metas]
    per_group = max(1, (cfg.moe.group_size or cfg.model.tokens_per_image) // cfg.model.tokens_per_image)
    comp_layers = []
    for li, b in enumerate(blocks):
        def stats(sel: np.ndarray, _li: int = li) -> dict[str, Any]:
            return {"object_compute_ratio": _spread(ratio_all[_li][:, sel]),
                    "slots_per_image": _spread(slots_all[_li][:, sel])}
        by_tag = {tag: stats(np.asarray([tg == tag for tg in tags])) for tag in TAGS if tag in tags}
        by_n = {str(k): stats(np.asarray([v == k for v in nobj])) for k in sorted(set(nobj))}
        comp_layers.append({"block": b, "by_tag": by_tag, "by_num_objects": by_n})
    complexity = {
        "images_per_routing_group": per_group, "pooled_groups": per_group > 1,
        "slots_per_image_mean": float(slots_all.mean()),
        "note": ("slots_per_image: expert slots an image receives (sum of its experts per token); fixed by "
                 "the capacity when each image is its own routing group. object_compute_ratio: share of the "
                 "image's slots on object tokens / object area share (coverage-weighted; 1 = no preference). "
                 "Samples: scenes x t values."),
        "layers": comp_layers,
    }
    spec = {
        "colours": list(COLORS), "shapes": list(SHAPES),
        "objects_per_colour": (colour_n / len(t_values)).astype(int).tolist(),  # objects (each seen at every t)
        "objects_per_shape": (shape_n / len(t_values)).astype(int).tolist(),
        "note": ("share of an object's tokens (coverage-weighted) that each expert processes, averaged over "
                 "the objects of a colour / shape and over t; background: the same over background area"),
        "layers": [{"block": b,
                    "colour_share": (colour_num[li] / np.maximum(colour_n, 1)).tolist(),
                    "shape_share": (shape_num[li] / np.maximum(shape_n, 1)).tolist(),
                    "background_share": (bg_num[li] / max(bg_den, 1e-9)).tolist()} for li, b in enumerate(blocks)],
    }
    return ground_truth, complexity, spec, {"gt_experts_per_token": raw_ept, "gt_t": np.asarray(t_values)}


def _t_bins(t: np.ndarray) -> np.ndarray:
    """Bin index of each t in T_BIN_EDGES (t = 1.0 falls in the last bin)."""
    return np.clip(np.searchsorted(np.asarray(T_BIN_EDGES), t, side="right") - 1, 0, len(T_BIN_EDGES) - 2)


def sampling_analysis(result: sampling.SampleResult, cfg, scenes: bool) -> dict[str, Any]:
    """The `sampling` (and `token_choice`) sections from a routing-recorded sampling run."""
    rec = result.routing
    assert rec is not None
    E, T = rec.num_experts, cfg.model.tokens_per_image
    steps, L, P, N = rec.experts_per_token.shape[:4]
    ept = rec.experts_per_token.reshape(steps, L, P * N, T).astype(np.float64)
    bins = _t_bins(rec.t)
    nb = len(T_BIN_EDGES) - 1
    layers, hist = [], np.zeros((L, nb, E + 1), dtype=np.int64)
    for li, b in enumerate(rec.blocks):
        e = ept[:, li].reshape(steps, -1)
        mean, std = e.mean(1), e.std(1)
        layers.append({"block": b, "mean": mean.tolist(), "std": std.tolist(), "cv": (std / mean).tolist(),
                       "max": e.max(1).tolist()})
        for s in range(steps):
            hist[li, bins[s]] += np.bincount(rec.experts_per_token[s, li].ravel(), minlength=E + 1)[: E + 1]
    share = hist / np.maximum(hist.sum(-1, keepdims=True), 1)
    picks = [int(np.argmin(np.abs(rec.t - t))) for t in HEATMAP_T]
    shown = min(P, HEATMAP_MAX_PROMPTS)
    out: dict[str, Any] = {
        "t": rec.t.tolist(),
        "layers": layers,
        "histogram": {"t_bins": [[T_BIN_EDGES[i], T_BIN_EDGES[i + 1]] for i in range(nb)],
                      "experts": list(range(E + 1)), "counts": hist.tolist(), "share": share.tolist()},
        "heatmaps": {"t": [float(rec.t[s]) for s in picks], "step": picks, "prompts": result.prompts[:shown],
                     "image_index": 0,
                     "maps": rec.experts_per_token[picks][:, :, :shown, 0].transpose(1, 0, 2, 3, 4).tolist()},
        "generated_objects": None,
    }
    if scenes:
        from ecdit_cli.data.detector import classify_pixels

        fg = np.zeros((P * N, cfg.model.input_size, cfg.model.input_size))
        for k, img in enumerate(result.images.reshape(P * N, *result.images.shape[2:])):
            kmap, a = classify_pixels(img)
            fg[k] = np.take_along_axis(a, kmap[..., None], -1)[..., 0] >= 0.5
        share_px = patch_shares(fg, cfg.model.patch_size).reshape(P * N, T)
        obj = share_px >= OBJECT_SHARE_THRESHOLD
        gl = []
        for li, b in enumerate(rec.blocks):
            om, bm = [], []
            for k in range(nb):
                e = ept[bins == k, li]  # (steps in bin, P*N, T)
                om.append(float(e[:, obj].mean()) if e.size and obj.any() else float("nan"))
                bm.append(float(e[:, ~obj].mean()) if e.size and (~obj).any() else float("nan"))
            gl.append({"block": b, "object_mean": om, "background_mean": bm})
        out["generated_objects"] = {
            "t_bins": out["histogram"]["t_bins"], "object_tokens": int(obj.sum()),
            "background_tokens": int((~obj).sum()), "layers": gl,
            "note": "object tokens read off the final image (detector pixel classifier), routing of every step",
        }
    return out


def token_choice_analysis(rec: sampling.RoutingRecord, cfg, num_images: int) -> dict[str, Any]:
    routes = num_images * cfg.model.tokens_per_image * cfg.moe.top_k
    layers = []
    for li, b in enumerate(rec.blocks):
        req, kept = rec.tokens_per_expert[:, li], rec.kept_per_expert[:, li]
        layers.append({"block": b, "tokens_per_expert": req.tolist(), "kept_per_expert": kept.tolist(),
                       "dropped_share": (1 - kept.sum(1) / routes).tolist(),
                       "load_imbalance": (req.max(1) / np.maximum(req.mean(1), 1e-9)).tolist()})
    return {"t": rec.t.tolist(), "routes_per_step": routes, "layers": layers,
            "note": "tokens_per_expert: routes asked of each expert (before capacity); kept: processed"}


def analyze_model(
    model,
    cfg,
    prompts: Sequence[str] | None = None,
    n: int = DEFAULT_IMAGES_PER_PROMPT,
    steps: int = sampling.DEFAULT_STEPS,
    cfg_scale: float = sampling.DEFAULT_CFG_SCALE,
    seed: int = 0,
    shift: float = sampling.DEFAULT_SHIFT,
    scenes_per_tag: int = DEFAULT_SCENES_PER_TAG,
    batch_size: int = sampling.DEFAULT_BATCH_SIZE,
    on_stage: Callable[[str], None] | None = None,
    guidance_max_t: float = sampling.DEFAULT_GUIDANCE_MAX_T,
) -> tuple[dict[str, Any], sampling.SampleResult, dict[str, np.ndarray]]:
    """(analyze.json document, the sampled images with their routing, raw arrays for routing.npz).

    Document: run facts (routing, experts, capacity, MoE blocks, slots_per_token), settings,
    `sampling` (per layer and step: mean/std/cv/max experts per token; histograms per t bin;
    heatmaps; generated_objects), `ground_truth` (per layer and t: all/object/background means,
    weighted means, cv, max share; token counts), `complexity`, `specialisation`, `token_choice`.
    """
    check_moe_run(cfg)
    # object masks are pixel-exact only in pixel space (a latent cell mixes several pixels)
    scenes = cfg.data.source == "scenes" and cfg.model.in_channels == 3 and cfg.model.space == "pixel"
    prompts = list(prompts) if prompts else default_prompts(cfg)
    if scenes_per_tag < 1:
        raise EcditError(f"scenes per tag must be >= 1, got {scenes_per_tag}")
    stage = on_stage or (lambda _s: None)
    m, moe = cfg.model, cfg.moe
    T = m.tokens_per_image
    group = moe.group_size or T
    from ecdit_cli.model.accounting import expert_slots_per_token

    slots = expert_slots_per_token(cfg)
    stage("sampling with routing recorded")
    result = sampling.sample_images(model, cfg, prompts, n, cfg_scale, steps, seed, shift, record_routing=True,
                                    batch_size=batch_size, guidance_max_t=guidance_max_t)
    doc: dict[str, Any] = {
        "ecdit_version": __version__, "run_id": cfg.name, "routing": moe.routing, "num_experts": moe.num_experts,
        "capacity_factor": moe.capacity_factor, "top_k": moe.top_k if moe.routing == "token_choice" else None,
        "group_size_tokens": group, "tokens_per_image": T, "grid": m.input_size // m.patch_size,
        "patch_size": m.patch_size, "moe_blocks": result.routing.blocks,
        "slots_per_token": slots,  # EC: E * C / G = mean experts per token; TC: min(top_k, E * C / G), an upper bound
        # Race: experts per token vary at inference (learned threshold); the measured mean over the sampling.
        "race_mode": moe.race_inference if moe.routing == "race" else None,
        "slots_per_token_measured": float(result.routing.experts_per_token.mean()),
        "routing_group": moe.routing_group,  # batch groups are a training pool: inference routes per image
        "unit": UNIT,
        "settings": {"prompts": prompts, "n": n, "steps": steps, "cfg": cfg_scale, "seed": seed, "shift": shift,
                     "guidance_max_t": guidance_max_t, "scenes_per_tag": scenes_per_tag if scenes else None, "gt_t": list(GT_T_VALUES),
                     "object_share_threshold": OBJECT_SHARE_THRESHOLD},
    }
    doc["sampling"] = sampling_analysis(result, cfg, scenes)
    raw = {"t": result.routing.t, "experts_per_token": result.routing.experts_per_token,
           "tokens_per_expert": result.routing.tokens_per_expert, "kept_per_expert": result.routing.kept_per_expert,
           "images": result.images}
    doc["ground_truth"] = doc["complexity"] = doc["specialisation"] = None
    if scenes:
        stage("routing rendered scenes")
        gt, comp, spec, gt_raw = ground_truth_analysis(model, cfg, scenes_per_tag, seed, batch_size)
        doc.update(ground_truth=gt, complexity=comp, specialisation=spec)
        raw.update(gt_raw)
    doc["token_choice"] = (token_choice_analysis(result.routing, cfg, len(prompts) * n)
                           if moe.routing == "token_choice" else None)
    return doc, result, raw


def analyze_run(run_dir: str | Path, out_dir: str | Path | None = None, use_ema: bool = True, device: str = "cpu",
                **kwargs: Any) -> tuple[dict[str, Any], dict[str, Path]]:
    """Analyse a finished run and write analyze.json, routing.npz and the figures into `out_dir`
    (default RUN_DIR/analyze); returns (document, {name: path})."""
    from ecdit_cli.config import load_run_config
    from ecdit_cli.model.load import load_run

    run_dir = rundir.require_dir(run_dir, "run directory")
    if rundir.is_run_dir(run_dir):
        check_moe_run(load_run_config(run_dir / rundir.CONFIG))  # before loading weights
    model, cfg = load_run(run_dir, use_ema=use_ema, device=device)
    if not cfg.name:
        cfg.name = run_dir.name
    t0 = time.time()
    doc, result, raw = analyze_model(model, cfg, **kwargs)
    doc["settings"]["ema"] = bool(use_ema and cfg.train.ema_decay > 0)
    doc["wall_time_s"] = time.time() - t0
    out = Path(out_dir) if out_dir is not None else run_dir / ANALYZE_DIR
    files = write_figures(doc, result, out)
    atomic_write_bytes(out / ROUTING_NPZ, npz_bytes(**raw, prompts=np.asarray(result.prompts)))
    files["routing"] = out / ROUTING_NPZ
    atomic_write_json(out / ANALYZE_JSON, doc)
    files["json"] = out / ANALYZE_JSON
    return doc, files


def summary_rows(doc: dict[str, Any]) -> list[tuple[str, ...]]:
    """(block, object, background, ratio, CV) at the middle ground-truth t, for a CLI table."""
    gt = doc.get("ground_truth")
    if not gt:
        return []
    mid = len(gt["t"]) // 2
    rows = []
    for layer in gt["layers"]:
        rows.append((str(layer["block"]), f"{layer['object_mean'][mid]:.2f}", f"{layer['background_mean'][mid]:.2f}",
                     f"{layer['object_to_background'][mid]:.2f}" if math.isfinite(layer["object_to_background"][mid])
                     else "-", f"{layer['cv'][mid]:.2f}", f"{100 * max(layer['max_share']):.0f}%"))
    return rows
